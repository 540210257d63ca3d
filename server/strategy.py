"""Flower strategies over screened, LoRA-aware aggregation.

Every strategy is Flower's own (FedAvg, FedProx, FedAdam, FedYogi, FedAvgM, FedMedian,
FedTrimmedAvg, Krum, MultiKrum) with `ScreenedAggregation` in front, plus `NormBoundedFedAvg`
which Flower lacks. Before any aggregation each reply is screened (keys, shapes, dtype, NaN/Inf,
num-examples, update norm): a bad one is dropped with a logged reason and counted, the round
goes on with the rest, and the global state is never touched by it.

LoRA modes (`strategy.lora_aggregation`, math in common/lora_math.py):
  naive  Flower's aggregation of every tensor, A and B separately (FedIT baseline).
  ffa    sites freeze A (shared seed) and upload the rest; the server re-inserts the global A.
  exact  FedEx-LoRA: mean A, mean B, and the residual mean(s·B_k·A_k) - s·mean(B)·mean(A)
         folded into the frozen base weights, sent to sites beside the adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (FedAdam, FedAvg, FedAvgM, FedMedian, FedProx,
                                     FedTrimmedAvg, FedYogi, Krum, MultiKrum)

from common import keys
from common.adapter import rejection_reason
from common.config import MEAN_STRATEGIES, StrategyConfig
from common.lora_math import (aggregate_exact, aggregate_heterogeneous, delta_w, lora_pairs,
                              norm_bounded_mean, pair_rank_problem, refactor, reweight_towers,
                              update_norm)

log = logging.getLogger("fedmm.server")


@dataclass
class RoundStats:
    sampled: int = 0
    replied: int = 0
    rejected: int = 0
    bytes_uploaded: int = 0
    train_loss: float = float("nan")
    site_epsilon: float = float("nan")  # local DP-SGD: the largest ε a site reported
    secagg_bound: float = float("nan")  # SecAgg+: per-coordinate bound vs plaintext FedAvg
    reasons: list[str] = field(default_factory=list)


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def shift_rounds(evaluate_fn: Callable | None, offset: int) -> Callable | None:
    """`evaluate_fn` seeing true round numbers when Flower's loop starts after `offset` rounds.

    The checkpoint a run resumes from was evaluated by the run that wrote it, so Flower's
    round 0 is not evaluated again.
    """
    if evaluate_fn is None or not offset:
        return evaluate_fn

    def shifted(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        return None if server_round == 0 else evaluate_fn(server_round + offset, arrays)
    return shifted


class ScreenedAggregation:
    """Mixin in front of a Flower strategy: screen, count and log replies; LoRA modes."""

    reference: dict[str, tuple[int, ...]]
    round_stats: dict[int, RoundStats]
    lora_mode: str = "naive"
    lora_alpha: float = 1.0
    lora_rank: int = 1
    rank_flexible: bool = False  # mean + naive: sites may train LoRA of their own rank
    modality_weighting: bool = False  # mean: each tower averaged over rows with its modality
    max_update_norm: float = 0.0
    node_ranks: dict[int, int]  # learned from replies
    global_delta: dict[str, np.ndarray]  # heterogeneous ranks: dense aggregated ΔW per layer
    residuals: dict[str, np.ndarray]  # exact mode: cumulative base-weight residual per layer
    global_state: dict[str, np.ndarray]
    round_offset: int = 0  # a resumed run: rounds completed before this ServerApp started

    def start(self, *, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int,
              start_round: int = 1, evaluate_fn: Callable | None = None, **kwargs):
        """Flower's round loop from `start_round` on (resume), with true round numbers.

        Flower counts rounds from 1; every hook below adds `round_offset`, so sites, metrics
        and checkpoints see rounds start_round..num_rounds.
        """
        self.round_offset = start_round - 1
        return super().start(grid=grid, initial_arrays=initial_arrays,  # type: ignore[misc]
                             num_rounds=num_rounds - self.round_offset,
                             evaluate_fn=shift_rounds(evaluate_fn, self.round_offset), **kwargs)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays,  # type: ignore[misc]
                                          config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return super().aggregate_evaluate(server_round + self.round_offset, replies)  # type: ignore[misc]
    prescreened_round: int = -1  # a DP wrapper screened this round's replies already
    dp_releases: int = 0  # central DP: noised aggregates released so far (the accountant state)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self.global_state = _numpy(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        for msg in messages:
            rank = self.node_ranks.get(msg.metadata.dst_node_id, self.lora_rank)
            if rank != self.lora_rank and self.global_delta:  # FlexLoRA: the site's own rank
                msg.content = RecordDict({keys.ARRAYS: _record(self.arrays_for_rank(rank)),
                                          keys.CONFIG: msg.content[keys.CONFIG]})
            if self.residuals:
                msg.content[keys.BASE_RESIDUALS] = _record(self.residuals)
        self.round_stats[server_round] = RoundStats(sampled=len(messages))
        return messages

    def expected_keys(self) -> dict[str, tuple[int, ...]]:
        """Keys and shapes a site uploads (ffa sites keep A to themselves)."""
        if self.lora_mode == "ffa":
            return {k: s for k, s in self.reference.items() if ".lora_A." not in k}
        return self.reference

    def arrays_for_rank(self, rank: int) -> dict[str, np.ndarray]:
        """The global adapter with every LoRA pair re-factored from the dense ΔW at `rank`."""
        state = dict(self.global_state)
        for prefix, (a_key, b_key) in lora_pairs(state).items():
            state[b_key], state[a_key] = refactor(self.global_delta[prefix], rank,
                                                  self.lora_alpha / rank)
        return state

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Drop and count replies unfit to aggregate; re-insert frozen A in ffa mode."""
        stats = self.round_stats.setdefault(server_round, RoundStats())
        expected, kept = self.expected_keys(), []
        for msg in replies:
            reason = _reply_problem(msg, expected, self.rank_flexible)
            if reason is None and self.max_update_norm > 0:
                state = _numpy(msg.content[keys.ARRAYS])
                norm = update_norm(state, {k: self.global_state[k] for k in state})
                if norm > self.max_update_norm:
                    reason = f"update norm {norm:.3g} exceeds strategy.max_update_norm"
            if reason is not None:
                stats.rejected += 1
                stats.reasons.append(reason)
                log.warning("round %d: rejected reply from node %d: %s", server_round,
                            msg.metadata.src_node_id, reason)
                continue
            stats.bytes_uploaded += msg.content[keys.ARRAYS].count_bytes()
            self.node_ranks[msg.metadata.src_node_id] = self._rank(msg)
            if self.lora_mode == "ffa":
                record = msg.content[keys.ARRAYS]
                for k in self.reference.keys() - record.keys():
                    record[k] = Array(self.global_state[k])
            kept.append(msg)
        stats.replied = len(kept)
        note_site_epsilon(stats, [m.content[keys.METRICS] for m in kept])
        return kept

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        kept = (list(replies) if server_round == self.prescreened_round
                else self.screen(server_round, replies))
        minimum = getattr(self, "min_train_nodes", 1)
        if 0 < len(kept) < minimum:  # too few valid updates: keep the global adapter
            log.warning("round %d: only %d valid update(s), fewer than min_train_nodes=%d; "
                        "round skipped, global adapter unchanged", server_round, len(kept),
                        minimum)
            self.round_stats[server_round].reasons.append("round skipped: too few valid updates")
            self.round_stats[server_round].replied = 0
            return None, None
        heterogeneous = set(self.node_ranks.values()) | {self._rank(m) for m in kept}
        if self.lora_mode == "exact" and kept:
            arrays, metrics = self.aggregate_exact(kept)
        elif kept and self.rank_flexible and heterogeneous != {self.lora_rank}:
            arrays, metrics = self.aggregate_ranks(kept)
        else:
            arrays, metrics = super().aggregate_train(server_round, kept)  # type: ignore[misc]
            if arrays is not None and self.modality_weighting:
                arrays = self.weight_towers_by_modality(arrays, kept)
        if arrays is not None and self.lora_mode == "ffa":  # A stays frozen, bit for bit
            for k in self.reference.keys() - self.expected_keys().keys():
                arrays[k] = Array(self.global_state[k])
        if metrics is not None and keys.TRAIN_LOSS in metrics:
            self.round_stats[server_round].train_loss = float(metrics[keys.TRAIN_LOSS])
        return arrays, metrics

    def weight_towers_by_modality(self, arrays: ArrayRecord, kept: list[Message]) -> ArrayRecord:
        """Re-average each tower over the sites' rows that hold its modality (FedAvg per tower)."""
        metrics = [m.content[keys.METRICS] for m in kept]
        totals = np.array([float(m[keys.NUM_EXAMPLES]) for m in metrics])
        counts = {}
        for modality, key in (("image", keys.NUM_IMAGE_EXAMPLES), ("text", keys.NUM_TEXT_EXAMPLES)):
            c = np.array([float(m.get(key, m[keys.NUM_EXAMPLES])) for m in metrics])
            if not np.array_equal(c, totals):  # else every row has it: the mean already is that
                counts[modality] = c
        if not counts:
            return arrays
        states = [_numpy(m.content[keys.ARRAYS]) for m in kept]
        return _record(reweight_towers(_numpy(arrays), states, counts))

    def _rank(self, msg: Message) -> int:
        a_key = next((k for k in msg.content[keys.ARRAYS] if ".lora_A." in k), None)
        return msg.content[keys.ARRAYS][a_key].shape[0] if a_key else self.lora_rank

    def aggregate_ranks(self, kept: list[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """FlexLoRA: weighted mean of the sites' ΔW, re-factored to the global rank by SVD."""
        states = [_numpy(m.content[keys.ARRAYS]) for m in kept]
        weights = np.array([float(m.content[keys.METRICS][keys.NUM_EXAMPLES]) for m in kept])
        scalings = [self.lora_alpha / self._rank(m) for m in kept]
        state, errors = aggregate_heterogeneous(states, weights, scalings, self.lora_rank,
                                                self.lora_alpha / self.lora_rank)
        p = weights / weights.sum()
        self.global_delta = {prefix: sum(pk * delta_w(s, prefix, sk) for pk, s, sk in
                                         zip(p, states, scalings)).astype(np.float32)
                             for prefix in lora_pairs(states[0])}
        log.info("heterogeneous ranks %s: worst rank-%d truncation error %.3g",
                 sorted({self._rank(m) for m in kept}), self.lora_rank,
                 max(errors.values(), default=0.0))
        metrics = self.train_metrics_aggr_fn([m.content for m in kept], self.weighted_by_key)  # type: ignore[attr-defined]
        return _record(state), metrics

    def aggregate_exact(self, kept: list[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """FedEx-LoRA: average the factors, fold the residual into the base weights."""
        states = [_numpy(m.content[keys.ARRAYS]) for m in kept]
        weights = [float(m.content[keys.METRICS][keys.NUM_EXAMPLES]) for m in kept]
        state, residual = aggregate_exact(states, weights, self.lora_alpha / self.lora_rank)
        for prefix, r in residual.items():
            self.residuals[prefix] = self.residuals.get(prefix, 0) + r
        metrics = self.train_metrics_aggr_fn([m.content for m in kept], self.weighted_by_key)  # type: ignore[attr-defined]
        return _record(state), metrics


def note_site_epsilon(stats: RoundStats, metrics: list) -> None:
    """Keep the largest local-DP ε the sites of a round reported."""
    reported = [float(m[keys.SITE_EPSILON]) for m in metrics if keys.SITE_EPSILON in m]
    if reported:
        stats.site_epsilon = max(reported)


def _reply_problem(msg: Message, expected: dict[str, tuple[int, ...]],
                   rank_flexible: bool = False) -> str | None:
    """Why a train reply cannot be aggregated, or None (LoRA ranks may vary if flexible)."""
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    content = msg.content
    if keys.ARRAYS not in content.array_records or keys.METRICS not in content.metric_records:
        return "reply lacks the adapter arrays or the metrics"
    metrics = content[keys.METRICS]
    try:
        update = _numpy(content[keys.ARRAYS])
        num_examples = float(metrics.get(keys.NUM_EXAMPLES, 0))
        with_modality = [float(metrics.get(k, 0)) for k in (keys.NUM_IMAGE_EXAMPLES,
                                                            keys.NUM_TEXT_EXAMPLES)]
    except (ValueError, TypeError) as err:
        return f"reply cannot be decoded: {err}"
    if not all(0 <= c <= num_examples for c in with_modality):  # NaN fails too
        return (f"modality counts {with_modality} outside [0, num-examples={num_examples:g}]")
    if rank_flexible:
        problem = pair_rank_problem(update, expected)
        if problem:
            return problem
        expected = {k: (np.shape(update[k]) if ".lora_" in k and k in update else s)
                    for k, s in expected.items()}
    return rejection_reason(expected, update, num_examples)


class NormBoundedFedAvg(FedAvg):
    """FedAvg of updates clipped to a norm bound (default: the round's median update norm)."""

    norm_bound: float = 0.0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [m for m in replies if not m.has_error()]
        if not replies:
            return None, None
        states = [_numpy(m.content[keys.ARRAYS]) for m in replies]
        weights = [float(m.content[keys.METRICS][keys.NUM_EXAMPLES]) for m in replies]
        state, bound = norm_bounded_mean(states, weights, self.global_state,  # type: ignore[attr-defined]
                                         self.norm_bound or None)
        log.info("round %d: updates clipped to norm %.4g", server_round, bound)
        metrics = self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key)
        return _record(state), metrics


def _screened(base: type) -> type:
    return type(f"Screened{base.__name__}", (ScreenedAggregation, base), {})


FLOWER_STRATEGIES: dict[str, type] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi,
    "fedavgm": FedAvgM, "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum,
    "multikrum": MultiKrum, "normbounded": NormBoundedFedAvg}


def strategy_args(cfg: StrategyConfig) -> dict:
    """The constructor arguments of the configured Flower strategy."""
    args: dict = dict(fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
                      min_train_nodes=cfg.min_train_nodes,
                      min_evaluate_nodes=min(cfg.min_train_nodes, cfg.min_available_nodes),
                      min_available_nodes=cfg.min_available_nodes)
    extra = {"fedprox": dict(proximal_mu=cfg.proximal_mu),
             "fedadam": dict(eta=cfg.server_lr, eta_l=cfg.lr),
             "fedyogi": dict(eta=cfg.server_lr, eta_l=cfg.lr),
             "fedavgm": dict(server_learning_rate=cfg.server_lr,
                             server_momentum=cfg.server_momentum),
             "fedtrimmedavg": dict(beta=cfg.trim_fraction),
             "krum": dict(num_malicious_nodes=cfg.num_malicious),
             "multikrum": dict(num_malicious_nodes=cfg.num_malicious,
                               num_nodes_to_select=cfg.num_to_keep)}
    return {**args, **extra.get(cfg.name, {})}


def make_strategy(cfg: StrategyConfig, initial: ArrayRecord, lora_alpha: float = 1.0
                  ) -> ScreenedAggregation:
    """Build the configured strategy; `initial` fixes the keys and shapes replies must have."""
    strategy = _screened(FLOWER_STRATEGIES[cfg.name])(**strategy_args(cfg))
    strategy.reference = {k: tuple(v.shape) for k, v in initial.items()}
    strategy.round_stats, strategy.residuals, strategy.node_ranks = {}, {}, {}
    strategy.global_state, strategy.global_delta = _numpy(initial), {}
    a_key = next((k for k in strategy.reference if ".lora_A." in k), None)
    strategy.lora_rank = strategy.reference[a_key][0] if a_key else 1
    strategy.lora_mode, strategy.lora_alpha = cfg.lora_aggregation, lora_alpha
    strategy.rank_flexible = cfg.name in MEAN_STRATEGIES and cfg.lora_aggregation == "naive"
    strategy.modality_weighting = cfg.modality_weighting and cfg.name in MEAN_STRATEGIES
    strategy.max_update_norm, strategy.norm_bound = cfg.max_update_norm, cfg.norm_bound
    return strategy
