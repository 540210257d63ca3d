"""Split one training set into per-site partitions with flwr-datasets partitioners.

The same data, config and seed always give the same assignment, so every simulated site (in
whatever worker process) computes its own partition independently and identically. Kinds:
`iid`, `dirichlet` (label skew), `pathological` (each site holds `classes_per_client` labels),
`quantity` (power-law site sizes, IID labels) and `natural` (one site per value of any manifest
column, seed-free; their count sets `num_clients`). A site below `min_partition_size` is
refused or, with `on_small=rebalance` (synthetic splits), topped up with seeded rows from the
largest sites; small natural sites are merged into one `other` site (`on_small=merge`) or
dropped (`on_small=drop`), as the partition report shows.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import datasets
import numpy as np

from common.config import ConfigError, PartitionConfig

if TYPE_CHECKING:  # flwr_datasets imports seaborn: ~1 s of every command's start, so lazily
    from flwr_datasets.partitioner import Partitioner

OTHER = "other"           # natural, on_small=merge: the site the small sites' rows join
ROW_ID = "_row_id"        # original row index, carried through every partitioner
LABEL_KEY = "_label_key"  # pathological: a seeded rank per label, so class assignment is seeded
SHUFFLED = ("iid", "pathological", "quantity")  # rows shuffled with the seed before splitting
ADVICE = {
    "dirichlet": "raise partition.alpha or lower partition.min_partition_size/num_clients",
    "pathological": "lower partition.num_clients or partition.classes_per_client",
}


def _labels(ds: datasets.Dataset) -> list[str]:
    """Return the label column as a plain list (datasets 4 `Column` indexing is per-row slow)."""
    return list(ds["label"][:])


def power_law_sizes(num_rows: int, num_sites: int, power: float) -> list[int]:
    """Split `num_rows` into non-increasing site sizes ∝ (i + 1) ** -power, each >= 1."""
    shares = np.arange(1, num_sites + 1, dtype=float) ** -power
    raw = shares / shares.sum() * (num_rows - num_sites)  # one row per site is reserved
    sizes = np.floor(raw).astype(int) + 1
    extra = num_rows - int(sizes.sum())  # largest remainders first; keeps sizes non-increasing
    sizes[np.argsort(-(raw - np.floor(raw)), kind="stable")[:extra]] += 1
    return [int(s) for s in sizes]


def make_partitioner(cfg: PartitionConfig, seed: int, num_rows: int) -> Partitioner:
    """Return the flwr-datasets partitioner that `cfg` names."""
    from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner,
                                           PathologicalPartitioner, SizePartitioner)
    if cfg.name == "iid":
        return IidPartitioner(num_partitions=cfg.num_clients)
    if cfg.name == "pathological":
        return PathologicalPartitioner(num_partitions=cfg.num_clients, partition_by=LABEL_KEY,
                                       num_classes_per_partition=cfg.classes_per_client,
                                       class_assignment_mode="deterministic", shuffle=True,
                                       seed=seed)
    if cfg.name == "quantity":
        return SizePartitioner(power_law_sizes(num_rows, cfg.num_clients, cfg.power))
    min_size = cfg.min_partition_size if cfg.on_small == "refuse" else 0
    return DirichletPartitioner(num_partitions=cfg.num_clients, partition_by="label",
                                alpha=cfg.alpha, min_partition_size=min_size,
                                self_balancing=False, shuffle=True, seed=seed)


@dataclass(frozen=True)
class NaturalSites:
    """A natural split: the sites, each column value's site, and what on_small did."""

    names: tuple[str, ...]             # the sites, sorted; their count is num_clients
    site_of: dict[str, str | None]     # column value -> its site (None: its rows are dropped)
    merged: tuple[str, ...] = ()       # values below min_partition_size merged into OTHER
    dropped: tuple[str, ...] = ()      # values below min_partition_size dropped
    dropped_rows: int = 0

    def report(self) -> dict:
        """What the partition report shows about small sites."""
        return {"merged_into": OTHER if self.merged else None, "merged": list(self.merged),
                "dropped": list(self.dropped), "dropped_rows": self.dropped_rows}


