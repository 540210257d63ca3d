"""fedmm ClientApp: one site. Loads the global adapter, trains on local data, replies.

The handlers translate between Flower records and plain tensors; everything about the site (its
config, rank, model and data) is in client/site.py, the privacy mods in client/privacy.py, the
training itself in common/train.py (`train_local(bundle, data, cfg.train)`).
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import keys
from common.adapter import adapter_state, to_numpy
from common.attacks import is_attacker, poison
from common.faults import crashes, hang_seconds
from common.schema import Config
from common.strategies import site_only
from common.train import evaluate as evaluate_model
from common.train import train_local
from client.compression import upload_record
from client.personal import after_train, before_train, personal_metrics
from client.privacy import local_dp_train, privacy_mod
from client.site import Site, load_site, note_restricted_softmax, ready_to_train, run_config
from client.timing import message_started

app = ClientApp()


@app.train(mods=[privacy_mod])
def train(msg: Message, context: Context) -> Message:
    """Train the global adapter on local data and send back the new adapter_state."""
    begun = message_started()  # this message's process start (deployed), or now
    _maybe_drop_out(run_config(context), context)
    site = load_site(msg, context)
    ready = ready_to_train(site)  # the stems are computed: start-up ends, training starts
    cfg = site.cfg
    if keys.DATA_PATH in context.node_config:  # deployed: the site's own log says it
        note_restricted_softmax(site)
    _maybe_hang(site, context)
    before_train(site, context)  # fedsa: this site's own LoRA B
    started = time.perf_counter()
    if cfg.privacy.dp == "local":
        metrics = local_dp_train(site, context)
    else:
        metrics = train_local(site.bundle, site.train, cfg.train, seed=site.seed,
                              device=site.device)
    seconds = time.perf_counter() - started
    state = to_numpy(adapter_state(site.bundle.model))
    after_train(site, context)  # ditto / fedsa: the personal adapter, kept here
    kept_here = site_only(cfg.strategy.lora_aggregation, cfg.personalization.name)
    state = {k: v for k, v in state.items() if not any(f in k for f in kept_here)}
    state = _maybe_poison(cfg, context, state, site.global_state)
    _maybe_crash(site, context)
    with_modality = {keys.NUM_MODALITY_EXAMPLES[m]: int(site.train.has(m).sum())
                     for m in cfg.model.modalities}  # weights each tower (server/strategy.py)
    reply = RecordDict({
        keys.ARRAYS: upload_record(cfg, context, state, site.global_state, site.seed),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: metrics["num_examples"],
                                    **with_modality,
                                    keys.TRAIN_LOSS: metrics["train_loss"],
                                    keys.TRAIN_SECONDS: seconds,
                                    keys.SITE_STARTUP: round(ready - begun, 4),
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


def _maybe_hang(site: Site, context: Context) -> None:
    """Simulation only: a straggler hangs `simulation.straggler_s` in its straggler rounds."""
    node = context.node_config
    if keys.PARTITION_ID in node:
        time.sleep(hang_seconds(site.cfg.simulation, site.server_round,
                                int(node[keys.PARTITION_ID])))


def _maybe_crash(site: Site, context: Context) -> None:
    """Simulation only: `simulation.crash_fraction` of the sites crash before replying."""
    node = context.node_config
    if keys.PARTITION_ID in node and crashes(site.cfg.simulation, site.cfg.seed,
                                             site.server_round, int(node[keys.PARTITION_ID]),
                                             int(node[keys.NUM_PARTITIONS])):
        raise RuntimeError(f"simulated crash of site {node[keys.PARTITION_ID]} in round "
                           f"{site.server_round}")


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
    """Evaluate the global adapter on this site's held-out share; name the site in the reply.

    After the last round, with `personalization` set, the site also builds its personal
    adapter (saved here, never sent) and reports it on the same rows (client/personal.py).
    """
    site = load_site(msg, context)
    data = site.val if len(site.val) else site.train  # a site too small to hold data out
    result = evaluate_model(site.bundle, data, device=site.device)
    metrics = {keys.NUM_EXAMPLES: len(data), keys.EVAL_LOSS: result["loss"],
               keys.EVAL_ACCURACY: result["accuracy"], keys.EVAL_MACRO_F1: result["macro_f1"],
               **personal_metrics(site, context, data)}
    reply = RecordDict({keys.METRICS: MetricRecord(metrics),
                        keys.SITE: ConfigRecord({keys.SITE_NAME: site.name})})
    return Message(content=reply, reply_to=msg)
