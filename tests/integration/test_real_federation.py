"""A natural federation as data comes: a long-tailed `hospital` column, per-site results, and
personal adapters (finetune), in one real `flwr run` on tiny towers.

Per-site figures are checked against independent references: the saved global adapter reloaded
with `PeftModel.from_pretrained` on each site's held-out rows, scikit-learn's macro-F1, NumPy
means; each site's personal adapter is reloaded the same way.
"""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from peft import PeftModel
from sklearn.metrics import f1_score

from common.config import load_config
from common.demo_data import generate
from common.model import Bundle, build_backbone, read_label_names
from common.data import encode, load_manifest
from common.task import input_encoding, partition_site_name, site_data
from common.train import predict
from simulations.federation import launch, prepare
from tests.conftest import tiny_overrides

# two sites of 30 rows and a long tail: two 1-row, a 3-row and a 5-row site (merged: 10)
HOSPITALS = ["h-a"] * 30 + ["h-b"] * 30 + ["t-1", "t-2"] + ["t-3"] * 3 + ["t-4"] * 5


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_text_dir):
    root = tmp_path_factory.mktemp("realfed")
    train, test = generate(root / "demo", len(HOSPITALS), 30, seed=3)
    with train.open() as f:
        rows = list(csv.DictReader(f))
    manifest = root / "hospitals.csv"  # the demo's own `site` column stays, as an extra column
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, [*rows[0], "hospital"])
        writer.writeheader()
        for row, hospital in zip(rows, HOSPITALS):
            writer.writerow({**row, "image": str(train.parent / row["image"]),
                             "hospital": hospital})
    cfg = prepare(load_config([
        *tiny_overrides(tiny_text_dir), "data=manifest", f"data.train={manifest}",
        f"data.test={test}", "partition=natural", "partition.column=hospital",
        "partition.min_partition_size=10", "partition.holdout_fraction=0.34",
        "personalization=finetune", "personalization.epochs=3", "strategy.rounds=1",
        "train.epochs=1", "strategy.min_train_nodes=2", f"output_dir={root / 'run'}",
        "simulation.timeout_s=600"]))
    return cfg, launch(cfg)


def _reload(cfg, adapter_dir) -> Bundle:
    names = read_label_names(adapter_dir)
    backbone, _ = build_backbone(cfg.model, len(names))
    return Bundle(PeftModel.from_pretrained(backbone, str(adapter_dir)), names, cfg.model)


def _held_out(cfg) -> dict:
    return {partition_site_name(cfg, i): site_data(cfg, train_manifest=cfg.data.train,
                                                   partition_id=i)[1]
            for i in range(cfg.partition.num_clients)}


def test_the_long_tail_is_merged_into_other_and_the_site_count_derived(federation):
    cfg, summary = federation
    assert cfg.partition.num_clients == 3 and summary["num_clients"] == 3
    report = json.loads(Path(cfg.output_dir, "partition.json").read_text())
    assert [s["name"] for s in report["sites"]] == ["h-a", "h-b", "other"]
    assert [s["size"] for s in report["sites"]] == [30, 30, 10]
    assert report["small_sites"] == {"merged_into": "other",
                                     "merged": ["t-1", "t-2", "t-3", "t-4"],
                                     "dropped": [], "dropped_rows": 0}


