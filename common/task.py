"""What a site or the server needs for one run, built once per process and cached.

The Flower apps call only these functions: `resolve_data` (generate the demo data or find the
user's manifests, and fix the label set and the model's modalities), `cached_bundle` (the
backbone, built once per worker process and reused across rounds and virtual clients: only the
adapter is swapped per message),
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

from common.data import Encoding, encode, label_names, load_manifest, manifest_columns
from common.demo_data import generate
from common.encoded import Encoded
from common.model import Bundle, build_model
from common.partition import natural_sites, partition_indices, site_names
from common.rules import check_rules
from common.schema import MODALITIES, Config, ConfigError, ModelConfig, PartitionConfig, SkewConfig
from common.skews import apply_skews


def resolve_data(cfg: Config) -> Config:
    """`cfg` with absolute manifest paths, the label set, the model's modalities and a natural
    split's site count filled in (demo data generated); a modality asked for but not in the
    training manifest is refused."""
    d = cfg.data
    if d.source == "demo" and not d.train:
        train, test = generate(Path(d.demo_dir).resolve(), d.demo_train, d.demo_test, d.seed,
                               site_by_shape=d.demo_site_by_shape, audio=d.demo_audio)
    else:
        train, test = Path(str(d.train)).resolve(), Path(str(d.test)).resolve()
    columns = manifest_modalities(train)
    modalities = cfg.model.modalities or columns
    if missing := [m for m in modalities if m not in columns]:
        raise ConfigError(f"model.modalities must be a subset of the training manifest's "
                          f"modality columns {list(columns)} (got {list(modalities)}; {train} "
                          f"has no column {', '.join(map(repr, missing))})")
    modalities = tuple(m for m in MODALITIES if m in modalities)
    rows = _manifest(str(train), modalities)
    labels = d.labels or tuple(label_names(rows))
    partition = cfg.partition
    if partition.name == "natural":  # one site per (kept) value of the column
        partition = replace(partition, num_clients=len(natural_sites(rows, partition).names))
    resolved = replace(cfg, data=replace(d, train=str(train), test=str(test), labels=labels),
                       model=replace(cfg.model, modalities=modalities), partition=partition)
    check_rules(resolved, check_files=False)  # the rules that need the modalities known
    return resolved


@lru_cache(maxsize=4)
def _manifest(path: str, modalities: tuple[str, ...]) -> datasets.Dataset:
    """A manifest's usable rows for a model of these modalities (the rows every split uses)."""
    return load_manifest(path, modalities=modalities)[0]


def manifest_modalities(path: str | Path) -> tuple[str, ...]:
    """The modality columns of a manifest, in MODALITIES order (no file is decoded)."""
    return tuple(m for m in MODALITIES if m in manifest_columns(path))


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
def _partitions(path: str, modalities: tuple[str, ...], partition: PartitionConfig, seed: int
                ) -> list[list[int]]:
    return partition_indices(_manifest(path, modalities), partition, seed)


def holdout_split(n: int, seed: int, fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic train/held-out split of `range(n)` (sites under 10 rows hold none out)."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = int(round(n * fraction)) if n >= 10 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


@lru_cache(maxsize=16)
def _site_data(path: str, rows: tuple[int, ...] | None, names: tuple[str, ...],
               encoding: Encoding, seed: int, skew: SkewConfig | None, site: int,
               num_sites: int, holdout: float) -> tuple[Encoded, Encoded, dict]:
    ds = _manifest(path, encoding.modalities)
    if rows is not None:
        ds = ds.select(rows)
    encoded = encode(ds, list(names), encoding, source=path)
    stats: dict = {}
    if skew is not None:  # simulated heterogeneity of this site's data (train and validation)
        encoded, stats = apply_skews(encoded, skew, site, num_sites, seed, num_classes=len(names))
    train_idx, val_idx = holdout_split(len(encoded), seed, holdout)
    return encoded.subset(train_idx), encoded.subset(val_idx), stats


def partition_site_name(cfg: Config, partition_id: int) -> str:
    """A simulated site's name: its natural column value, else `site-<i>`."""
    return _site_names(str(cfg.data.train), tuple(cfg.model.modalities), cfg.partition)[partition_id]


@lru_cache(maxsize=4)
def _site_names(path: str, modalities: tuple[str, ...], partition: PartitionConfig
                ) -> tuple[str, ...]:
    return tuple(site_names(_manifest(path, modalities), partition))


def has_skew(cfg: Config) -> bool:
    """Whether any multimodal skew is configured."""
    return any(value > 0 for value in astuple(cfg.skew))


@lru_cache(maxsize=8)
def input_encoding(cfg: ModelConfig) -> Encoding:
    """How rows are encoded for this model: its modalities, image size and normalisation, the
    audio tower's feature extractor and clip length."""
    if cfg.modalities is None:
        raise ValueError("model.modalities is unresolved (common.task.resolve_data fills it)")
    image, audio = {}, {}
    if "image" in cfg.modalities:
        from common.towers.image import image_stats

        mean, std = image_stats(cfg.vision.name_or_path)
        image = dict(image_size=cfg.vision.image_size, image_mean=mean, image_std=std)
    if "audio" in cfg.modalities:
        from common.towers.whisper import audio_feature_extractor

        audio = dict(audio_extractor=audio_feature_extractor(cfg.audio.name_or_path),
                     clip_seconds=cfg.audio.clip_seconds)
    return Encoding(tuple(cfg.modalities), **image, **audio)


def site_data(cfg: Config, *, train_manifest: str | Path, partition_id: int | None = None,
              with_stats: bool = False):
    """A site's (train, held-out) data: partition `partition_id` of the manifest, or all of it.

    Simulated sites also get the configured multimodal skews; `with_stats` adds their realised
    statistics as a third element. Each site's files are decoded once per process.
    """
    rows, skew = None, None
    if partition_id is not None:
        rows = tuple(_partitions(str(train_manifest), tuple(cfg.model.modalities), cfg.partition,
                                 cfg.seed)[partition_id])
        skew = cfg.skew if has_skew(cfg) else None
    train, val, stats = _site_data(
        str(train_manifest), rows, tuple(cfg.data.labels), input_encoding(cfg.model), cfg.seed,
        skew, partition_id or 0, cfg.partition.num_clients, cfg.partition.holdout_fraction)
    return (train, val, stats) if with_stats else (train, val)


def load_test_split(cfg: Config) -> Encoded:
    """The held-out test split the server evaluates the global model on."""
    test = str(cfg.data.test)
    encoding = input_encoding(cfg.model)
    return encode(_manifest(test, encoding.modalities), cfg.data.labels, encoding, source=test)
