"""TensorBoard and MLflow sinks: what they write is read back with each tool's own reader."""

from __future__ import annotations

import json
import math

import pytest

from common.config import ConfigError, load_config
from common.preflight import check_trackers
from server.tracking import Trackers, flat_params, numeric

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

ROWS = [{"round": r, "test_accuracy": 0.2 + 0.3 * r, "train_loss": math.nan if r == 0 else 1.0 / r,
         "bytes_uploaded": 1000 * r, "site_startup_s": 0.5} for r in range(3)]


@pytest.fixture
def written(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(["logging=[tensorboard,mlflow]", "strategy=fedprox",
                       "model.modalities=[image,text]"])
    trackers = Trackers(cfg, tmp_path)
    for row in ROWS:
        trackers.log_round(row)
    summary = {"test_accuracy": 0.8, "rounds": 2, "strategy": "fedprox", "bytes_uploaded": 3000}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    trackers.finish(summary, tmp_path / "summary.json")
    return tmp_path


def test_tensorboard_event_file_holds_every_round(written):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(written / "tensorboard"))
    events.Reload()
    accuracy = events.Scalars("test_accuracy")
    assert [e.step for e in accuracy] == [0, 1, 2]
    assert [e.value for e in accuracy] == pytest.approx([0.2, 0.5, 0.8])
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]  # NaN rows are left out
    assert "round" not in events.Tags()["scalars"]


def test_mlflow_file_store_holds_params_metrics_and_the_summary(written):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(written / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("fedmm").experiment_id])
    assert run.info.run_name == written.name and run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "fedprox"
    assert run.data.params["model.modalities"] == '["image", "text"]'
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.2), (1, 0.5), (2, 0.8)]
    assert run.data.metrics["summary.test_accuracy"] == pytest.approx(0.8)
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["summary.json"]


def test_no_logging_writes_nothing(tmp_path):
    trackers = Trackers(load_config([]), tmp_path)
    trackers.log_round(ROWS[0])
    trackers.finish({}, tmp_path / "summary.json")
    assert list(tmp_path.iterdir()) == []


def test_numbers_and_params_are_flattened_for_the_trackers():
    assert numeric({"round": 1, "a": 1, "b": math.inf, "c": "x", "d": True, "e": 0.5}) == {
        "a": 1.0, "e": 0.5}
    assert flat_params({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]",
                                                                     "d": "None"}


def test_unknown_tracker_is_a_config_error_and_a_missing_package_is_named(monkeypatch):
    with pytest.raises(ConfigError, match="^logging must be a subset of"):
        load_config(["logging=[wandb]"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match="logging: mlflow not installed"):
        check_trackers(["tensorboard", "mlflow"])
