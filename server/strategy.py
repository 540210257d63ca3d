"""fedmm's strategy: a Flower strategy behind reply screening and LoRA-aware aggregation.

`ScreenedStrategy` wraps the configured Flower strategy (FedAvg, FedProx, FedAdam, FedYogi,
FedAvgM, FedMedian, FedTrimmedAvg, Krum, MultiKrum, or `NormBoundedFedAvg`, which Flower lacks;
behind one of Flower's central-DP wrappers when DP is on), the way Flower's own DP wrappers
wrap a strategy. Before any aggregation each reply is screened (keys, shapes, dtype, NaN/Inf,
num-examples, update norm): a bad one is dropped with a logged reason and counted, the round
goes on with the rest, and the global state is never touched by it. A compressed update
(`strategy.compression`, common/compression.py) is decoded to plain arrays before screening.

LoRA modes (`strategy.lora_aggregation`, math in common/lora_math.py):
  naive  Flower's aggregation of every tensor, A and B separately (FedIT baseline); for
         fedavg/fedprox without DP the same weighted mean is taken here (float64 accumulation)
         on the arrays screening decoded, so each reply is decoded once; it doubles as the
         NaN/Inf screen (finite exactly when every reply is; one by one only when it is not).
  ffa    sites freeze A (shared seed) and upload the rest; the server re-inserts the global A.
  exact  FedEx-LoRA: mean A, mean B, and the residual mean(s·B_k·A_k) - s·mean(B)·mean(A)
         folded into the frozen base weights, sent to sites beside the adapter.
Site sampling (`strategy.sampling`): `fixed` is Flower's (int(N·fraction_train) sites);
`poisson` asks the inner strategy for every site and keeps each with probability fraction_train
(common/privacy.py::poisson_sample). Central DP with Poisson sampling (`server_fixed` only) is
released here, not by Flower's wrapper, whose noise is scaled by the number of replies:
global + (Σ clip(Δ_k, C) + N(0, z²C²)) / (q·N), also for a round that sampled no site.
What aggregation carries across rounds is one `StrategyState` (server/checkpoint.py saves it).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flower
from flwr.serverapp.strategy import Strategy

from common import keys
from common.adapter import nonfinite_key
from common.compression import CompressionError, decompress
from common.lora_math import (aggregate_exact, aggregate_heterogeneous, aggregate_naive, delta_w,
                              lora_pairs, refactor_like, reweight_towers, update_norm)
from common.privacy import expected_sampled_sites, gaussian_sum_release, poisson_sample
from common.rules import value_at
from common.schema import CENTRAL_DP, Config, StrategyConfig
from common.strategies import LORA_MODES, site_only, traits
from server.flower_state import (aggregate_train_metrics, read_optimizer_state,
                                 write_optimizer_state)
from server.normbounded import NormBoundedFedAvg
from server.replies import (DecodedArray, decode_arrays, in_content_order, reply_problem,
                            site_results, to_record, uploaded_bytes)

log = logging.getLogger("fedmm.server")


@dataclass
class RoundStats:
    sampled: int = 0
    replied: int = 0
    rejected: int = 0
    bytes_uploaded: int = 0
    train_loss: float = float("nan")
    site_epsilon: float = float("nan")  # local DP-SGD: the largest ε a site reported
    site_seconds: list[float] = field(default_factory=list)  # each kept site's training time
    secagg_bound: float = float("nan")  # SecAgg+: per-coordinate bound vs plaintext FedAvg
    reasons: list[str] = field(default_factory=list)  # why replies were lost: "node N: ..."
    aggregated: bool = False  # the round produced a new global adapter
    site_startups: list[float] = field(default_factory=list)  # message start to first step
    aggregate_s: float = float("nan")  # screening + aggregation at the server
    sites: dict[str, dict] = field(default_factory=dict)  # federated evaluation, per site

    def timings(self) -> dict[str, float]:
        """Start-up and aggregation columns for metrics.jsonl (NaN where nothing was measured)."""
        startups = self.site_startups
        return {"site_startup_s": round(float(np.mean(startups)), 3) if startups else math.nan,
                "site_startup_s_max": max(startups, default=math.nan),
                "aggregate_s": self.aggregate_s}


@dataclass
class StrategyState:
    """What aggregation carries from round to round; every checkpoint saves and restores it."""

    residuals: dict[str, np.ndarray] = field(default_factory=dict)  # exact: base-weight residual
    global_delta: dict[str, np.ndarray] = field(default_factory=dict)  # ranks: dense ΔW per layer
    node_ranks: dict[int, int] = field(default_factory=dict)  # each site's rank, from replies
    dp_releases: int = 0  # central DP: noised aggregates released so far (the accountant state)
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)  # Flower's (flower_state.py)


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


class ScreenedStrategy(Strategy):
    """Screen, count and log replies, then aggregate with the inner Flower strategy (LoRA-aware)."""

    def __init__(self, inner: Strategy, cfg: StrategyConfig, initial: ArrayRecord,
                 lora_alpha: float, central_dp: bool = False,
                 site_factors: tuple[str, ...] | None = None, seed: int = 0,
                 dp_release: Callable[[list[dict], dict, np.random.Generator], dict] | None = None):
        self.inner, self.cfg, self.central_dp = inner, cfg, central_dp
        self.seed, self.dp_release = seed, dp_release  # dp_release: central DP, Poisson sites
        self.traits, self.lora_mode = traits(cfg.name), LORA_MODES[cfg.lora_aggregation]
        # LoRA factors that stay at the sites (ffa: A; fedsa: B): the global ones are kept
        self.site_factors = site_only(cfg.lora_aggregation) if site_factors is None else site_factors
        self.reference = {k: tuple(v.shape) for k, v in initial.items()}
        self.global_state = decode_arrays(initial)
        a_key = next((k for k in self.reference if ".lora_A." in k), None)
        self.lora_rank = self.reference[a_key][0] if a_key else 1
        self.lora_alpha = lora_alpha
        self.rank_flexible = (self.traits.linear and cfg.lora_aggregation == "naive"
                              and not self.site_factors)  # (fedsa: no B to refactor with)
        self.modality_weighting = cfg.modality_weighting and self.traits.linear and not central_dp
        self.state = StrategyState()
        self.round_stats: dict[int, RoundStats] = {}
        # fedavg/fedprox without DP: the weighted mean is taken here, on arrays decoded once
        self.own_mean = self.traits.kind == "mean" and not central_dp
        self._decoded: dict[int, tuple[ArrayRecord, dict[str, np.ndarray]]] = {}
        self._mean: tuple[list[int], dict[str, np.ndarray]] = ([], {})  # screening's, by reply
        self.round_offset = 0  # a resumed run: rounds completed before this ServerApp started
        self.sent: list[Message] = []  # this round's train messages

    def summary(self) -> None:
        self.inner.summary()

    def start(self, *, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int,
              start_round: int = 1, evaluate_fn: Callable | None = None, **kwargs):
        """Flower's round loop from `start_round` on (resume), with true round numbers.

        Flower counts rounds from 1; every hook below adds `round_offset`, so sites, metrics
        and checkpoints see rounds start_round..num_rounds.
        """
        self.round_offset = start_round - 1
        return super().start(grid=grid, initial_arrays=initial_arrays,
                             num_rounds=num_rounds - self.round_offset,
                             evaluate_fn=shift_rounds(evaluate_fn, self.round_offset), **kwargs)

    def snapshot(self) -> StrategyState:
        """The state to checkpoint, Flower's server-optimizer state included."""
        self.state.optimizer = read_optimizer_state(self.inner, self.traits.server_state)
        return self.state

    def restore(self, state: StrategyState) -> None:
        """Continue from a checkpointed state (a fresh strategy built from the same config)."""
        self.state = state
        write_optimizer_state(self.inner, state.optimizer)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self.global_state = decode_arrays(arrays)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if self.cfg.sampling == "poisson":  # the inner strategy addressed every site
            chosen = set(poisson_sample([m.metadata.dst_node_id for m in messages],
                                        self.cfg.fraction_train, self.seed, server_round))
            messages = [m for m in messages if m.metadata.dst_node_id in chosen]
        for msg in messages:
            rank = self.state.node_ranks.get(msg.metadata.dst_node_id, self.lora_rank)
            if rank != self.lora_rank and self.state.global_delta:  # FlexLoRA: site's own rank
                msg.content = RecordDict({keys.ARRAYS: to_record(self.arrays_for_rank(rank)),
                                          keys.CONFIG: msg.content[keys.CONFIG]})
            if self.state.residuals:
                msg.content[keys.BASE_RESIDUALS] = to_record(self.state.residuals)
        self.round_stats[server_round] = RoundStats(sampled=len(messages))
        self.sent = messages  # the Grid gives each its message id as it sends it
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.round_offset, arrays, config,
                                             grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Keep each site's figures on its held-out share; Flower averages them as usual."""
        server_round += self.round_offset
        replies = in_content_order(replies)
        stats = self.round_stats.setdefault(server_round, RoundStats())
        stats.sites = site_results(replies)
        return self.inner.aggregate_evaluate(server_round, replies)

    def expected_keys(self) -> dict[str, tuple[int, ...]]:
        """Keys and shapes a site uploads (ffa sites keep A to themselves, fedsa sites B)."""
        if self.site_factors:
            return {k: s for k, s in self.reference.items()
                    if not any(f in k for f in self.site_factors)}
        return self.reference

    def arrays_for_rank(self, rank: int) -> dict[str, np.ndarray]:
        """The global adapter with every LoRA pair re-factored from the dense ΔW at `rank`."""
        state = dict(self.global_state)
        for prefix, (a_key, b_key) in lora_pairs(state).items():
            state[b_key], state[a_key] = refactor_like(self.state.global_delta[prefix], rank,
                                                       self.lora_alpha / rank,
                                                       state[a_key].shape, state[b_key].shape)
        return state

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Drop and count replies unfit to aggregate; re-insert factors kept at the sites."""
        stats = self.round_stats.setdefault(server_round, RoundStats())
        expected, kept, replies = self.expected_keys(), [], list(replies)
        # the node each reply answers for: the SuperLink itself answers for a lost node
        to_node = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent
                   if m.metadata.message_id}
        nodes = [to_node.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
                 for m in replies]
        for node in sorted({m.metadata.dst_node_id for m in self.sent} - set(nodes)):
            stats.reasons.append(f"node {node}: no reply within strategy.round_timeout_s="
                                 f"{self.cfg.round_timeout_s:g}")
        verdicts = []  # [reply, node, bytes as sent, why it is rejected or None]
        for msg, node in zip(replies, nodes):
            uploaded = uploaded_bytes(msg)
            reason = self.decompress(msg, expected)
            reason = reason or reply_problem(msg, expected, self.rank_flexible, self.arrays,
                                             check_finite=not self.own_mean)
            if reason is None and self.cfg.max_update_norm > 0:
                state = self.arrays(msg)
                norm = update_norm(state, {k: self.global_state[k] for k in state})
                if norm > self.cfg.max_update_norm:
                    reason = f"update norm {norm:.3g} exceeds strategy.max_update_norm"
            verdicts.append([msg, node, uploaded, reason])
        if self.own_mean:
            self.check_finite_by_mean(verdicts)
        for msg, node, uploaded, reason in verdicts:
            if reason is not None:
                stats.rejected += 1
                stats.reasons.append(f"node {node}: {reason}")
                log.warning("round %d: rejected reply for node %d: %s", server_round, node,
                            reason)
                continue
            stats.bytes_uploaded += uploaded
            self.state.node_ranks[msg.metadata.src_node_id] = self._rank(msg)
            if self.site_factors and not self.own_mean:  # (the mean sets them last)
                # in the global adapter's key order: Flower's DP clipping pairs arrays by position
                record, state = msg.content[keys.ARRAYS], dict(self.arrays(msg))
                full = ArrayRecord({k: record[k] if k in record else Array(self.global_state[k])
                                    for k in self.reference})
                state.update({k: self.global_state[k] for k in self.reference.keys() - state.keys()})
                msg.content[keys.ARRAYS] = full
                self._decoded[id(full)] = (full, state)
            if self.central_dp:  # the noise's sensitivity C/m needs an unweighted mean
                msg.content[keys.METRICS][keys.NUM_EXAMPLES] = 1
            kept.append(msg)
        stats.replied = len(kept)
        note_site_epsilon(stats, [m.content[keys.METRICS] for m in kept])
        note_site_timings(stats, [m.content[keys.METRICS] for m in kept])
        return kept

    def check_finite_by_mean(self, verdicts: list[list]) -> None:
        """Reject the replies holding NaN/Inf, in one pass when none does: the float64 mean of
        float32 arrays with positive weights is finite exactly when every array is. The mean
        is kept for `aggregate_mean`; replies are checked one by one only when it is not finite.
        """
        fit = [v for v in verdicts if v[3] is None]
        states = [self.arrays(v[0]) for v in fit]
        try:
            mean = aggregate_naive(states, example_counts([v[0] for v in fit])) if fit else {}
        except ValueError:  # LoRA ranks differ between sites: no common mean
            mean = None
        if mean is not None and nonfinite_key(mean, mean) is None:
            self._mean = ([id(v[0]) for v in fit], mean)
            return
        for verdict, state in zip(fit, states):
            key = nonfinite_key(state, state)
            if key is not None:
                verdict[3] = f"{key}: holds NaN or Inf"

    def decompress(self, msg: Message, expected: dict[str, tuple[int, ...]]) -> str | None:
        """Replace a compressed update by the plain adapter global + Δ; why it cannot be, or None."""
        if (self.cfg.compression == "none" or msg.has_error()
                or keys.ARRAYS not in msg.content.array_records):
            return None  # plain arrays, or a reply that screening rejects with its own reason
        try:
            delta = decompress(decode_arrays(msg.content[keys.ARRAYS]), self.cfg.compression, expected)
        except (CompressionError, ValueError, TypeError) as err:
            return f"{self.cfg.compression} update cannot be decoded: {err}"
        state = {k: self.global_state[k] + d for k, d in delta.items()}
        msg.content[keys.ARRAYS] = record = to_record(state)
        self._decoded[id(record)] = (record, state)
        return None

    def arrays(self, msg: Message) -> dict[str, np.ndarray]:
        """A reply's arrays as NumPy, decoded once per round (screening, then aggregation)."""
        record = msg.content[keys.ARRAYS]
        cached = self._decoded.get(id(record))
        if cached is None or cached[0] is not record:
            cached = self._decoded[id(record)] = (record, decode_arrays(record))
        return cached[1]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        started = time.perf_counter()
        try:
            return self._aggregate_train(server_round, replies)
        finally:
            self._decoded.clear()
            self._mean = ([], {})
            self.round_stats[server_round].aggregate_s = round(time.perf_counter() - started, 4)

    def _aggregate_train(self, server_round: int, replies: Iterable[Message]
                         ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = self.screen(server_round, in_content_order(replies))
        if self.dp_release is not None:  # every round releases, whatever the replies
            return self.release_dp_sum(server_round, kept)
        if 0 < len(kept) < self.cfg.min_train_nodes:  # too few valid updates: keep the global
            log.warning("round %d: only %d valid update(s), fewer than min_train_nodes=%d; "
                        "round skipped, global adapter unchanged", server_round, len(kept),
                        self.cfg.min_train_nodes)
            self.round_stats[server_round].reasons.append("round skipped: too few valid updates")
            self.round_stats[server_round].replied = 0
            return None, None
        heterogeneous = set(self.state.node_ranks.values()) | {self._rank(m) for m in kept}
        if not self.lora_mode.linear and kept:
            arrays, metrics = self.aggregate_exact(kept)
        elif kept and self.rank_flexible and heterogeneous != {self.lora_rank}:
            arrays, metrics = self.aggregate_ranks(kept)
        else:
            if self.own_mean and kept:
                arrays, metrics = self.aggregate_mean(kept)
            else:
                for msg in kept:  # Flower's strategy reads the arrays screening decoded
                    decoded, record = self.arrays(msg), ArrayRecord()
                    for k, v in msg.content[keys.ARRAYS].items():
                        record[k] = DecodedArray.of(v, decoded[k])  # (the constructor copies)
                    msg.content[keys.ARRAYS] = record
                arrays, metrics = self.inner.aggregate_train(server_round, kept)
            if arrays is not None and self.modality_weighting:
                arrays = self.weight_towers_by_modality(arrays, kept)
            if arrays is not None and self.central_dp:
                self.state.dp_releases += 1
        if arrays is not None and self.site_factors:  # the global ones stay, bit for bit
            for k in self.reference.keys() - self.expected_keys().keys():
                arrays[k] = Array(self.global_state[k])
        if metrics is not None and keys.TRAIN_LOSS in metrics:
            self.round_stats[server_round].train_loss = float(metrics[keys.TRAIN_LOSS])
        self.round_stats[server_round].aggregated = arrays is not None
        return arrays, metrics

    def release_dp_sum(self, server_round: int, kept: list[Message]
                       ) -> tuple[ArrayRecord, MetricRecord | None]:
        """Central DP over Poisson-sampled sites: global + the noised, clipped sum / (q·N)."""
        shapes = self.expected_keys()  # ffa: the frozen A is neither clipped nor noised
        updates = [{k: self.arrays(m)[k] - self.global_state[k] for k in shapes} for m in kept]
        rng = np.random.default_rng([self.seed, server_round, 0xD9])
        mean = self.dp_release(updates, shapes, rng=rng)
        self.state.dp_releases += 1
        state = {k: (self.global_state[k] + mean[k] if k in mean else self.global_state[k])
                 for k in self.reference}
        metrics = (aggregate_train_metrics(self.inner, [m.content for m in kept]) if kept
                   else None)
        if metrics is not None and keys.TRAIN_LOSS in metrics:
            self.round_stats[server_round].train_loss = float(metrics[keys.TRAIN_LOSS])
        self.round_stats[server_round].aggregated = True
        return to_record(state), metrics

    def weight_towers_by_modality(self, arrays: ArrayRecord, kept: list[Message]) -> ArrayRecord:
        """Re-average each tower over the sites' rows that hold its modality (FedAvg per tower)."""
        metrics = [m.content[keys.METRICS] for m in kept]
        totals = np.array([float(m[keys.NUM_EXAMPLES]) for m in metrics])
        counts = {}
        for modality, key in keys.NUM_MODALITY_EXAMPLES.items():
            c = np.array([float(m.get(key, m[keys.NUM_EXAMPLES])) for m in metrics])
            if not np.array_equal(c, totals):  # else every row has it: the mean already is that
                counts[modality] = c
        if not counts:
            return arrays
        states = [self.arrays(m) for m in kept]
        return to_record(reweight_towers(decode_arrays(arrays), states, counts))

    def _rank(self, msg: Message) -> int:
        a_key = next((k for k in msg.content[keys.ARRAYS] if ".lora_A." in k), None)
        return msg.content[keys.ARRAYS][a_key].shape[0] if a_key else self.lora_rank

    def aggregate_ranks(self, kept: list[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """FlexLoRA: weighted mean of the sites' ΔW, re-factored to the global rank by SVD."""
        states = [self.arrays(m) for m in kept]
        weights = np.array(example_counts(kept))
        scalings = [self.lora_alpha / self._rank(m) for m in kept]
        state, errors = aggregate_heterogeneous(states, weights, scalings, self.lora_rank,
                                                self.lora_alpha / self.lora_rank)
        p = weights / weights.sum()
        self.state.global_delta = {prefix: sum(pk * delta_w(s, prefix, sk) for pk, s, sk in
                                               zip(p, states, scalings)).astype(np.float32)
                                   for prefix in lora_pairs(states[0])}
        log.info("heterogeneous ranks %s: worst rank-%d truncation error %.3g",
                 sorted({self._rank(m) for m in kept}), self.lora_rank,
                 max(errors.values(), default=0.0))
        return to_record(state), aggregate_train_metrics(self.inner, [m.content for m in kept])

    def aggregate_mean(self, kept: list[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """FedAvg: the num-examples-weighted mean of every tensor (float64 accumulation)."""
        mean = self.screened_mean(kept)
        if mean is None:
            mean = aggregate_naive([self.arrays(m) for m in kept], example_counts(kept))
        return (to_record(mean),
                aggregate_train_metrics(self.inner, [m.content for m in kept]))

    def screened_mean(self, kept: list[Message]) -> dict[str, np.ndarray] | None:
        """The weighted mean screening took of exactly these replies, or None."""
        ids, mean = self._mean
        return mean if ids == [id(m) for m in kept] else None

    def aggregate_exact(self, kept: list[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """FedEx-LoRA: average the factors, fold the residual into the base weights."""
        states = [self.arrays(m) for m in kept]
        state, residual = aggregate_exact(states, example_counts(kept), self.lora_alpha / self.lora_rank,
                                          self.screened_mean(kept))
        for prefix, r in residual.items():
            self.state.residuals[prefix] = self.state.residuals.get(prefix, 0) + r
        return to_record(state), aggregate_train_metrics(self.inner, [m.content for m in kept])


def example_counts(replies: list[Message]) -> list[float]:
    """Each reply's num-examples, the weight of its update in a mean."""
    return [float(m.content[keys.METRICS][keys.NUM_EXAMPLES]) for m in replies]


def note_site_epsilon(stats: RoundStats, metrics: list) -> None:
    """Keep the largest local-DP ε the sites of a round reported, and their training times."""
    stats.site_seconds = [float(m[keys.TRAIN_SECONDS]) for m in metrics
                          if keys.TRAIN_SECONDS in m]
    reported = [float(m[keys.SITE_EPSILON]) for m in metrics if keys.SITE_EPSILON in m]
    if reported:
        stats.site_epsilon = max(reported)


def note_site_timings(stats: RoundStats, metrics: list) -> None:
    """Keep the start-up seconds (message start to first step) the sites of a round reported."""
    stats.site_startups = [float(m[keys.SITE_STARTUP]) for m in metrics if keys.SITE_STARTUP in m]


def strategy_args(cfg: Config) -> dict:
    """The configured Flower strategy's constructor arguments (its traits map them to keys)."""
    s = cfg.strategy
    args = {arg: value_at(cfg, key) for arg, key in traits(s.name).args}
    if s.sampling == "poisson":  # every site is addressed; ScreenedStrategy draws who trains
        args.update(fraction_train=1.0, min_train_nodes=1)
    args["min_evaluate_nodes"] = min(s.min_train_nodes, s.min_available_nodes)
    if s.name == "normbounded":
        args["norm_bound"] = s.norm_bound
    return args


def flower_class(name: str) -> type[Strategy]:
    """The Flower strategy class a strategy name stands for (or fedmm's NormBoundedFedAvg)."""
    cls_name = traits(name).flower
    return NormBoundedFedAvg if cls_name == "NormBoundedFedAvg" else getattr(flower, cls_name)


def make_strategy(cfg: Config, initial: ArrayRecord,
                  wrap: Callable[[Strategy], Strategy] = lambda s: s) -> ScreenedStrategy:
    """The configured strategy: Flower's (wrapped by `wrap`: central DP) behind screening.

    `initial` fixes the keys and shapes replies must have.
    """
    inner = flower_class(cfg.strategy.name)(**strategy_args(cfg))
    p, release = cfg.privacy, None
    if cfg.strategy.sampling == "poisson" and p.dp in CENTRAL_DP:  # rules: server_fixed only
        divisor = expected_sampled_sites(cfg)
        release = functools.partial(gaussian_sum_release, clipping_norm=p.clipping_norm,
                                    noise_multiplier=p.noise_multiplier, divisor=divisor)
    else:
        inner = wrap(inner)
    return ScreenedStrategy(inner, cfg.strategy, initial, cfg.model.lora.alpha,
                            central_dp=p.dp in CENTRAL_DP, seed=cfg.seed, dp_release=release,
                            site_factors=site_only(cfg.strategy.lora_aggregation,
                                                   cfg.personalization.name))
