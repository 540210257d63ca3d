"""What a finished run means to its launcher: its summary, or one line saying why it failed.

Flower's status (`flwr ls`) says whether the ServerApp ran to its end; `status` in
summary.json says whether the run trained: `failed` when fewer than
`strategy.min_completed_rounds` rounds aggregated an update (server/report.py). The simulation
launcher and `fedmm train` both turn either failure into a non-zero exit with this one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from launcher.flwr_cli import FlowerRun
from launcher.processes import DeployError


def run_summary(run: FlowerRun, out_dir: Path, resume: str) -> dict:
    """The run's summary.json; DeployError (one line) if the run did not complete or failed.

    `resume` says how to continue the run from its last checkpoint.
    """
    path = Path(out_dir) / "summary.json"
    if not run.ok or not path.is_file():
        details = " ".join(f"{run.status} {run.details}".split())
        raise DeployError(f"run {run.run_id} did not complete: {details} (log: {run.log_path}; "
                          f"{resume})")
    summary = json.loads(path.read_text())
    if summary.get("status") == "failed":
        raise DeployError(f"run failed: {summary['failure']} (details: {path})")
    return summary
