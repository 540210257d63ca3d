"""The defaults sweep's table: seed means per (split, recipe), the default flagged, from real
run folders on disk (config.json as a run writes it)."""

from __future__ import annotations

import csv
import json

from PIL import Image

from common.config import load_config, to_json
from simulations.defaults_sweep import rows_of, write_tables


def _run(root, split, recipe, seed, curve, worst, overrides):
    run = root / split / f"{recipe}-seed{seed}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(to_json(load_config(overrides)))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"round": i, "test_accuracy": a}) + "\n" for i, a in enumerate(curve)))
    (run / "summary.json").write_text(json.dumps({"test_accuracy": curve[-1],
                                                  "site_accuracy_worst": worst}))


def test_seed_means_best_recipe_and_the_defaults_gap(tmp_path):
    _run(tmp_path, "alpha0.1", "plain", 0, [0.1, 0.95, 1.0], 1.0, ["train=plain"])
    _run(tmp_path, "alpha0.1", "plain", 1, [0.1, 0.5, 0.96], 0.5, ["train=plain"])
    _run(tmp_path, "alpha0.1", "label_skew", 0, [0.1, 0.4, 0.5], 0.0, ["train=label_skew"])
    rows = rows_of(tmp_path)
    plain, label_skew = rows  # in RECIPES order
    assert (plain["recipe"], plain["seeds"], plain["final_accuracy_mean"]) == ("plain", 2, 0.98)
    assert plain["worst_site_accuracy_mean"] == 0.75 and plain["rounds_to_0.9_mean"] == 1.5
    assert label_skew["rounds_to_0.9_mean"] != label_skew["rounds_to_0.9_mean"]  # never: nan
    default = load_config([]).train
    assert plain["is_default"] == (load_config(["train=plain"]).train == default)
    assert label_skew["is_default"] is False
    paths = write_tables(rows, tmp_path)
    md = (tmp_path / "defaults.md").read_text()
    assert "| 0.980 / 0.750 / 1.5 |" in md and "| 0.500 / 0.000 / — |" in md
    assert "| alpha0.1 | plain | 0.980 |" in md
    assert len(list(csv.DictReader(open(paths[0])))) == 2
    with Image.open(paths[2]) as img:
        assert img.width > 400


def test_every_listed_split_and_recipe_composes(tmp_path):
    from simulations.defaults_sweep import RECIPES, overrides_of

    for recipe, (_, splits, seeds) in RECIPES.items():
        for split in splits:
            cfg = load_config(overrides_of(split, recipe, seeds[-1], tmp_path))
            assert cfg.strategy.fraction_evaluate == 1.0, (split, recipe)
            assert cfg.output_dir == str(tmp_path / split / f"{recipe}-seed{seeds[-1]}")
