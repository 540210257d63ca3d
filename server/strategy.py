"""Flower's FedAvg / FedProx, with every reply screened before Flower aggregates it.

A reply that errored, or whose adapter does not fit the global one (keys, shapes, dtype,
NaN/Inf, bad num-examples), is dropped with a logged reason and counted; the round goes on with
the rest. The aggregation itself is Flower's. Per-round counts land in `round_stats`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from common import keys
from common.adapter import rejection_reason
from common.config import StrategyConfig

log = logging.getLogger("fedmm.server")


@dataclass
class RoundStats:
    sampled: int = 0
    replied: int = 0
    rejected: int = 0
    bytes_uploaded: int = 0
    train_loss: float = float("nan")
    reasons: list[str] = field(default_factory=list)


class ScreenedAggregation:
    """Mixin for a Flower strategy: count, screen and log train replies, then aggregate."""

    reference: dict[str, tuple[int, ...]]
    round_stats: dict[int, RoundStats]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self.round_stats[server_round] = RoundStats(sampled=len(messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.round_stats.setdefault(server_round, RoundStats())
        kept = []
        for msg in replies:
            reason = _reply_problem(msg, self.reference)
            if reason is None:
                kept.append(msg)
                stats.bytes_uploaded += msg.content[keys.ARRAYS].count_bytes()
            else:
                stats.rejected += 1
                stats.reasons.append(reason)
                log.warning("round %d: rejected reply from node %d: %s", server_round,
                            msg.metadata.src_node_id, reason)
        stats.replied = len(kept)
        arrays, metrics = super().aggregate_train(server_round, kept)  # type: ignore[misc]
        if metrics is not None and keys.TRAIN_LOSS in metrics:
            stats.train_loss = float(metrics[keys.TRAIN_LOSS])
        return arrays, metrics


def _reply_problem(msg: Message, reference: dict[str, tuple[int, ...]]) -> str | None:
    """Why a train reply cannot be aggregated, or None."""
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    content = msg.content
    if keys.ARRAYS not in content.array_records or keys.METRICS not in content.metric_records:
        return "reply lacks the adapter arrays or the metrics"
    metrics = content[keys.METRICS]
    try:
        update = {k: v.numpy() for k, v in content[keys.ARRAYS].items()}
    except (ValueError, TypeError) as err:
        return f"arrays cannot be decoded: {err}"
    return rejection_reason(reference, update, float(metrics.get(keys.NUM_EXAMPLES, 0)))


class ScreenedFedAvg(ScreenedAggregation, FedAvg):
    """FedAvg over screened replies."""


class ScreenedFedProx(ScreenedAggregation, FedProx):
    """FedProx (clients add mu/2 ||w - w_global||^2) over screened replies."""


def make_strategy(cfg: StrategyConfig, initial: ArrayRecord) -> ScreenedAggregation:
    """Build the configured strategy; `initial` fixes the keys and shapes replies must have."""
    common_args = dict(fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
                       min_train_nodes=cfg.min_train_nodes,
                       min_evaluate_nodes=min(cfg.min_train_nodes, cfg.min_available_nodes),
                       min_available_nodes=cfg.min_available_nodes)
    if cfg.name == "fedprox":
        strategy: ScreenedAggregation = ScreenedFedProx(proximal_mu=cfg.proximal_mu, **common_args)
    else:
        strategy = ScreenedFedAvg(**common_args)
    strategy.reference = {k: tuple(v.shape) for k, v in initial.items()}
    strategy.round_stats = {}
    return strategy
