"""Split one training set into per-site partitions with flwr-datasets partitioners.

The same data, config and seed always give the same assignment, so every simulated site (in
whatever worker process) computes its own partition independently and identically.
"""

from __future__ import annotations

import warnings

import datasets
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from common.config import ConfigError, PartitionConfig

ROW_ID = "_row_id"


def make_partitioner(cfg: PartitionConfig, seed: int) -> Partitioner:
    """Return the flwr-datasets partitioner that `cfg` names."""
    if cfg.name == "iid":
        return IidPartitioner(num_partitions=cfg.num_clients)
    return DirichletPartitioner(num_partitions=cfg.num_clients, partition_by="label",
                                alpha=cfg.alpha, min_partition_size=cfg.min_partition_size,
                                self_balancing=False, shuffle=True, seed=seed)


def partition_indices(ds: datasets.Dataset, cfg: PartitionConfig, seed: int) -> list[list[int]]:
    """Return, for each site, the row indices of `ds` it holds."""
    if len(ds) < cfg.num_clients:
        raise ConfigError(f"partition.num_clients must be <= the {len(ds)} training samples "
                          f"(got {cfg.num_clients})")
    partitioner = make_partitioner(cfg, seed)
    partitioner.dataset = ds.add_column(ROW_ID, list(range(len(ds))))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # re-sampling notes; failure raises
            parts = [partitioner.load_partition(i)[ROW_ID] for i in range(cfg.num_clients)]
    except ValueError as err:
        raise ConfigError(f"partition: {cfg.name} split failed ({err}); raise partition.alpha "
                          f"or lower partition.min_partition_size/num_clients") from None
    small = [i for i, p in enumerate(parts) if len(p) < max(cfg.min_partition_size, 1)]
    if small:
        raise ConfigError(f"partition.min_partition_size={cfg.min_partition_size} not met by "
                          f"sites {small[:5]}; use fewer clients or more data")
    return [list(p) for p in parts]


def label_counts(ds: datasets.Dataset, parts: list[list[int]], names: list[str]
                 ) -> list[dict[str, int]]:
    """Count each label per site (what a partition report shows)."""
    labels = ds["label"]
    out = []
    for part in parts:
        counts = dict.fromkeys(names, 0)
        for i in part:
            counts[labels[i]] += 1
        out.append(counts)
    return out
