"""What a run reports about itself: `failed` when too few rounds aggregated an update (with
each lost reply's reason), a progress line that says when the model did not change, and
checkpoints that a failed or interrupted write never half-replaces."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from flwr.app import ArrayRecord

from common.adapter import adapter_state
from common.config import load_config
from server.checkpoint import discard_partial, last_checkpoint
from server.report import CheckpointError, RunRecorder, outcome, progress_line
from server.strategy import make_strategy
from tests.conftest import LABELS, random_batch, tiny_overrides

LOST = ["node 7: client error: RuntimeError: simulated dropout of site 0",
        "node 9: no reply within strategy.round_timeout_s=30"]


def _row(server_round: int, aggregated: bool, reasons: list[str] = ()) -> dict:
    return {"round": server_round, "replied": 2 if aggregated else 0, "aggregated": aggregated,
            "reasons": list(reasons)}


def test_a_run_whose_rounds_all_failed_is_failed_and_says_the_model_is_untrained():
    strategy = load_config(["strategy.rounds=2"]).strategy
    result = outcome([_row(1, False, LOST), _row(2, False, LOST[:1])], strategy)
    assert result["status"] == "failed" and result["completed_rounds"] == 0
    assert result["round_reasons"] == {"1": LOST, "2": LOST[:1]}
    line = result["failure"]
    assert line.startswith("0 of 2 rounds aggregated an update, fewer than "
                           "strategy.min_completed_rounds=2: round 1: node 7: client error: "
                           "RuntimeError: simulated dropout of site 0 (+1 more); round 2: ")
    assert "untrained initial adapter" in line and "\n" not in line


def test_min_completed_rounds_lets_a_run_lose_some_rounds():
    strategy = load_config(["strategy.rounds=3", "strategy.min_completed_rounds=2"]).strategy
    rows = [_row(1, True, LOST[1:]), _row(2, False, LOST), _row(3, True)]
    assert outcome(rows, strategy)["status"] == "completed"
    failed = outcome(rows[:2] + [_row(3, False)], strategy)
    assert failed["status"] == "failed" and "untrained" not in failed["failure"]
    assert "round 3: no usable update" in failed["failure"]
    old = [{"round": 1, "replied": 3}, {"round": 2, "replied": 0}, {"round": 3, "replied": 2}]
    assert outcome(old, strategy)["completed_rounds"] == 2  # rows written before the flag


def test_progress_line_says_when_the_global_adapter_did_not_change():
    row = {"round": 1, "replied": 0, "sampled": 2, "rejected": 2, "train_loss": float("nan"),
           "test_accuracy": 0.167, "test_macro_f1": 0.05, "elapsed_s": 3.0, "aggregated": False}
    assert progress_line(row, 2).endswith("no update aggregated: global adapter unchanged")
    assert progress_line({**row, "round": 0}, 2).endswith("initial adapter, untrained")
    assert "unchanged" not in progress_line({**row, "aggregated": True, "replied": 2}, 2)


@pytest.fixture
def recorder(tmp_path, tiny_text_dir):
    from common.model import build_model

    cfg = load_config(tiny_overrides(tiny_text_dir) + ["model.vision.channels=[8]",
                                                        "model.vision.image_size=32"])
    cfg = replace(cfg, data=replace(cfg.data, labels=tuple(LABELS)))
    bundle = build_model(cfg.model, LABELS)
    strategy = make_strategy(cfg, ArrayRecord(adapter_state(bundle.model)))
    return RunRecorder(cfg, tmp_path / "run", bundle, random_batch(6), strategy)


def test_a_full_disk_mid_checkpoint_leaves_the_previous_one_whole(recorder, monkeypatch):
    state = {k: v.numpy() for k, v in adapter_state(recorder.bundle.model).items()}
    recorder.evaluate_round(1, state)
    before = {p.name: p.read_bytes() for p in (recorder.run_dir / "adapters" / "round-001")
              .iterdir()}
    monkeypatch.setenv("FEDMM_TEST_DISK_FULL_ROUND", "2")
    with pytest.raises(CheckpointError) as err:
        recorder.evaluate_round(2, state)
    assert str(err.value) == (f"{recorder.run_dir / 'adapters' / 'round-002'}: checkpoint not "
                              f"written (No space left on device); round 1's checkpoint "
                              f"{recorder.run_dir / 'adapters' / 'round-001'} is intact; fix and "
                              f"resume the run")
    adapters = recorder.run_dir / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == ["round-001"]  # no temp folder left
    assert {p.name: p.read_bytes() for p in (adapters / "round-001").iterdir()} == before
    assert last_checkpoint(recorder.run_dir)[0] == 1


def test_resume_ignores_and_removes_a_half_written_round(tmp_path):
    adapters = tmp_path / "adapters"
    (adapters / "round-001").mkdir(parents=True)
    (adapters / "round-001" / "checkpoint.json").write_text(json.dumps({"round": 1}))
    half = adapters / ".round-002-x1y2"  # killed before its rename: adapter, no checkpoint.json
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(torch.zeros(3).numpy().tobytes())
    assert last_checkpoint(tmp_path) == (1, adapters / "round-001")
    assert discard_partial(tmp_path) == [half] and not half.exists()
    assert last_checkpoint(tmp_path) == (1, adapters / "round-001")
