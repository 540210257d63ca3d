"""Per-round metrics to the tracking tools researchers already use (`logging=[tensorboard,mlflow]`).

Both write files in the run folder and work offline; each is optional (extra `fedmm[tracking]`):

    RUN_DIR/tensorboard/   TensorBoard event file: every numeric metrics.jsonl column, step=round
                           (`tensorboard --logdir RUN_DIR/tensorboard`)
    RUN_DIR/mlruns/        MLflow file store: one run (experiment "fedmm") with the config as
                           flattened params, the same metrics per round, the summary's numbers
                           and summary.json as an artifact (`MLFLOW_ALLOW_FILE_STORE=true
                           mlflow ui --backend-store-uri RUN_DIR/mlruns`: MLflow 3 keeps its
                           file store in maintenance mode); MLFLOW_TRACKING_URI, when set, names
                           another store (e.g. sqlite:///mlflow.db or a tracking server)

`RunRecorder` (server/report.py) calls `log_round` after each metrics.jsonl row and `finish`
with the summary.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

from common.config import Config

MLFLOW_EXPERIMENT = "fedmm"
SKIPPED = {"round"}  # the step itself


def numeric(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row or summary (bools and strings left out)."""
    return {k: float(v) for k, v in row.items() if k not in SKIPPED and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def flat_params(value: object, prefix: str = "") -> dict[str, str]:
    """A nested config as flat `a.b.c` -> string params."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flat_params(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): json.dumps(value) if isinstance(value, (list, tuple)) else str(value)}


class TensorBoardSink:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def log_round(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, summary: dict, summary_path: Path) -> None:
        self.writer.add_text("summary", json.dumps(summary, indent=2, sort_keys=True))
        self.writer.close()


class MlflowSink:
    def __init__(self, folder: Path, cfg: Config, run_name: str):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or folder.resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps the file store only on request
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment = found.experiment_id if found else self.client.create_experiment(
            MLFLOW_EXPERIMENT)
        self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in sorted(flat_params(asdict(cfg)).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_round(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self, summary: dict, summary_path: Path) -> None:
        self.log_round(int(summary.get("rounds", 0)),
                       {f"summary.{k}": v for k, v in numeric(summary).items()})
        if summary_path.is_file():
            self.client.log_artifact(self.run_id, str(summary_path))
        self.client.set_terminated(self.run_id)


class Trackers:
    """The configured trackers, fed one metrics row per round and the summary at the end."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.sinks: list = []
        if "tensorboard" in cfg.logging:
            self.sinks.append(TensorBoardSink(run_dir / "tensorboard"))
        if "mlflow" in cfg.logging:
            self.sinks.append(MlflowSink(run_dir / "mlruns", cfg, run_dir.name))

    def log_round(self, row: dict) -> None:
        values = numeric(row)
        for sink in self.sinks:
            sink.log_round(int(row["round"]), values)

    def finish(self, summary: dict, summary_path: Path) -> None:
        for sink in self.sinks:
            sink.finish(summary, summary_path)
