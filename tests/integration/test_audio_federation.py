"""Small real three-modality federations through `flwr run`, on tiny towers.

The model's modalities are left unset, so they follow the manifest's columns (image, text,
audio); one of three sites holds no audio. The final adapter reloads with PEFT and reproduces
the server's accuracy. (SecAgg+ sums whatever arrays the adapter has: tests/integration/
test_privacy_federation.py covers it on two modalities.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import PeftModel
from safetensors import safe_open

from common.config import load_config
from common.demo_data import generate
from common.model import Bundle, build_backbone, read_label_names
from common.task import load_test_split
from common.train import evaluate
from simulations.federation import launch, prepare
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_text_dir, tiny_whisper_dir):
    root = tmp_path_factory.mktemp("audio-fed")
    train, test = generate(root / "site-data", 120, 36, seed=2, audio=True)

    def federation(name: str, *overrides: str) -> tuple:
        cfg = prepare(load_config([
            "data=manifest", f"data.train={train}", f"data.test={test}", "partition=iid",
            "partition.num_clients=3", "strategy.rounds=2", "train.epochs=1",
            "strategy.min_train_nodes=3", "skew.missing_audio_clients=0.34",
            f"output_dir={root / name}", "simulation.timeout_s=600",
            *tiny_overrides(tiny_text_dir, audio_dir=tiny_whisper_dir, modalities=None),
            *overrides]))
        return cfg, launch(cfg)

    return federation


@pytest.fixture(scope="module")
def plain(run):
    return run("plain")


def test_modalities_follow_the_manifest_and_a_site_without_audio_is_reported(plain):
    cfg, summary = plain
    out = Path(cfg.output_dir)
    assert json.loads((out / "config.json").read_text())["model"]["modalities"] == [
        "image", "text", "audio"]
    sites = json.loads((out / "partition.json").read_text())["sites"]
    assert [s["modality"]["audio_present"] for s in sites] == [0.0, 1.0, 1.0]
    assert all(s["modality"]["image_present"] == 1.0 for s in sites)
    assert summary["rounds"] == 2 and summary["rounds_without_updates"] == 0
    with safe_open(str(Path(summary["adapter_dir"]) / "adapter_model.safetensors"), "pt") as f:
        assert any("towers.audio" in k and "lora_A" in k for k in f.keys())


def test_the_three_modality_adapter_reloads_and_reproduces_the_servers_accuracy(plain):
    cfg, summary = plain
    names = read_label_names(summary["adapter_dir"])
    assert len(names) == 12
    backbone, _ = build_backbone(cfg.model, len(names))
    model = PeftModel.from_pretrained(backbone, summary["adapter_dir"])
    result = evaluate(Bundle(model, names, cfg.model), load_test_split(cfg))
    assert result["accuracy"] == summary["test_accuracy"]

