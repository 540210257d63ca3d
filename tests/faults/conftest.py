"""Fault suite: the `faults` marker (fuzzing and probes, part of `make test`) and `faults_slow`
(the fault scenarios: real federations, run by `make faults` only).

With FEDMM_FAULTS_RESULTS set (`make faults` sets it), every scenario appends one row
(scenario, expected, observed, command) to that JSON Lines file, and the session adds the
fuzzing and probe counts; `python -m tests.faults.table FILE` prints them as a table.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.deployment.conftest import federation  # noqa: F401 - the deployment scenarios' fixture

RESULTS = os.environ.get("FEDMM_FAULTS_RESULTS")
_outcomes: dict[str, Counter] = {"fuzz": Counter(), "probe": Counter()}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: bad-input fuzzing and probes (tests/faults)")
    config.addinivalue_line("markers", "faults_slow: fault scenarios on real federations "
                                       "(`make faults`; skipped unless -m selects them)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "faults_slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="a slow fault scenario: `make faults` runs it")
    for item in items:
        if "faults_slow" in item.keywords:
            item.add_marker(skip)


def write_result(row: dict) -> None:
    """Append one row to the results file (when `make faults` asked for one)."""
    if RESULTS:
        Path(RESULTS).parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.fixture
def record():
    """`record(scenario, expected, observed, command)`: one row of the `make faults` table."""
    def write(scenario: str, expected: str, observed: str, command: str) -> None:
        write_result({"scenario": scenario, "expected": expected, "observed": observed,
                      "command": command})
    return write


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    kind = ("fuzz" if "test_manifest_fuzz" in report.nodeid else
            "probe" if "test_probes" in report.nodeid else None)
    if kind and (report.when == "call" or report.outcome != "passed"):
        _outcomes[kind][report.outcome] += 1


def pytest_sessionfinish(session: pytest.Session) -> None:
    fuzz, probes = _outcomes["fuzz"], _outcomes["probe"]
    module = next((m for m in list(sys.modules.values())
                   if str(getattr(m, "__file__", "")).endswith("test_manifest_fuzz.py")), None)
    if module is not None and (fuzz["passed"] or fuzz["failed"]):
        write_result({"scenario": "manifest fuzzing (3 properties)",
                      "expected": "each manifest loads or fails in one line: 0 crashes",
                      "observed": f"{module._written} manifests, {fuzz['failed']} "
                                  f"properties failed",
                      "command": f"FEDMM_FUZZ_EXAMPLES={module.EXAMPLES} python -m pytest "
                                 f"tests/faults/test_manifest_fuzz.py"})
    if probes["passed"] or probes["failed"]:
        write_result({"scenario": "probes (bad inputs, the fedmm command, exit codes)",
                      "expected": "each answered in one line, no traceback",
                      "observed": f"{probes['passed']} passed, {probes['failed']} failed",
                      "command": "python -m pytest tests/faults/test_probes.py"})