def test_per_site_figures_match_the_reloaded_global_adapter(federation):
    cfg, summary = federation
    rows = [json.loads(line) for line in open(Path(cfg.output_dir, "metrics.jsonl"))]
    assert "sites" not in rows[0] and all(set(r["sites"]) == {"h-a", "h-b", "other"}
                                          for r in rows[1:])
    bundle = _reload(cfg, summary["adapter_dir"])
    held_out = _held_out(cfg)
    assert {n: len(d) for n, d in held_out.items()} == {"h-a": 10, "h-b": 10,
                                                         "other": 3}  # 0.34 of each, rounded
    for name, data in held_out.items():
        y_pred, y_true = predict(bundle, data).argmax(-1).numpy(), data.labels.numpy()
        site = summary["sites"][name]
        assert site["num_examples"] == len(data)
        assert site["accuracy"] == pytest.approx(float(np.mean(y_pred == y_true)), abs=1e-9)
        assert site["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"),
                                                 abs=1e-9)
    accuracies = [s["accuracy"] for s in summary["sites"].values()]
    assert summary["site_accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert summary["site_accuracy_worst"] == min(accuracies)
    assert summary["site_accuracy_spread"] == pytest.approx(max(accuracies) - min(accuracies))
    assert summary["sites"][summary["site_accuracy_worst_site"]]["accuracy"] == min(accuracies)
    assert Path(cfg.output_dir, "per_site.png").stat().st_size > 0


def test_each_site_keeps_a_personal_adapter_that_reproduces_its_reported_figures(federation):
    cfg, summary = federation
    assert summary["personalization"] == "finetune"
    for name, data in _held_out(cfg).items():
        folder = Path(cfg.output_dir, "sites", name, "personal-adapter")
        y_pred = predict(_reload(cfg, folder), data).argmax(-1).numpy()
        site = summary["sites"][name]
        assert site["personal_accuracy"] == pytest.approx(
            float(np.mean(y_pred == data.labels.numpy())), abs=1e-9)
        assert summary["personal_gain"][name] == pytest.approx(
            site["personal_accuracy"] - site["accuracy"])


def test_fedmm_evaluate_reports_the_same_per_site_figures(federation, tmp_path):
    """A site scores the global adapter on its own manifest: per site of a column, and only
    the rows it held out (`--held-out`), as the run split them."""
    from launcher.cli import main as fedmm

    def main(argv: list[str]) -> int:  # the CLI in-process, leaving pytest's SIGTERM as it was
        saved = signal.getsignal(signal.SIGTERM)
        try:
            return fedmm(argv)
        finally:
            signal.signal(signal.SIGTERM, saved)

    cfg, summary = federation
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--adapter", summary["adapter_dir"], "--data", cfg.data.train,
                 "--site-column", "hospital", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert sorted(result["sites"]) == sorted(set(HOSPITALS))  # the raw column, tail included
    bundle = _reload(cfg, summary["adapter_dir"])
    ds, _ = load_manifest(cfg.data.train, modalities=cfg.model.modalities)
    data = encode(ds, cfg.data.labels, input_encoding(cfg.model))
    y_pred, y_true = predict(bundle, data).argmax(-1).numpy(), data.labels.numpy()
    column = np.array(ds["hospital"])
    for name, site in result["sites"].items():
        rows = column == name
        assert site["accuracy"] == pytest.approx(float(np.mean(y_pred[rows] == y_true[rows])))
    accuracies = [s["accuracy"] for s in result["sites"].values()]
    assert result["site_accuracy_worst"] == min(accuracies)
    assert result["site_accuracy_mean"] == pytest.approx(np.mean(accuracies))
    # one site alone, held-out rows only: what the federation reported for a deployed site
    site_csv = tmp_path / "h-b.csv"
    with open(cfg.data.train) as f, site_csv.open("w", newline="") as g:
        reader = csv.DictReader(f)
        writer = csv.DictWriter(g, reader.fieldnames)
        writer.writeheader()
        writer.writerows(r for r in reader if r["hospital"] == "h-b")
    assert main(["evaluate", "--adapter", summary["adapter_dir"], "--data", str(site_csv),
                 "--held-out", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    held = site_data(cfg, train_manifest=str(site_csv))[1]  # a deployed site's split
    y_pred = predict(bundle, held).argmax(-1).numpy()
    assert result["num_examples"] == len(held) == 10
    assert result["accuracy"] == pytest.approx(float(np.mean(y_pred == held.labels.numpy())))
    assert result["macro_f1"] == pytest.approx(
        f1_score(held.labels.numpy(), y_pred, average="macro"))
