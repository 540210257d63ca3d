"""The sweep comparison table and plot, from real run folders on disk."""

from __future__ import annotations

import csv
import json

from PIL import Image

from simulations.sweep import write_comparison


def _fake_run(root, name, accuracies, overrides):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    rows = [{"round": i, "test_accuracy": a} for i, a in enumerate(accuracies)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({
        "test_accuracy": accuracies[-1], "test_macro_f1": accuracies[-1] - 0.01,
        "bytes_uploaded": 6_000_000, "bytes_uploaded_per_client_round": 1_200_000,
        "site_train_s_steady": 4.25, "wall_time_s": 12.5}))


def test_table_and_plot_report_each_run(tmp_path):
    _fake_run(tmp_path, "0", [0.2, 0.5, 0.95, 0.93],
              ["strategy=fedavg", "strategy.rounds=3", "output_dir=/x"])
    _fake_run(tmp_path, "1", [0.2, 0.4, 0.6, 0.7], ["strategy=fedprox", "strategy.rounds=3"])
    paths = write_comparison(tmp_path, target_accuracy=0.9)
    assert [p.name for p in paths] == ["comparison.csv", "comparison.md", "accuracy.png"]
    rows = list(csv.DictReader(open(tmp_path / "comparison.csv")))
    assert [r["run"] for r in rows] == ["strategy=fedavg", "strategy=fedprox"]  # shared left out
    assert float(rows[0]["best_accuracy"]) == 0.95 and float(rows[0]["final_accuracy"]) == 0.93
    assert rows[0]["rounds_to_target"] == "2" and rows[1]["rounds_to_target"] == ""
    md = (tmp_path / "comparison.md").read_text()
    assert "rounds_to_0.9" in md and "not reached" in md and "6.0 MB" in md
    assert "1.20 MB" in md and "| 4.2 |" in md and rows[0]["site_round_s"] == "4.25"
    with Image.open(tmp_path / "accuracy.png") as img:
        assert img.width > 400


def test_no_finished_runs_writes_nothing(tmp_path):
    assert write_comparison(tmp_path) == []
