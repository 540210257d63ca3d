"""Secure aggregation with Flower's SecAgg+ (`privacy.secagg=true`).

In flwr 1.42 SecAgg+ exists only as the legacy `flwr.server.workflow.SecAggPlusWorkflow`, which
drives a legacy `flwr.server.strategy.Strategy` through a `LegacyContext`; the Message-API
strategies (`flwr.serverapp.strategy`) have no SecAgg+ path. So this mode runs Flower's
`DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` from inside the Message-API ServerApp,
with `SecAggFedAvg` below as the legacy strategy. Per round:

  setup -> share keys -> collect masked vectors (sites train here) -> unmask
  sites upload round(w_k · Δ_k) + masks, w_k = num_examples / max_weight, Δ_k = local − global
  the server learns only Σ_k w_k Δ_k / Σ_k w_k over the sites alive at `collect masked vectors`
  new global = global + that mean    (SecAgg+ then is plain FedAvg on the updates)

Sites that fail after `setup` are dropouts: their pairwise masks are rebuilt from the shares of
at least `reconstruction_threshold` neighbours and the round goes on over the survivors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Context
from flwr.common import (FitIns, FitRes, Parameters, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from common import keys
from common.config import Config
from common.privacy import secagg_error_bound
from server.strategy import RoundStats, note_site_epsilon

log = logging.getLogger("fedmm.server")


class SecAggFedAvg(LegacyFedAvg):
    """Legacy FedAvg over SecAgg+ sums of adapter updates; keeps fedmm's round stats."""

    def __init__(self, *, initial: dict[str, np.ndarray], round_stats: dict[int, RoundStats],
                 evaluate_round: Callable[[int, dict[str, np.ndarray]], dict[str, float]],
                 max_weight: float, clipping_range: float, quantization_range: int, **kwargs):
        super().__init__(fraction_evaluate=0.0, **kwargs)
        self.names = list(initial)  # legacy Parameters are unnamed: this fixes the order
        self.global_state = dict(initial)
        self.round_stats = round_stats
        self.evaluate_round = evaluate_round
        self.max_weight, self.clipping_range = max_weight, clipping_range
        self.quantization_range = quantization_range

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        return ndarrays_to_parameters([self.global_state[k] for k in self.names])

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        config = {keys.SERVER_ROUND: server_round, keys.ARRAY_KEYS: self.names}
        self.on_fit_config_fn = lambda _round: config
        pairs = super().configure_fit(server_round, parameters, client_manager)
        self.round_stats[server_round] = RoundStats(sampled=len(pairs))
        return pairs

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        """Add the unmasked mean update (every result carries the same one) to the global."""
        stats = self.round_stats.setdefault(server_round, RoundStats())
        stats.rejected = stats.sampled - len(results)  # (Flower lists some failures twice)
        stats.reasons += [f"dropped out: {f}" for f in failures][:stats.rejected]
        if not results:
            return None, {}
        delta = parameters_to_ndarrays(results[0][1].parameters)
        if len(delta) != len(self.names) or not all(np.isfinite(d).all() for d in delta):
            stats.reasons.append("round skipped: SecAgg+ aggregate unusable")
            log.warning("round %d: SecAgg+ aggregate has the wrong layout or NaN/Inf; global "
                        "adapter unchanged", server_round)
            return None, {}
        for name, d in zip(self.names, delta):
            ref = self.global_state[name]
            self.global_state[name] = (ref + d.reshape(ref.shape)).astype(ref.dtype)
        counts = [res.num_examples for _, res in results]
        stats.replied, stats.aggregated = len(results), True
        stats.bytes_uploaded = len(results) * 8 * (1 + sum(d.size for d in delta))  # int64
        stats.train_loss = float(np.average([res.metrics.get(keys.TRAIN_LOSS, np.nan)
                                             for _, res in results], weights=counts))
        note_site_epsilon(stats, [res.metrics for _, res in results])
        weight_sum = sum(round(n / self.max_weight * self.quantization_range)
                         for n in counts) / self.quantization_range
        stats.secagg_bound = secagg_error_bound(len(results), self.clipping_range,
                                                self.quantization_range, weight_sum)
        log.info("round %d: SecAgg+ mean over %d sites (%d dropped); quantisation error "
                 "<= %.3g per coordinate", server_round, len(results), stats.rejected,
                 stats.secagg_bound)
        return self.initialize_parameters(None), {}  # type: ignore[arg-type]

    def evaluate(self, server_round: int, parameters: Parameters
                 ) -> tuple[float, dict] | None:
        metrics = self.evaluate_round(server_round, dict(self.global_state))
        return metrics["test_loss"], metrics


def run_secagg(grid: Grid, context: Context, cfg: Config, initial: dict[str, np.ndarray],
               round_stats: dict[int, RoundStats],
               evaluate_round: Callable[[int, dict[str, np.ndarray]], dict[str, float]]) -> None:
    """Run all rounds through Flower's DefaultWorkflow with a SecAgg+ fit workflow."""
    p, s = cfg.privacy, cfg.strategy
    strategy = SecAggFedAvg(
        initial={k: v.copy() for k, v in initial.items()}, round_stats=round_stats, evaluate_round=evaluate_round, max_weight=p.max_weight,
        clipping_range=p.clipping_range, quantization_range=p.quantization_range,
        fraction_fit=s.fraction_train, min_fit_clients=s.min_train_nodes,
        min_available_clients=s.min_available_nodes)
    as_count = (lambda v: int(v) if v > 1 else float(v))  # Flower: int = count, float = share
    workflow = SecAggPlusWorkflow(
        num_shares=as_count(p.num_shares),
        reconstruction_threshold=as_count(p.reconstruction_threshold),
        max_weight=p.max_weight, clipping_range=p.clipping_range,
        quantization_range=p.quantization_range, timeout=s.round_timeout_s)
    legacy = LegacyContext(context=context, strategy=strategy, config=ServerConfig(
        num_rounds=s.rounds, round_timeout=s.round_timeout_s))
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
