"""What a site or the server needs for one run, built once per process and cached.

The Flower apps call only these functions: `resolve_data` (generate the demo data or find the
user's manifests, and fix the label set), `cached_bundle` (the backbone, built once per worker
process and reused across rounds and virtual clients: only the adapter is swapped per message),
`site_data` (a site's train/validation split: its partition in simulation, its own manifest in
deployment) and `load_test_split` (the server's held-out split). Caches are keyed by the frozen
config dataclasses themselves.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import astuple, replace
from functools import lru_cache
from pathlib import Path

import datasets
import numpy as np

from common.data import Encoded, encode, label_names, load_manifest
from common.demo_data import generate
from common.model import Bundle, build_model
from common.partition import partition_indices
from common.schema import Config, ModelConfig, PartitionConfig, SkewConfig
from common.skews import apply_skews

VALIDATION_FRACTION = 0.1  # of each site's data, held out for federated evaluation


def resolve_data(cfg: Config) -> Config:
    """`cfg` with absolute manifest paths and the label set filled in (demo data generated)."""
    d = cfg.data
    if d.source == "demo" and not d.train:
        train, test = generate(Path(d.demo_dir).resolve(), d.demo_train, d.demo_test, d.seed,
                               site_by_shape=d.demo_site_by_shape)
    else:
        train, test = Path(str(d.train)).resolve(), Path(str(d.test)).resolve()
    labels = d.labels or tuple(manifest_labels(train))
    return replace(cfg, data=replace(d, train=str(train), test=str(test), labels=labels))


@lru_cache(maxsize=4)
def _manifest(path: str) -> datasets.Dataset:
    return load_manifest(path)[0]


def manifest_labels(path: str | Path) -> list[str]:
    """The label set, in class-index order, of a training manifest."""
    return label_names(_manifest(str(path)))


_BUNDLES: OrderedDict[tuple[ModelConfig, tuple[str, ...]], Bundle] = OrderedDict()
MAX_BUNDLES = 4  # e.g. one per LoRA rank when sites of several ranks share a worker


def cached_bundle(cfg: ModelConfig, names: tuple[str, ...] | list[str]) -> Bundle:
    """The model for this config and label set, built once per process (a few are kept)."""
    key = (cfg, tuple(names))
    if key in _BUNDLES:
        _BUNDLES.move_to_end(key)
    else:
        _BUNDLES[key] = build_model(cfg, list(names))
        while len(_BUNDLES) > MAX_BUNDLES:
            _BUNDLES.popitem(last=False)
    return _BUNDLES[key]


@lru_cache(maxsize=4)
def _partitions(path: str, partition: PartitionConfig, seed: int) -> list[list[int]]:
    return partition_indices(_manifest(path), partition, seed)


def _split(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split of `range(n)`."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = int(round(n * VALIDATION_FRACTION)) if n >= 10 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


@lru_cache(maxsize=16)
def _site_data(path: str, rows: tuple[int, ...] | None, names: tuple[str, ...], size: int,
               mean: tuple, std: tuple, seed: int, skew: SkewConfig | None, site: int,
               num_sites: int) -> tuple[Encoded, Encoded, dict]:
    ds = _manifest(path)
    if rows is not None:
        ds = ds.select(rows)
    encoded = encode(ds, list(names), size, mean, std, source=path)
    stats: dict = {}
    if skew is not None:  # simulated heterogeneity of this site's data (train and validation)
        encoded, stats = apply_skews(encoded, skew, site, num_sites, seed, num_classes=len(names))
    train_idx, val_idx = _split(len(encoded), seed)
    return encoded.subset(train_idx), encoded.subset(val_idx), stats


def has_skew(cfg: Config) -> bool:
    """Whether any multimodal skew is configured."""
    return any(value > 0 for value in astuple(cfg.skew))


def image_encoding(cfg: ModelConfig) -> tuple[int, tuple, tuple]:
    """How images are encoded for this model: (size, mean, std) of its image tower."""
    from common.towers.image import image_stats

    return (cfg.vision.image_size, *image_stats(cfg.vision.name_or_path))


def site_data(cfg: Config, *, train_manifest: str | Path, partition_id: int | None = None,
              with_stats: bool = False):
    """A site's (train, validation) data: partition `partition_id` of the manifest, or all of it.

    Simulated sites also get the configured multimodal skews; `with_stats` adds their realised
    statistics as a third element.
    """
    rows, skew = None, None
    if partition_id is not None:
        rows = tuple(_partitions(str(train_manifest), cfg.partition, cfg.seed)[partition_id])
        skew = cfg.skew if has_skew(cfg) else None
    size, mean, std = image_encoding(cfg.model)
    train, val, stats = _site_data(
        str(train_manifest), rows, tuple(cfg.data.labels), size, mean, std, cfg.seed, skew,
        partition_id or 0, cfg.partition.num_clients)
    return (train, val, stats) if with_stats else (train, val)


def load_test_split(cfg: Config) -> Encoded:
    """The held-out test split the server evaluates the global model on."""
    test = str(cfg.data.test)
    return encode(_manifest(test), cfg.data.labels, *image_encoding(cfg.model), source=test)
