"""Personalization at a site: a personal adapter built from the global one, kept here.

`personalization=finetune`: after the last round each site fine-tunes the global adapter's
head and LoRA B (A frozen) on its own training rows. `personalization=ditto` (Li et al., ICML
2021): every round, beside the global update it sends, a site trains its personal adapter v
with ditto_lambda/2 * ||v - w_global||^2, v kept in the site's Flower Context. Either way the
personal adapter is saved at the site (simulated: RUN_DIR/sites/<site>/personal-adapter;
deployed: node config `personal-dir`, else beside its manifest) and never sent; the last
round's evaluate reply reports it on the same held-out rows as the global one.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context

from common import keys
from common.adapter import adapter_state, set_adapter_state, set_lora_a_trainable, to_numpy
from common.data import Encoded
from common.model import save_adapter
from common.train import evaluate, train_local
from client.site import Site

PERSONAL_STATE = "fedmm-personal-adapter"  # ditto: v, in the site's Context


def ditto_step(site: Site, context: Context) -> None:
    """Ditto: train this site's personal adapter v one round, pulled towards the global one."""
    p = site.cfg.personalization
    if p.name != "ditto":
        return
    model = site.bundle.model
    set_adapter_state(model, site.global_state)
    anchor = [t.detach().clone() for t in model.parameters() if t.requires_grad]  # w_global
    stored = context.state.array_records.get(PERSONAL_STATE)
    if stored is not None:
        set_adapter_state(model, {k: v.numpy() for k, v in stored.items()})
    train = replace(site.cfg.train, lr=p.lr, proximal_mu=p.ditto_lambda)
    train_local(site.bundle, site.train, train, seed=site.seed + 1, device=site.device,
                anchor=anchor)
    context.state[PERSONAL_STATE] = ArrayRecord(
        {k: Array(v) for k, v in to_numpy(adapter_state(model)).items()})


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
    else:  # ditto: v as the last round left it
        stored = context.state.array_records[PERSONAL_STATE]
        set_adapter_state(model, {k: v.numpy() for k, v in stored.items()})
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
