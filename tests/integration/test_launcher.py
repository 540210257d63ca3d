"""The simulation launcher leaves nothing running when it is stopped with SIGTERM mid-run."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

from launcher.processes import tagged as _tagged
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_mid_run_tears_down_superlink_simulation_and_ray(tmp_path, tiny_text_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.run", f"data.demo_dir={tmp_path / 'demo'}",
         "data.demo_train=200", "data.demo_test=40", "partition.num_clients=2",
         "strategy.rounds=50", f"output_dir={tmp_path / 'run'}",
         *tiny_overrides(tiny_text_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    under_way = threading.Event()

    def watch() -> None:  # the federation is under way once round 1 is reported
        for line in proc.stdout:
            if "[fedmm] round   1/" in line:
                under_way.set()
    threading.Thread(target=watch, daemon=True).start()
    assert under_way.wait(timeout=240), "round 1 never finished"
    mine = lambda tag: tag.startswith(f"{proc.pid}:")  # noqa: E731
    assert _tagged(mine), "no Flower/Ray process was running under the launcher"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert _tagged(mine) == []
