"""Partitions come from flwr-datasets, are reproducible from a seed, and refuse bad splits."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from common.config import ConfigError, PartitionConfig
from common.partition import (
    label_counts,
    partition_indices,
    power_law_sizes,
    rebalance,
    site_names,
)

SEEDED = ["iid", "dirichlet", "pathological", "quantity"]
KINDS = [*SEEDED, "natural"]


def _dataset(n: int = 600, classes: int = 6, sites: int = 4) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    return datasets.Dataset.from_dict({
        "label": [f"c{i}" for i in rng.integers(0, classes, n)],
        "site": [f"hospital-{i}" for i in rng.integers(0, sites, n)],
    })


def _cfg(**kw) -> PartitionConfig:
    base = dict(name="dirichlet", num_clients=8, alpha=0.5, min_partition_size=10,
                classes_per_client=2, power=1.0, column="site", holdout_fraction=0.1, on_small="refuse")
    if kw.get("name") == "natural":
        base["num_clients"] = 4
    return PartitionConfig(**{**base, **kw})


def _sizes(parts: list[list[int]]) -> list[int]:
    return [len(p) for p in parts]


@pytest.mark.parametrize("name", SEEDED)
def test_same_seed_same_assignment_other_seed_differs(name):
    ds = _dataset()
    assert partition_indices(ds, _cfg(name=name), 7) == partition_indices(ds, _cfg(name=name), 7)
    sets = [[set(p) for p in partition_indices(ds, _cfg(name=name), s)] for s in (7, 8)]
    assert sets[0] != sets[1]  # membership differs, not just the order within a site


def test_natural_is_seed_free():
    ds = _dataset()
    assert partition_indices(ds, _cfg(name="natural"), 0) == \
        partition_indices(ds, _cfg(name="natural"), 99)


@pytest.mark.parametrize("name", KINDS)
def test_partitions_cover_every_row_exactly_once(name):
    ds = _dataset()
    parts = partition_indices(ds, _cfg(name=name), 0)
    assert len(parts) == _cfg(name=name).num_clients
    assert sorted(i for p in parts for i in p) == list(range(len(ds)))


def test_smaller_alpha_gives_more_label_skew():
    ds = _dataset(1200)
    names = sorted(set(ds["label"]))

    def mean_max_share(alpha: float) -> float:
        counts = label_counts(ds, partition_indices(ds, _cfg(alpha=alpha), 0), names)
        return float(np.mean([max(c.values()) / sum(c.values()) for c in counts]))

    assert mean_max_share(0.1) > mean_max_share(100.0) + 0.2
    iid = label_counts(ds, partition_indices(ds, _cfg(name="iid"), 0), names)
    assert max(max(c.values()) / sum(c.values()) for c in iid) < 0.4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_sites_hold_at_most_classes_per_client_labels(k):
    ds = _dataset()
    names = sorted(set(ds["label"]))
    counts = label_counts(ds, partition_indices(ds, _cfg(name="pathological",
                                                         classes_per_client=k), 0), names)
    held = [{n for n, c in site.items() if c} for site in counts]
    assert all(len(h) <= k for h in held)
    assert set().union(*held) == set(names)  # no label is left on no site


def test_pathological_seed_changes_which_labels_a_site_holds():
    ds = _dataset()
    names = sorted(set(ds["label"]))

    def site0_labels(seed: int) -> frozenset[str]:
        site0 = label_counts(ds, partition_indices(ds, _cfg(name="pathological"), seed),
                             names)[0]
        return frozenset(n for n, c in site0.items() if c)

    assert len({site0_labels(s) for s in range(6)}) > 1


@pytest.mark.parametrize("kw, key", [(dict(classes_per_client=7), "classes_per_client"),
                                     (dict(num_clients=3), "classes_per_client")])
def test_pathological_impossible_class_counts_are_refused(kw, key):
    with pytest.raises(ConfigError, match=f"^partition.{key}"):
        partition_indices(_dataset(), _cfg(name="pathological", **kw), 0)


def test_power_law_sizes_sum_to_rows_and_stay_positive():
    for n, k, power in [(600, 8, 1.0), (100, 10, 3.0), (10, 10, 5.0), (57, 3, 0.0)]:
        sizes = power_law_sizes(n, k, power)
        assert sum(sizes) == n and min(sizes) >= 1 and sizes == sorted(sizes, reverse=True)
    assert power_law_sizes(80, 8, 0.0) == [10] * 8


def test_quantity_sizes_decrease_and_skew_grows_with_power():
    ds = _dataset(2000)

    def sizes(power: float) -> list[int]:
        return _sizes(partition_indices(ds, _cfg(name="quantity", power=power), 0))

    ratios = []
    for power in (0.5, 1.0, 1.5):
        s = sizes(power)
        assert all(a > b for a, b in zip(s, s[1:]))
        ratios.append(s[0] / s[-1])
    assert ratios[0] < ratios[1] < ratios[2]


def test_natural_sites_follow_the_sorted_column_values():
    ds = _dataset()
    cfg = _cfg(name="natural")
    parts = partition_indices(ds, cfg, 0)
    names = site_names(ds, cfg)
    assert names == [f"hospital-{i}" for i in range(4)]
    column = ds["site"][:]
    for name, part in zip(names, parts):
        assert {column[i] for i in part} == {name}
    assert site_names(ds, _cfg()) == [f"site-{i}" for i in range(8)]


def test_natural_site_count_follows_the_column_not_num_clients():
    parts = partition_indices(_dataset(sites=12), _cfg(name="natural", num_clients=5), 0)
    assert len(parts) == 12 and sorted(i for p in parts for i in p) == list(range(600))


def test_natural_missing_column_names_partition_column():
    with pytest.raises(ConfigError, match=r"^partition.column='region'"):
        partition_indices(_dataset(), _cfg(name="natural", column="region"), 0)
    with pytest.raises(ConfigError, match=r"^partition.column"):
        site_names(_dataset(), _cfg(name="natural", column="region"))


def test_small_sites_refused_or_rebalanced():
    ds = _dataset()
    cfg = dict(name="quantity", power=2.0, min_partition_size=10)
    with pytest.raises(ConfigError, match=r"^partition.min_partition_size=10.*'site-7'"):
        partition_indices(ds, _cfg(**cfg), 0)
    parts = partition_indices(ds, _cfg(**cfg, on_small="rebalance"), 0)
    assert parts == partition_indices(ds, _cfg(**cfg, on_small="rebalance"), 0)
    assert min(_sizes(parts)) == 10 and sum(_sizes(parts)) == len(ds)
    assert sorted(i for p in parts for i in p) == list(range(len(ds)))


def test_dirichlet_rebalance_succeeds_where_refuse_fails():
    ds = _dataset(100)
    cfg = dict(num_clients=8, alpha=0.05, min_partition_size=12)
    with pytest.raises(ConfigError, match="partition"):
        partition_indices(ds, _cfg(**cfg), 0)
    parts = partition_indices(ds, _cfg(**cfg, on_small="rebalance"), 0)
    assert min(_sizes(parts)) >= 12
    assert sorted(i for p in parts for i in p) == list(range(len(ds)))


def test_impossible_rebalance_and_natural_rebalance_are_refused():
    with pytest.raises(ConfigError, match=r"^partition.min_partition_size=80.*8 sites x 80"):
        partition_indices(_dataset(), _cfg(name="iid", min_partition_size=80,
                                           on_small="rebalance"), 0)
    with pytest.raises(ConfigError, match=r"^partition.min_partition_size.*on_small=merge"):
        partition_indices(_dataset(), _cfg(name="natural", min_partition_size=200,
                                           on_small="rebalance"), 0)


def test_rebalance_moves_labels_the_small_site_already_holds():
    labels = ["a"] * 10 + ["b"] * 10 + ["a"]
    parts = rebalance([list(range(20)), [20]], 5, labels, seed=0)
    assert len(parts[1]) == 5 and {labels[i] for i in parts[1]} == {"a"}
    assert sorted(parts[0] + parts[1]) == list(range(21))


def test_fewer_samples_than_clients_is_refused():
    with pytest.raises(ConfigError, match="partition.num_clients"):
        partition_indices(_dataset(5), _cfg(num_clients=8, min_partition_size=0), 0)


def test_restricted_softmax_note_names_the_sites_that_lack_a_class():
    """The run log says where the restricted softmax acts: pathological sites (2 of 6 labels)
    each lack classes, IID sites of 600 rows hold all six and leave it inert."""
    from simulations.federation import restricted_softmax_note

    ds, names = _dataset(), [f"c{i}" for i in range(6)]
    skewed = label_counts(ds, partition_indices(ds, _cfg(name="pathological"), 0), names)
    note = restricted_softmax_note(0.0, skewed)
    assert "acts at the 8 of 8 sites that lack a class (0, 1, 2, 3, 4, 5, 6, 7)" in note
    iid = label_counts(ds, partition_indices(ds, _cfg(name="iid", num_clients=4), 0), names)
    assert restricted_softmax_note(0.0, iid).endswith("is inert: each of the 4 sites holds "
                                                      "every class")
