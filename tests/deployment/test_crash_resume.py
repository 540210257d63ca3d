"""Kill the ServerApp with SIGKILL after round 1; resume; the run ends as if uninterrupted.

Expectation (README, "Checkpoint and resume"): every site's shuffling and dropout are seeded by
(seed, round, site name), and the server restores adapter, strategy state and RNG states, so
the resumed run repeats the uninterrupted one bit for bit (replies are aggregated in content
order, not arrival order): the same metrics and the same adapter tensors.
"""

from __future__ import annotations

import json
import signal

import numpy as np
from safetensors.numpy import load_file

from launcher.processes import cmdline, descendants, send, teardown
from tests.deployment.conftest import FEDMM, ROOT, wait_for


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def test_sigkill_of_the_serverapp_then_resume_ends_like_the_uninterrupted_run(federation,
                                                                             reference_run):
    out = federation.root / "runs" / "crashed"
    first = federation.popen([*FEDMM, *federation.train_args(out)],
                             federation.root / "crashed.log", cwd=ROOT)
    wait_for(lambda: (out / "adapters" / "round-001" / "checkpoint.json").is_file(), 300,
             "round 1 checkpoint", [first])
    server = federation.procs[0]  # `fedmm server`: SuperLink -> SuperExec -> ServerApp
    serverapps = [p for p in descendants(server.pid) if "flwr-serverapp" in cmdline(p)]
    assert len(serverapps) == 1
    send(serverapps, signal.SIGKILL)
    teardown([first], tag="none", grace=10)  # the submitting CLI; the federation stays up
    assert not (out / "summary.json").exists()

    code, log = federation.run_fedmm(
        ["train", "--superlink", federation.address, "--ca", str(federation.certs / "ca.crt"),
         "--resume", str(out)], federation.root / "resumed.log")
    assert code == 0, log[-3000:]
    assert "resume: continuing after round 1" in log

    rows, reference = _rows(out), _rows(reference_run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for got, want in zip(rows, reference):
        for key in ("test_accuracy", "test_loss", "test_macro_f1", "train_loss"):
            assert got.get(key) == want.get(key), (got["round"], key)
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(reference_run / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
