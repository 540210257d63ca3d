"""Centralized and local-only baselines on the same split as a federation."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import load_config
from common.data import load_manifest
from common.partition import partition_indices
from simulations.baselines import centralized, local
from simulations.federation import prepare


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    return prepare(load_config([  # frozen pretrained towers: the head learns the task quickly
        "model=lite0_minilm_dp", f"data.demo_dir={root / 'demo'}", "data.demo_train=600",
        "data.demo_test=120",
        "partition.num_clients=3", "partition.alpha=0.1", "partition.min_partition_size=20",
        "strategy.rounds=2", "train.epochs=3", "strategy.min_train_nodes=2",
        "strategy.min_available_nodes=2", f"output_dir={root / 'run'}"]))


def test_local_only_sites_fall_below_the_pooled_model_under_label_skew(skewed):
    pooled = centralized(skewed)
    alone = local(skewed)
    accuracies = alone["local_accuracies"]
    assert alone["local_mean_accuracy"] == pytest.approx(np.mean(accuracies))
    assert alone["local_worst_accuracy"] == min(accuracies)
    assert pooled["centralized_accuracy"] > alone["local_mean_accuracy"] + 0.05, (pooled, alone)
    # A site trained alone scores only on test rows of labels it holds (plus luck): its own
    # split, read independently of the baseline code, bounds each site's accuracy.
    train_ds, test_labels = load_manifest(skewed.data.train)[0], load_manifest(
        skewed.data.test)[0]["label"]
    parts = partition_indices(train_ds, skewed.partition, skewed.seed)
    for site, accuracy in enumerate(accuracies):
        held = {train_ds[i]["label"] for i in parts[site]}
        reachable = np.mean([label in held for label in test_labels])
        assert accuracy <= reachable + 0.05, (site, accuracy, reachable, sorted(held))
