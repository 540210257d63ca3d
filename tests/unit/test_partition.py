"""Partitions come from flwr-datasets, are reproducible from a seed, and refuse bad splits."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from common.config import ConfigError, PartitionConfig
from common.partition import label_counts, partition_indices


def _dataset(n: int = 600, classes: int = 6) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    return datasets.Dataset.from_dict({"label": [f"c{i}" for i in rng.integers(0, classes, n)]})


def _cfg(**kw) -> PartitionConfig:
    base = dict(name="dirichlet", num_clients=8, alpha=0.5, min_partition_size=10,
                classes_per_client=2, power=1.0, column="site", on_small="refuse")
    return PartitionConfig(**{**base, **kw})


def test_same_seed_same_assignment_other_seed_differs():
    ds = _dataset()
    assert partition_indices(ds, _cfg(), 7) == partition_indices(ds, _cfg(), 7)
    assert partition_indices(ds, _cfg(), 7) != partition_indices(ds, _cfg(), 8)


@pytest.mark.parametrize("name", ["iid", "dirichlet"])
def test_partitions_cover_every_row_exactly_once(name):
    ds = _dataset()
    parts = partition_indices(ds, _cfg(name=name), 0)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(ds)))


def test_smaller_alpha_gives_more_label_skew():
    ds = _dataset(1200)
    names = sorted(set(ds["label"]))

    def mean_max_share(alpha: float) -> float:
        counts = label_counts(ds, partition_indices(ds, _cfg(alpha=alpha), 0), names)
        return float(np.mean([max(c.values()) / sum(c.values()) for c in counts]))

    assert mean_max_share(0.1) > mean_max_share(100.0) + 0.2
    iid = label_counts(ds, partition_indices(ds, _cfg(name="iid"), 0), names)
    assert max(max(c.values()) / sum(c.values()) for c in iid) < 0.4


def test_fewer_samples_than_clients_is_refused():
    with pytest.raises(ConfigError, match="partition.num_clients"):
        partition_indices(_dataset(5), _cfg(num_clients=8, min_partition_size=0), 0)


def test_unsatisfiable_minimum_size_is_refused_with_advice():
    with pytest.raises(ConfigError, match="partition"):
        partition_indices(_dataset(100), _cfg(num_clients=8, alpha=0.05,
                                              min_partition_size=12), 0)