def natural_sites(ds: datasets.Dataset, cfg: PartitionConfig) -> NaturalSites:
    """Group rows by `cfg.column`: one site per value, small ones merged/dropped per on_small."""
    if cfg.column not in ds.column_names:
        raise ConfigError(f"partition.column={cfg.column!r} is not a column of the training "
                          f"data (columns: {sorted(c for c in ds.column_names if c != ROW_ID)})")
    counts = Counter(str(v) if v is not None else "" for v in ds[cfg.column][:])
    if "" in counts:
        raise ConfigError(f"partition.column={cfg.column!r} has {counts['']} empty values; "
                          f"every row needs a site")
    target = max(cfg.min_partition_size, 1)
    small = sorted(v for v, n in counts.items() if n < target)
    site_of: dict[str, str | None] = {v: v for v in counts}
    if small and cfg.on_small not in ("merge", "drop"):
        raise ConfigError(f"partition.min_partition_size={cfg.min_partition_size} not met by "
                          f"{len(small)} natural sites {small[:5]}; set partition.on_small="
                          f"merge (one {OTHER!r} site) or drop, or lower the minimum")
    merged, dropped = (tuple(small), ()) if cfg.on_small == "merge" else ((), tuple(small))
    for v in small:
        site_of[v] = OTHER if merged else None
    if merged and (n := sum(counts[v] for v, s in site_of.items() if s == OTHER)) < target:
        raise ConfigError(f"partition.min_partition_size={cfg.min_partition_size} not met by "
                          f"the {OTHER!r} site merged from {len(merged)} small sites ({n} rows); "
                          f"set partition.on_small=drop or lower the minimum")
    names = tuple(sorted({s for s in site_of.values() if s is not None}))
    if not names:
        raise ConfigError(f"partition.min_partition_size={cfg.min_partition_size} not met by "
                          f"any of the {len(counts)} values of column {cfg.column!r}")
    return NaturalSites(names, site_of, merged, dropped, sum(counts[v] for v in dropped))


def site_names(ds: datasets.Dataset, cfg: PartitionConfig) -> list[str]:
    """Return each partition's site name: its column value for natural, else `site-<i>`."""
    if cfg.name == "natural":
        return list(natural_sites(ds, cfg).names)
    return [f"site-{i}" for i in range(cfg.num_clients)]


def _natural_parts(ds: datasets.Dataset, cfg: PartitionConfig) -> list[list[int]]:
    """Each natural site's row indices (rows of dropped values on no site)."""
    plan = natural_sites(ds, cfg)
    slot = {name: i for i, name in enumerate(plan.names)}
    parts: list[list[int]] = [[] for _ in plan.names]
    for i, v in enumerate(ds[cfg.column][:]):
        if (site := plan.site_of[str(v)]) is not None:
            parts[slot[site]].append(i)
    return parts


def _check_pathological(ds: datasets.Dataset, cfg: PartitionConfig) -> None:
    """Refuse class counts that flwr-datasets cannot honour or that would drop labels."""
    num_labels = len(ds.unique("label"))
    k = cfg.classes_per_client
    if k > num_labels:
        raise ConfigError(f"partition.classes_per_client={k} must be <= the {num_labels} "
                          f"labels in the training data")
    if cfg.num_clients + k - 1 < num_labels:
        raise ConfigError(f"partition.classes_per_client={k} with partition.num_clients="
                          f"{cfg.num_clients} leaves some of the {num_labels} labels on no "
                          f"site; need num_clients + classes_per_client - 1 >= {num_labels}")


