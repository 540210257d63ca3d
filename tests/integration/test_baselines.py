"""Centralized and local-only baselines on the same split as a federation."""

from __future__ import annotations

import pytest

from common.config import load_config
from simulations.baselines import centralized, local
from simulations.run import prepare


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    return prepare(load_config([
        f"data.demo_dir={root / 'demo'}", "data.demo_train=600", "data.demo_test=120",
        "partition.num_clients=3", "partition.alpha=0.1", "partition.min_partition_size=20",
        "strategy.rounds=2", "strategy.local_epochs=3", "strategy.min_train_nodes=2",
        "strategy.min_available_nodes=2", f"output_dir={root / 'run'}"]))


def test_local_only_sites_fall_below_the_pooled_model_under_label_skew(skewed):
    pooled = centralized(skewed)
    alone = local(skewed)
    assert len(alone["local_accuracies"]) == 3
    assert alone["local_worst_accuracy"] <= alone["local_mean_accuracy"]
    assert pooled["centralized_accuracy"] > alone["local_mean_accuracy"] + 0.05, (pooled, alone)
