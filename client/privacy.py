"""The privacy mods around a site's train handler, chosen by the run's `privacy` config.

  privacy.secagg=true     Flower's `secaggplus_mod` (flwr.client.mod: legacy, the only SecAgg+
                          client in flwr 1.42). It answers the setup/share-keys/unmask stages
                          itself and calls the handler in `collect masked vectors`; `_legacy_io`
                          translates between the legacy FitIns/FitRes records it speaks and
                          fedmm's records, and uploads the update Δ = local − global.
  privacy.dp=client_fixed     Flower's `fixedclipping_mod`: clip Δ to the norm the server sends.
  privacy.dp=client_adaptive  Flower's `adaptiveclipping_mod` (also reports the norm bit).
  privacy.dp=local            `local_dp_train`: Opacus DP-SGD (common/dp_sgd.py); the site keeps
                              its step count in its Context and reports its own (ε, δ).
"""

from __future__ import annotations

import logging

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (Code, FitRes, Status, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.compat.common import recorddict_compat as compat

from common import keys
from common.dp_sgd import train_local_dp
from common.privacy import epsilon, local_noise_multiplier
from client.site import Site, run_config

log = logging.getLogger("fedmm.client")
LOCAL_DP_STATE = "fedmm.local-dp"  # this site's DP-SGD steps so far (its accountant state)


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Route a train message through the mods the run's privacy config asks for."""
    p = run_config(context).privacy
    if p.secagg:
        return secaggplus_mod(msg, context,
                              lambda m, c: _legacy_io(m, c, call_next, p.clipping_range))
    if p.dp == "client_fixed":
        return fixedclipping_mod(msg, context, call_next)
    if p.dp == "client_adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _legacy_io(msg: Message, context: Context, call_next: ClientAppCallable,
               clipping_range: float) -> Message:
    """Legacy FitIns in, fedmm's handler in between, legacy FitRes (of the update Δ) out."""
    config = msg.content.config_records["fitins.config"]  # (compat's FitIns refuses lists)
    parameters = compat.arrayrecord_to_parameters(
        msg.content.array_records["fitins.parameters"], keep_input=True)
    names = list(config[keys.ARRAY_KEYS])  # type: ignore[arg-type]
    global_state = dict(zip(names, parameters_to_ndarrays(parameters), strict=True))
    msg.content = RecordDict({
        keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in global_state.items()}),
        keys.CONFIG: config})
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    local = {k: v.numpy() for k, v in reply.content[keys.ARRAYS].items()}
    metrics = dict(reply.content[keys.METRICS])
    # keys a site does not upload (ffa: frozen A) did not change: their update is zero
    delta = [local[k] - global_state[k] if k in local else 0 * global_state[k] for k in names]
    largest = max(float(abs(d).max()) for d in delta)
    if largest > clipping_range:  # SecAgg+ clips it silently: say so where it happens
        log.warning("update coordinate %.3g exceeds privacy.clipping_range=%g; SecAgg+ clips it",
                    largest, clipping_range)
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(delta),
                    int(metrics[keys.NUM_EXAMPLES]), metrics)
    reply.content = compat.fitres_to_recorddict(fitres, keep_input=True)
    return reply


def local_dp_train(site: Site, context: Context) -> dict:
    """DP-SGD on this site's data; return train metrics plus this site's cumulative ε and z."""
    cfg = site.cfg
    p, train = cfg.privacy, cfg.train
    z = p.noise_multiplier
    if p.target_epsilon > 0:  # reach the target after every round's steps at this site
        z = local_noise_multiplier(p.target_epsilon, len(site.train), train.batch_size,
                                   train.epochs, cfg.strategy.rounds, p.delta)
    metrics = train_local_dp(site.bundle, site.train, train, noise_multiplier=z,
                             max_grad_norm=p.clipping_norm, seed=site.seed, device=site.device,
                             per_layer=p.per_layer_clipping)
    state = context.state.metric_records.get(LOCAL_DP_STATE, MetricRecord({"steps": 0}))
    steps = int(state["steps"]) + int(metrics["steps"])
    context.state.metric_records[LOCAL_DP_STATE] = MetricRecord({"steps": steps})
    metrics[keys.SITE_EPSILON] = epsilon(z, metrics["sample_rate"], steps, p.delta)
    metrics[keys.LOCAL_DP_NOISE] = z
    return metrics
