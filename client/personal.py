"""Personalization at a site: a personal adapter built from the global one, kept here.

`personalization=finetune`: after the last round each site fine-tunes the global adapter's
head and LoRA B (A frozen) on its own training rows. `personalization=ditto` (Li et al., ICML
2021): every round, beside the global update it sends, a site trains its personal adapter v
with ditto_lambda/2 * ||v - w_global||^2, v kept in the site's Flower Context.
`personalization=fedsa` (FedSA-LoRA, Guo et al., ICLR 2025): LoRA A and the head are shared,
each site's LoRA B never leaves it (kept in its Context, put over the global adapter before
each round's training; the server keeps the global B). Either way the personal adapter is saved at the site (simulated: RUN_DIR/sites/<site>/personal-adapter;
deployed: node config `personal-dir`, else beside its manifest) and never sent; the last
round's evaluate reply reports it on the same held-out rows as the global one.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context

from client.site import Site
from common import keys
from common.adapter import adapter_state, set_adapter_state, set_lora_a_trainable, to_numpy
from common.encoded import Encoded
from common.model import save_adapter
from common.train import evaluate, train_local

PERSONAL_STATE = "fedmm-personal-adapter"  # ditto: v; fedsa: B; in the site's Context
LORA_B = ".lora_B."


def _stored(context: Context) -> dict[str, np.ndarray]:
    record = context.state.array_records.get(PERSONAL_STATE)
    return {} if record is None else {k: v.numpy() for k, v in record.items()}


def _store(context: Context, state: dict[str, np.ndarray]) -> None:
    context.state[PERSONAL_STATE] = ArrayRecord({k: Array(v) for k, v in state.items()})


def before_train(site: Site, context: Context) -> None:
    """FedSA-LoRA: this site's own B over the global adapter (from its second round on)."""
    if site.cfg.personalization.name == "fedsa" and (own := _stored(context)):
        set_adapter_state(site.bundle.model, {**site.global_state, **own})


def after_train(site: Site, context: Context) -> None:
    """Keep what is personal after this round's training: fedsa B, or a Ditto step."""
    name = site.cfg.personalization.name
    if name == "fedsa":
        state = to_numpy(adapter_state(site.bundle.model))
        _store(context, {k: v for k, v in state.items() if LORA_B in k})
    elif name == "ditto":
        ditto_step(site, context)


def ditto_step(site: Site, context: Context) -> None:
    """Ditto: train this site's personal adapter v one round, pulled towards the global one."""
    p = site.cfg.personalization
    model = site.bundle.model
    set_adapter_state(model, site.global_state)
    anchor = [t.detach().clone() for t in model.parameters() if t.requires_grad]  # w_global
    if own := _stored(context):
        set_adapter_state(model, own)
    train = replace(site.cfg.train, lr=p.lr, proximal_mu=p.ditto_lambda)
    train_local(site.bundle, site.train, train, seed=site.seed + 1, device=site.device,
                anchor=anchor)
    _store(context, to_numpy(adapter_state(model)))


def personal_metrics(site: Site, context: Context, data: Encoded) -> dict[str, float]:
    """After the last round: build, save and evaluate this site's personal adapter on `data`."""
    p, cfg = site.cfg.personalization, site.cfg
    if p.name == "none" or site.server_round != cfg.strategy.rounds:
        return {}
    model = site.bundle.model
    if p.name == "finetune":  # the global adapter is loaded: tune its head and B
        set_lora_a_trainable(model, False)
        train = replace(cfg.train, epochs=p.epochs, lr=p.lr, proximal_mu=0.0)
        train_local(site.bundle, site.train, train, seed=site.seed + 2, device=site.device)
    else:  # ditto: v as the last round left it; fedsa: the global adapter with its own B
        set_adapter_state(model, {**site.global_state, **_stored(context)})
    result = evaluate(site.bundle, data, device=site.device)
    save_adapter(site.bundle, personal_dir(site, context))
    set_adapter_state(model, site.global_state)  # the cached model as the message found it
    return {keys.PERSONAL_ACCURACY: result["accuracy"],
            keys.PERSONAL_MACRO_F1: result["macro_f1"]}


def personal_dir(site: Site, context: Context) -> Path:
    """Where this site keeps its personal adapter."""
    node, run = context.node_config, Path(site.cfg.output_dir).name
    if keys.PERSONAL_DIR in node:
        return Path(str(node[keys.PERSONAL_DIR])) / run
    if keys.DATA_PATH in node:
        return Path(str(node[keys.DATA_PATH])).parent / "fedmm-personal" / run
    return Path(site.cfg.output_dir) / "sites" / site.name / "personal-adapter"
