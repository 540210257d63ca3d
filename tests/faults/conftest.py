"""Fault suite: registers the `faults` marker (leave the suite out with `-m "not faults"`)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: bad-input fuzzing and probes (tests/faults)")
