"""A small real federation through `flwr run` on Flower's simulation engine.

The final adapter is then loaded with PEFT's own loader onto a freshly built default backbone,
and must reproduce the accuracy the server reported, exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import PeftModel

from common.config import load_config
from common.demo_data import generate
from common.model import Bundle, build_backbone, image_stats, read_label_names
from common.task import load_test_split
from common.train import evaluate
from simulations.run import launch, prepare


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    train, test = generate(root / "site-data", 240, 60, seed=1)  # any manifest would do
    cfg = load_config(["data=manifest", f"data.train={train}", f"data.test={test}",
                       "partition.num_clients=4",
                       "partition.min_partition_size=10", "strategy.rounds=2",
                       "strategy.min_train_nodes=3", "strategy.fraction_train=0.75",
                       "strategy.fraction_evaluate=0.5", f"output_dir={root / 'run'}",
                       "simulation.timeout_s=600"])
    cfg = prepare(cfg)
    return cfg, launch(cfg)


def test_run_folder_holds_summary_metrics_config_and_adapters(federation):
    cfg, summary = federation
    out = cfg.output_dir
    for key in ("test_accuracy", "test_macro_f1", "rounds", "num_clients", "bytes_uploaded",
                "backbone_bytes", "wall_time_s", "adapter_dir"):
        assert key in summary
    assert summary["rounds"] == 2 and summary["num_clients"] == 4
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["sampled"] == 3 and r["replied"] == 3 for r in rows[1:])  # 0.75 of 4 nodes
    assert json.load(open(f"{out}/config.json"))["partition"]["num_clients"] == 4
    for name in ("adapters/round-001", "adapters/round-002", "adapter"):
        assert Path(out, name, "adapter_config.json").is_file(), name
        assert Path(out, name, "adapter_model.safetensors").is_file(), name


def test_upload_per_client_round_is_under_one_percent_of_the_backbone(federation):
    _, summary = federation
    assert summary["bytes_uploaded"] == 2 * 3 * summary["bytes_uploaded_per_client_round"]
    assert summary["bytes_uploaded_per_client_round"] < 0.01 * summary["backbone_bytes"]


def test_final_adapter_reloads_with_peft_and_reproduces_the_reported_accuracy(federation):
    cfg, summary = federation
    fresh_cfg = load_config([])  # the default backbone, built from scratch
    names = read_label_names(summary["adapter_dir"])
    backbone, extras = build_backbone(fresh_cfg.model, len(names))
    model = PeftModel.from_pretrained(backbone, summary["adapter_dir"])
    mean, std = image_stats(fresh_cfg.model)
    bundle = Bundle(model, extras["tokenizer"], names, fresh_cfg.model.vision.image_size,
                    mean, std, fresh_cfg.model.text.max_length)
    result = evaluate(bundle, load_test_split(bundle, cfg.data.test))
    assert result["accuracy"] == summary["test_accuracy"]
    assert result["macro_f1"] == summary["test_macro_f1"]
