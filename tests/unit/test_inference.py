"""A site's use of the global adapter: predictions with label names, a merged export that
computes exactly what the adapter does, and the pieces resume relies on."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch

from common.config import load_config, to_json
from common.demo_data import generate
from common.inference import export_merged, load_for_inference, load_merged, predict_manifest
from common.model import build_model, save_adapter
from common.train import predict
from server.checkpoint import last_checkpoint, restore_rng_state, rng_state, write_meta
from server.report import kept_rows
from tests.conftest import LABELS, random_batch, tiny_overrides


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_text_dir):
    """A saved adapter with non-zero LoRA B (so merging changes the weights) and its config."""
    out = tmp_path_factory.mktemp("adapter")
    cfg = load_config(tiny_overrides(tiny_text_dir) + ["model.vision.channels=[8]"])
    bundle = build_model(cfg.model, LABELS)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in bundle.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(bundle, out)
    (out / "config.json").write_text(to_json(cfg))
    return out, bundle


def test_merged_export_computes_what_the_adapter_computes(trained_adapter, tmp_path):
    adapter_dir, bundle = trained_adapter
    merged = load_merged(export_merged(adapter_dir, tmp_path / "served"))
    assert not any("lora_" in n for n, _ in merged.model.named_parameters())
    batch = random_batch(8)
    cpu = torch.device("cpu")
    np.testing.assert_allclose(predict(merged, batch, device=cpu).numpy(),
                               predict(bundle, batch, device=cpu).numpy(), rtol=1e-4, atol=1e-5)


def test_predict_writes_label_names_also_for_a_manifest_without_labels(trained_adapter,
                                                                       tmp_path):
    adapter_dir, _ = trained_adapter
    _, test = generate(tmp_path / "demo", 4, 6, seed=0)
    rows = list(csv.DictReader(test.open()))
    unlabelled = test.with_name("new.csv")
    with unlabelled.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "preds.csv"
    assert predict_manifest(load_for_inference(adapter_dir), unlabelled, out, "cpu") == 6
    preds = list(csv.DictReader(out.open()))
    assert [p["text"] for p in preds] == [r["text"] for r in rows]
    assert all(p["prediction"] in LABELS and 0 < float(p["confidence"]) <= 1 for p in preds)
    assert "label" not in preds[0]


def test_rng_state_round_trips_through_json():
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_last_checkpoint_is_the_newest_complete_round(tmp_path):
    for n in (1, 2, 3):
        (tmp_path / "adapters" / f"round-{n:03d}").mkdir(parents=True)
    write_meta(tmp_path / "adapters" / "round-001", 1)
    write_meta(tmp_path / "adapters" / "round-002", 2)  # round 3 has no checkpoint.json
    (tmp_path / "adapters" / ".round-004-tmp").mkdir()
    assert last_checkpoint(tmp_path) == (2, tmp_path / "adapters" / "round-002")
    assert last_checkpoint(tmp_path / "empty") is None


def test_resume_keeps_metrics_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"round": r, "test_accuracy": r / 10}) + "\n"
                            for r in range(4)))
    assert [r["round"] for r in kept_rows(path, 2)] == [0, 1, 2]


def test_an_audio_model_predicts_evaluates_and_exports_from_its_manifest(
        tmp_path, tiny_text_dir, tiny_whisper_dir):
    from common.config import from_json
    from common.inference import evaluate_manifest
    from common.task import resolve_data

    demo = tmp_path / "demo"
    cfg = resolve_data(load_config(tiny_overrides(tiny_text_dir, audio_dir=tiny_whisper_dir,
                                                  modalities="text,audio") + [
        f"data.demo_dir={demo}", "data.demo_train=24", "data.demo_test=12",
        "data.demo_audio=true"]))
    bundle = build_model(cfg.model, list(cfg.data.labels))
    with torch.no_grad():
        for name, p in bundle.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = save_adapter(bundle, tmp_path / "adapter")
    (adapter / "config.json").write_text(to_json(cfg))
    assert from_json(to_json(cfg)).model.modalities == ("text", "audio")
    loaded = load_for_inference(adapter)
    out = tmp_path / "preds.csv"
    assert predict_manifest(loaded, cfg.data.test, out, "cpu") == 12
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["text", "audio", "prediction", "confidence", "label"]  # no image
    scores = evaluate_manifest(loaded, cfg.data.test, "cpu")
    assert scores["num_examples"] == 12 and 0 <= scores["accuracy"] <= 1
    merged = load_merged(export_merged(adapter, tmp_path / "served"))
    assert "audio" in merged.towers and not any("lora_" in n for n, _ in
                                                merged.model.named_parameters())
    assert evaluate_manifest(merged, cfg.data.test, "cpu")["loss"] == pytest.approx(
        scores["loss"], rel=1e-4)