def _prepare(ds: datasets.Dataset, cfg: PartitionConfig, seed: int) -> datasets.Dataset:
    """Add the row-id column (and pathological label keys) and shuffle rows with `seed`."""
    ds = ds.add_column(ROW_ID, list(range(len(ds))))
    if cfg.name == "pathological":
        labels = _labels(ds)
        names = sorted(set(labels))
        rank = np.random.default_rng(seed).permutation(len(names))
        key = {name: int(r) for name, r in zip(names, rank)}
        ds = ds.add_column(LABEL_KEY, [key[label] for label in labels])
    if cfg.name in SHUFFLED:
        ds = ds.shuffle(seed=seed)
    return ds


def rebalance(parts: list[list[int]], target: int, labels: list[str], seed: int
              ) -> list[list[int]]:
    """Move seeded rows from the largest sites into every site below `target` rows."""
    rng = np.random.default_rng(seed)
    parts = [list(p) for p in parts]
    for small in range(len(parts)):
        while len(parts[small]) < target:
            donor = max(range(len(parts)), key=lambda i: len(parts[i]))
            count = min(target - len(parts[small]), len(parts[donor]) - target)
            held = {labels[i] for i in parts[small]}
            shuffled = rng.permutation(len(parts[donor])).tolist()
            shares = [labels[parts[donor][j]] in held for j in shuffled]
            order = ([j for j, s in zip(shuffled, shares) if s]  # labels it already holds first
                     + [j for j, s in zip(shuffled, shares) if not s])
            moved = set(order[:count])
            parts[small].extend(parts[donor][j] for j in order[:count])
            parts[donor] = [r for j, r in enumerate(parts[donor]) if j not in moved]
    return parts


def _enforce_min_size(parts: list[list[int]], ds: datasets.Dataset, cfg: PartitionConfig,
                      seed: int) -> list[list[int]]:
    """Refuse or rebalance sites below `min_partition_size` (and empty sites) per `on_small`."""
    target = max(cfg.min_partition_size, 1)
    small = [i for i, p in enumerate(parts) if len(p) < target]
    if not small:
        return parts
    if cfg.on_small != "rebalance":
        names = site_names(ds, cfg)
        raise ConfigError(f"partition.min_partition_size={cfg.min_partition_size} not met by "
                          f"sites {[names[i] for i in small[:5]]}; use fewer clients, more data "
                          f"or partition.on_small=rebalance")
    total = sum(len(p) for p in parts)
    if total < cfg.num_clients * target:
        raise ConfigError(f"partition.min_partition_size={cfg.min_partition_size} cannot be "
                          f"met by rebalancing: {cfg.num_clients} sites x {target} > {total} "
                          f"training samples")
    return rebalance(parts, target, _labels(ds), seed)


def partition_indices(ds: datasets.Dataset, cfg: PartitionConfig, seed: int) -> list[list[int]]:
    """Return, for each site, the row indices of `ds` it holds."""
    if cfg.name == "natural":  # num_clients follows the column (common/task.py sets it)
        return _natural_parts(ds, cfg)
    if len(ds) < cfg.num_clients:
        raise ConfigError(f"partition.num_clients must be <= the {len(ds)} training samples "
                          f"(got {cfg.num_clients})")
    if cfg.name == "pathological":
        _check_pathological(ds, cfg)
    partitioner = make_partitioner(cfg, seed, len(ds))
    partitioner.dataset = _prepare(ds, cfg, seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # re-sampling notes; failure raises
            parts = [partitioner.load_partition(i)[ROW_ID][:] for i in range(cfg.num_clients)]
    except ValueError as err:
        advice = ADVICE.get(cfg.name, "lower partition.num_clients")
        raise ConfigError(f"partition: {cfg.name} split failed ({' '.join(str(err).split())}); "
                          f"{advice}") from None
    return _enforce_min_size([list(p) for p in parts], ds, cfg, seed)


def label_counts(ds: datasets.Dataset, parts: list[list[int]], names: list[str]
                 ) -> list[dict[str, int]]:
    """Count each label per site (what a partition report shows)."""
    labels = _labels(ds)
    out = []
    for part in parts:
        counts = dict.fromkeys(names, 0)
        for i in part:
            counts[labels[i]] += 1
        out.append(counts)
    return out
