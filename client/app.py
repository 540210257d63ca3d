"""fedmm ClientApp: one site. Loads the global adapter, trains on local data, replies.

Simulated, a site's data is partition `partition-id` of the run's training manifest; deployed,
it is the manifest named by the node config (`--node-config "data-path=/site/train.csv"`,
optionally `site-name`, `lora-rank`, `device`; `fedmm site` sets them).
The backbone is built once per process (common.task.cached_bundle); each message only swaps
the adapter tensors.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import keys
from common.adapter import (adapter_state, apply_base_residuals, set_adapter_state,
                            set_lora_a_trainable, to_numpy)
from common.attacks import is_attacker, poison
from common.config import Config, from_run_config
from common.data import Encoded
from common.lora_math import fit_rank
from common.model import Bundle
from common.task import cached_bundle, site_data
from common.train import evaluate as evaluate_model
from common.train import pick_device, train_local
from client.privacy import local_dp_train, privacy_mod

app = ClientApp()
_CONFIGS: dict[str, Config] = {}


def run_config(context: Context) -> Config:
    """The run's validated config (parsed once per process)."""
    text = str(context.run_config.get(keys.RUN_CONFIG, ""))
    if text not in _CONFIGS:
        _CONFIGS[text] = from_run_config(text, check_files=False)  # server paths need not exist
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


@dataclass
class Site:
    """One site, ready for one message: model with the global adapter loaded, and its data."""

    cfg: Config
    round_cfg: dict
    bundle: Bundle
    train: Encoded
    val: Encoded
    device: torch.device
    global_state: dict[str, np.ndarray]  # the global adapter, at this site's rank


def _site(msg: Message, context: Context) -> Site:
    """Load the global adapter into this site's cached model and fetch its data."""
    cfg = run_config(context)
    round_cfg = msg.content[keys.CONFIG]
    rank = site_rank(cfg, context)
    model_cfg = replace(cfg.model, lora=replace(cfg.model.lora, r=rank))
    bundle = cached_bundle(model_cfg, list(round_cfg[keys.LABEL_NAMES]))
    incoming = {k: v.numpy() for k, v in msg.content[keys.ARRAYS].items()}
    global_state = fit_rank(incoming, rank, cfg.model.lora.alpha)
    set_adapter_state(bundle.model, global_state)
    residuals = msg.content.array_records.get(keys.BASE_RESIDUALS)
    apply_base_residuals(bundle.model, {k: v.numpy() for k, v in (residuals or {}).items()})
    set_lora_a_trainable(bundle.model, not bool(round_cfg.get(keys.FREEZE_LORA_A, False)))
    node = context.node_config
    if keys.DATA_PATH in node:  # a deployed site: its own manifest, all of it
        train, val = site_data(cfg, bundle, train_manifest=str(node[keys.DATA_PATH]))
    else:  # a simulated site: its partition of the shared manifest
        train, val = site_data(cfg, bundle, train_manifest=str(round_cfg[keys.TRAIN_MANIFEST]),
                               partition_id=int(node[keys.PARTITION_ID]))
    device = pick_device(str(node.get(keys.DEVICE, cfg.device)))
    return Site(cfg, round_cfg, bundle, train, val, device, global_state)


def _site_number(context: Context) -> int:
    """A stable number for this site: its partition in simulation, else from its node config.

    Deployed, it derives from `site-name` (or `data-path`), never from the node id, so a
    resumed run seeds every site exactly as the uninterrupted run did.
    """
    node = context.node_config
    if keys.PARTITION_ID in node:
        return int(node[keys.PARTITION_ID])
    name = str(node.get(keys.SITE_NAME, node.get(keys.DATA_PATH, context.node_id)))
    return zlib.crc32(name.encode()) % 1_000_003


@app.train(mods=[privacy_mod])
def train(msg: Message, context: Context) -> Message:
    """Train the global adapter on local data and send back the new adapter_state."""
    _maybe_drop_out(run_config(context), context)
    site = _site(msg, context)
    cfg, round_cfg = site.cfg, site.round_cfg
    server_round = int(round_cfg[keys.SERVER_ROUND])
    train_kwargs = dict(
        bundle=site.bundle, data=site.train, epochs=int(round_cfg[keys.LOCAL_EPOCHS]),
        batch_size=int(round_cfg[keys.BATCH_SIZE]), lr=float(round_cfg[keys.LR]),
        weight_decay=float(round_cfg[keys.WEIGHT_DECAY]),
        proximal_mu=float(round_cfg.get(keys.PROXIMAL_MU, 0.0)),
        absent_class_scale=float(round_cfg.get(keys.ABSENT_CLASS_SCALE, 1.0)),
        modality_dropout_text=float(round_cfg.get(keys.MODALITY_DROPOUT_TEXT, 0.0)),
        modality_dropout_image=float(round_cfg.get(keys.MODALITY_DROPOUT_IMAGE, 0.0)),
        max_grad_norm=float(round_cfg.get(keys.MAX_GRAD_NORM, 0.0)),
        seed=cfg.seed * 100_003 + server_round * 1_009 + _site_number(context),
        device=site.device)
    metrics = (local_dp_train(cfg, context, train_kwargs) if cfg.privacy.dp == "local"
               else train_local(**train_kwargs))
    state = to_numpy(adapter_state(site.bundle.model))
    if round_cfg.get(keys.FREEZE_LORA_A, False):  # ffa: A never changes, so it is not sent
        state = {k: v for k, v in state.items() if ".lora_A." not in k}
    state = _maybe_poison(cfg, context, state, site.global_state)
    reply = RecordDict({
        keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in state.items()}),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: metrics["num_examples"],
                                    keys.NUM_IMAGE_EXAMPLES: int(site.train.has_image.sum()),
                                    keys.NUM_TEXT_EXAMPLES: int(site.train.has_text.sum()),
                                    keys.TRAIN_LOSS: metrics["train_loss"],
                                    **{k: metrics[k] for k in (keys.SITE_EPSILON,
                                                               keys.LOCAL_DP_NOISE)
                                       if k in metrics}}),
    })
    return Message(content=reply, reply_to=msg)


def _maybe_drop_out(cfg: Config, context: Context) -> None:
    """Simulation only: a site in `simulation.drop_sites` fails mid-round, every round."""
    node = context.node_config
    if keys.PARTITION_ID in node and int(node[keys.PARTITION_ID]) in cfg.simulation.drop_sites:
        raise RuntimeError(f"simulated dropout of site {node[keys.PARTITION_ID]}")


def _maybe_poison(cfg: Config, context: Context, state: dict, global_state: dict) -> dict:
    """Simulation only: a configured Byzantine site replaces its honest update."""
    sim, node = cfg.simulation, context.node_config
    if sim.attack == "none" or keys.PARTITION_ID not in node:
        return state
    if not is_attacker(int(node[keys.PARTITION_ID]), int(node[keys.NUM_PARTITIONS]),
                       sim.attack_fraction):
        return state
    return poison(state, global_state, sim.attack, sim.attack_scale)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global adapter on this site's held-out validation data."""
    site = _site(msg, context)
    data = site.val if len(site.val) else site.train  # a site too small to hold data out
    result = evaluate_model(site.bundle, data, device=site.device)
    reply = RecordDict({keys.METRICS: MetricRecord({
        keys.NUM_EXAMPLES: len(data), keys.EVAL_LOSS: result["loss"],
        keys.EVAL_ACCURACY: result["accuracy"]})})
    return Message(content=reply, reply_to=msg)

