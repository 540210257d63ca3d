"""This site, as a train or evaluate message finds it: the run's config, its rank, model and data.

Simulated, a site's data is partition `partition-id` of the run's training manifest; deployed,
it is the manifest named by the node config (`--node-config "data-path=/site/train.csv"`,
optionally `site-name`, `lora-rank`, `device`; `fedmm site` sets them). The backbone is built
once per process (common.task.cached_bundle); each message only swaps the adapter tensors.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message

from common import keys
from common.adapter import apply_base_residuals, set_adapter_state, set_lora_a_trainable
from common.config import Config, from_run_config
from common.encoded import Encoded
from common.lora_math import fit_rank
from common.model import Bundle
from common.stems import cached_stems
from common.strategies import LORA_MODES
from common.task import cached_bundle, partition_site_name, resolve_data, site_data
from common.train import pick_device

_CONFIGS: dict[str, Config] = {}
_NOTED: set[tuple[str, str]] = set()  # (run folder, site) pairs whose log has the note


def run_config(context: Context) -> Config:
    """The run's validated config, data resolved (parsed once per process)."""
    text = str(context.run_config.get(keys.RUN_CONFIG, ""))
    if text not in _CONFIGS:
        cfg = from_run_config(text, check_files=False)  # server paths need not exist here
        _CONFIGS[text] = cfg if cfg.data.labels else resolve_data(cfg)
    return _CONFIGS[text]


def site_rank(cfg: Config, context: Context) -> int:
    """This site's LoRA rank: node config `lora-rank`, else `simulation.site_ranks`, else r."""
    node = context.node_config
    if keys.LORA_RANK in node:
        return int(node[keys.LORA_RANK])
    ranks = cfg.simulation.site_ranks
    if ranks and keys.PARTITION_ID in node:
        return int(ranks[int(node[keys.PARTITION_ID]) % len(ranks)])
    return cfg.model.lora.r


def site_number(context: Context) -> int:
    """A stable number for this site: its partition in simulation, else from its node config.

    Deployed, it derives from `site-name` (or `data-path`), never from the node id, so a
    resumed run seeds every site exactly as the uninterrupted run did.
    """
    node = context.node_config
    if keys.PARTITION_ID in node:
        return int(node[keys.PARTITION_ID])
    name = str(node.get(keys.SITE_NAME, node.get(keys.DATA_PATH, context.node_id)))
    return zlib.crc32(name.encode()) % 1_000_003


@dataclass
class Site:
    """One site, ready for one message: model with the global adapter loaded, and its data."""

    cfg: Config
    server_round: int
    bundle: Bundle
    train: Encoded
    val: Encoded
    device: torch.device
    global_state: dict[str, np.ndarray]  # the global adapter, at this site's rank
    seed: int  # this site's shuffling and dropout in this round
    name: str  # how per-site results name it: its natural site, `site-<i>` or node `site-name`


def load_site(msg: Message, context: Context) -> Site:
    """Load the global adapter into this site's cached model and fetch its data."""
    cfg = run_config(context)
    rank = site_rank(cfg, context)
    bundle = cached_bundle(replace(cfg.model, lora=replace(cfg.model.lora, r=rank)),
                           cfg.data.labels)
    incoming = {k: v.numpy() for k, v in msg.content[keys.ARRAYS].items()}
    global_state = fit_rank(incoming, rank, cfg.model.lora.alpha)
    set_adapter_state(bundle.model, global_state)
    residuals = msg.content.array_records.get(keys.BASE_RESIDUALS)
    apply_base_residuals(bundle.model, {k: v.numpy() for k, v in (residuals or {}).items()})
    set_lora_a_trainable(bundle.model, LORA_MODES[cfg.strategy.lora_aggregation].uploads_a)
    node = context.node_config
    if keys.DATA_PATH in node:  # a deployed site: its own manifest, all of it
        train, val = site_data(cfg, train_manifest=str(node[keys.DATA_PATH]))
        name = str(node.get(keys.SITE_NAME, Path(str(node[keys.DATA_PATH])).stem))
    else:  # a simulated site: its partition of the shared manifest
        partition_id = int(node[keys.PARTITION_ID])
        train, val = site_data(cfg, train_manifest=str(cfg.data.train),
                               partition_id=partition_id)
        name = partition_site_name(cfg, partition_id)
    server_round = int(msg.content[keys.CONFIG].get(keys.SERVER_ROUND, 0))
    seed = cfg.seed * 100_003 + server_round * 1_009 + site_number(context)
    device = pick_device(str(node.get(keys.DEVICE, cfg.device)))
    return Site(cfg, server_round, bundle, train, val, device, global_state, seed, name)


def note_restricted_softmax(site: Site) -> None:
    """A deployed site's log says once per run whether FedRS's restricted softmax acts here
    (this site lacks a class) or is inert (the simulation launcher says it for all sites)."""
    scale = site.cfg.train.absent_class_scale
    key = (site.cfg.output_dir, site.name)
    if scale >= 1 or key in _NOTED:
        return
    _NOTED.add(key)
    held = set(site.train.labels.unique().tolist())
    lacking = [n for i, n in enumerate(site.bundle.label_names) if i not in held]
    where = (f"acts here: this site lacks {', '.join(lacking)}" if lacking else
             "is inert here: this site holds every class")
    print(f"[fedmm] site {site.name}: restricted softmax (train.absent_class_scale={scale:g}) "
          f"{where}", flush=True)


def ready_to_train(site: Site) -> float:
    """Compute what training needs before its first step (cached stems); return the time."""
    if site.cfg.privacy.dp != "local":  # DP-SGD runs the towers whole
        cached_stems(site.bundle, site.train, site.device)
    return time.time()
