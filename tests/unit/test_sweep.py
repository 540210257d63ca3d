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


def test_worst_site_and_personal_gain_columns_and_panel(tmp_path):
    """Runs with per-site figures add the worst site's accuracy, the mean personalization gain
    and a second panel (the plot doubles in width); a run without them shows '-'."""
    _fake_run(tmp_path, "0", [0.2, 0.9], ["personalization=finetune"])
    summary = json.loads((tmp_path / "0" / "summary.json").read_text())
    summary.update(site_accuracy_worst=0.625, personal_gain_mean=0.0417)
    (tmp_path / "0" / "summary.json").write_text(json.dumps(summary))
    rows = [{"round": 0, "test_accuracy": 0.2, "site_accuracy_worst": 0.1},
            {"round": 1, "test_accuracy": 0.9, "site_accuracy_worst": 0.625}]
    (tmp_path / "0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _fake_run(tmp_path, "1", [0.2, 0.8], ["personalization=none"])
    write_comparison(tmp_path)
    table = {r["run"]: r for r in csv.DictReader(open(tmp_path / "comparison.csv"))}
    assert table["personalization=finetune"]["worst_site_accuracy"] == "0.625"
    assert table["personalization=none"]["worst_site_accuracy"] == ""
    md = (tmp_path / "comparison.md").read_text()
    assert "| 0.625 | +0.042 |" in md and "| - | - |" in md
    with Image.open(tmp_path / "accuracy.png") as wide:
        width = wide.width
    (tmp_path / "0" / "metrics.jsonl").write_text('{"round": 0, "test_accuracy": 0.2}\n')
    write_comparison(tmp_path)
    with Image.open(tmp_path / "accuracy.png") as narrow:
        assert width > 1.8 * narrow.width


def test_runs_that_differ_only_in_seed_are_averaged(tmp_path):
    for i, (train, seed, final) in enumerate([("plain", 0, 0.5), ("plain", 1, 0.7),
                                              ("prox_rs", 0, 0.9), ("prox_rs", 1, 1.0)]):
        _fake_run(tmp_path, str(i), [0.1, final], [f"train={train}", f"seed={seed}"])
    paths = write_comparison(tmp_path)
    assert [p.name for p in paths][2] == "seed_means.csv"
    means = {r["run"]: r for r in csv.DictReader(open(tmp_path / "seed_means.csv"))}
    assert means["train=plain"]["seeds"] == "2"
    assert abs(float(means["train=plain"]["final_accuracy_mean"]) - 0.6) < 1e-9
    assert float(means["train=prox_rs"]["final_accuracy_min"]) == 0.9
    assert "| train=prox_rs | 2 | 0.950 | 0.900 | 1.000 | - |" in (
        tmp_path / "comparison.md").read_text()


def test_one_seed_per_run_writes_no_seed_means(tmp_path):
    _fake_run(tmp_path, "0", [0.1, 0.5], ["train=plain", "seed=0"])
    _fake_run(tmp_path, "1", [0.1, 0.6], ["train=prox_rs", "seed=0"])
    assert "seed_means.csv" not in [p.name for p in write_comparison(tmp_path)]
