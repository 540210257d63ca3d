"""A small real federation through `flwr run` on Flower's simulation engine.

The final adapter is then loaded with PEFT's own loader onto a freshly built default backbone,
and must reproduce the accuracy the server reported, exactly.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from peft import PeftModel
from safetensors.numpy import load_file

from common.config import load_config
from common.demo_data import generate
from common.model import Bundle, build_backbone, read_label_names
from common.task import load_test_split
from common.train import evaluate
from simulations.federation import launch, prepare


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    train, test = generate(root / "site-data", 240, 60, seed=1)  # any manifest would do
    cfg = load_config(["data=manifest", f"data.train={train}", f"data.test={test}",
                       "partition.num_clients=4",
                       "partition.min_partition_size=10", "strategy.rounds=2",
                       "strategy.min_train_nodes=3", "strategy.fraction_train=1.0",
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
    assert all(r["sampled"] == 4 and r["replied"] == 4 for r in rows[1:])
    assert json.load(open(f"{out}/config.json"))["partition"]["num_clients"] == 4
    for name in ("adapters/round-001", "adapters/round-002", "adapter"):
        assert Path(out, name, "adapter_config.json").is_file(), name
        assert Path(out, name, "adapter_model.safetensors").is_file(), name


def test_upload_per_client_round_stays_under_the_cap(federation):
    _, summary = federation
    assert summary["bytes_uploaded"] == 2 * 4 * summary["bytes_uploaded_per_client_round"]
    assert summary["bytes_uploaded_per_client_round"] <= 1_500_000  # LoRA + projected head
    assert summary["bytes_uploaded_per_client_round"] < 0.02 * summary["backbone_bytes"]


def test_final_adapter_reloads_with_peft_and_reproduces_the_reported_accuracy(federation):
    cfg, summary = federation
    fresh_cfg = load_config(["model.modalities=[image,text]"])  # the default backbone, anew
    names = read_label_names(summary["adapter_dir"])
    backbone, _ = build_backbone(fresh_cfg.model, len(names))
    model = PeftModel.from_pretrained(backbone, summary["adapter_dir"])
    result = evaluate(Bundle(model, names, fresh_cfg.model), load_test_split(cfg))
    assert result["accuracy"] == summary["test_accuracy"]
    assert result["macro_f1"] == summary["test_macro_f1"]


def test_same_config_and_seed_give_the_same_bits(federation):
    """Rerun the identical federation: the same metrics and the same adapter, bit for bit.

    Sites reply in whatever order they finish; the server aggregates them in content order
    (README, "Determinism"). Every site trains every round here: Flower samples among node
    ids that are random per run.
    """
    cfg, _ = federation
    again = replace(cfg, output_dir=str(Path(cfg.output_dir).with_name("run-again")))
    launch(again)
    first = [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]
    second = [json.loads(line) for line in open(f"{again.output_dir}/metrics.jsonl")]
    assert len(first) == len(second) == 3
    for a, b in zip(first, second):
        for key in ("test_accuracy", "test_loss", "test_macro_f1", "train_loss"):
            assert a.get(key) == b.get(key), (a["round"], key)
    adapters = [load_file(f"{out}/adapter/adapter_model.safetensors")
                for out in (cfg.output_dir, again.output_dir)]
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        np.testing.assert_array_equal(adapters[0][key], adapters[1][key], err_msg=key)
