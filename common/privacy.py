"""Privacy math: which privacy settings compose, the (ε, δ) accountant, the SecAgg+ error bound.

Accounting uses Google's dp-accounting RDP accountant (add/remove-one neighbours). One DP release
is a Gaussian mechanism of noise multiplier z (noise std = z × sensitivity), subsampled with
rate q:

  central DP   one release per round; the unit is a site, q = strategy.fraction_train,
               sensitivity of the uniform mean = clipping_norm / sampled sites
  local DP     one release per DP-SGD step at a site; the unit is a sample,
               q = batch_size / site samples (Poisson, as Opacus samples batches)

q < 1 is accounted as Poisson subsampling; Flower samples a fixed number of sites, for which
this is the usual approximation (README, "Threat model"). With q = 1 there is no amplification.
tests/unit/test_privacy.py checks this accountant against Opacus's RDP analysis.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import Config

NEEDS_PLAINTEXT = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "normbounded")


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Cumulative ε at `delta` after `steps` subsampled Gaussian releases (RDP)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    absl = logging.getLogger("absl")  # it logs each order whose series does not converge
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant = RdpAccountant()  # dp-accounting's default orders, 1.1 .. 1024
        accountant.compose(event, steps)
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def solve_noise_multiplier(target_epsilon: float, sample_rate: float, steps: int,
                           delta: float, tol: float = 1e-4) -> float:
    """Smallest noise multiplier (to `tol`) whose ε after `steps` is at most `target_epsilon`."""
    low, high = 0.0, 1.0
    while epsilon(high, sample_rate, steps, delta) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches ε={target_epsilon}")
    while high - low > tol:
        mid = (low + high) / 2
        if epsilon(mid, sample_rate, steps, delta) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def central_sample_rate(cfg: Config) -> float:
    """The share of sites that train in a round (Flower's fraction_train)."""
    return min(1.0, cfg.strategy.fraction_train)


def num_sampled_sites(cfg: Config, num_nodes: int | None = None) -> int:
    """How many sites Flower samples per round (its FedAvg rule: int(n × fraction), ≥ min)."""
    n = num_nodes or cfg.partition.num_clients
    return max(int(n * cfg.strategy.fraction_train), cfg.strategy.min_train_nodes)


def resolve_noise_multiplier(cfg: Config) -> Config:
    """Central DP with a target ε: set the noise multiplier that reaches it over the rounds."""
    p = cfg.privacy
    if p.dp == "none" or p.dp == "local" or p.target_epsilon <= 0:
        return cfg
    z = solve_noise_multiplier(p.target_epsilon, central_sample_rate(cfg), cfg.strategy.rounds,
                               p.delta)
    return replace(cfg, privacy=replace(p, noise_multiplier=z))


def local_steps(num_examples: int, batch_size: int, epochs: int) -> int:
    """DP-SGD steps one site takes in one round (expected batches per epoch × epochs)."""
    return epochs * max(1, math.ceil(num_examples / batch_size))


@functools.lru_cache(maxsize=64)
def local_noise_multiplier(target_epsilon: float, num_examples: int, batch_size: int,
                           epochs: int, rounds: int, delta: float) -> float:
    """A site's DP-SGD noise multiplier that reaches `target_epsilon` if it trains every round."""
    steps = rounds * local_steps(num_examples, batch_size, epochs)
    return solve_noise_multiplier(target_epsilon, min(1.0, batch_size / num_examples), steps,
                                  delta)


def secagg_error_bound(num_sites: int, clipping_range: float, quantization_range: int,
                       weight_sum: float) -> float:
    """Largest per-coordinate gap between the SecAgg+ mean and plaintext FedAvg: 3·K·c / (Q·Σw).

    Site k uploads w_k·Δ_k on a grid of step 2c/Q over [-c, c] (stochastic rounding: error
    < 2c/Q), with w_k = n_k / max_weight itself rounded to a multiple of 1/Q (error <= 1/(2Q)).
    The server divides the sum by Σ_k w_k. Rounding of the K uploads adds < K·2c/(Q·Σw); the
    rounded weights move the weighted mean of values in [-c, c] by <= c·Σ|Δp_k| <= K·c/(Q·Σw).
    Holds when no coordinate is clipped (|Δ_k| <= c) and K·Q < modulus (2**32), so the integer
    sum never wraps. `weight_sum` is Σ_k w_k.
    """
    return 3 * num_sites * clipping_range / (quantization_range * weight_sum)


def check_privacy(c: Config) -> None:
    """Refuse privacy settings that are out of range or do not compose with the strategy."""
    from common.config import CENTRAL_DP, DP_MODES, MEAN_STRATEGIES, _require

    p, s = c.privacy, c.strategy
    _require(p.dp in DP_MODES, "privacy.dp", f"one of {list(DP_MODES)}", p.dp)
    _require(0 < p.delta < 1, "privacy.delta", "in (0, 1)", p.delta)
    _require(p.noise_multiplier >= 0, "privacy.noise_multiplier", ">= 0", p.noise_multiplier)
    _require(p.target_epsilon >= 0, "privacy.target_epsilon", ">= 0", p.target_epsilon)
    _require(p.clipping_norm > 0, "privacy.clipping_norm", "> 0", p.clipping_norm)
    _require(0 <= p.target_clipped_quantile <= 1, "privacy.target_clipped_quantile",
             "in [0, 1]", p.target_clipped_quantile)
    _require(p.clip_norm_lr > 0, "privacy.clip_norm_lr", "> 0", p.clip_norm_lr)
    _require(p.clipped_count_stddev >= 0, "privacy.clipped_count_stddev", ">= 0",
             p.clipped_count_stddev)
    if p.dp != "none":
        _require(p.noise_multiplier > 0 or p.target_epsilon > 0, "privacy.noise_multiplier",
                 f"> 0 (or privacy.target_epsilon > 0) with privacy.dp={p.dp}",
                 p.noise_multiplier)
    if p.dp == "local":
        missing = {k: v for k, v in vars(c.skew).items() if k.startswith("missing_") and v > 0}
        _require(not missing, "skew", "free of missing modalities with privacy.dp=local (a tower "
                 "that skips rows breaks Opacus's per-sample gradients)", missing)
        _require(s.proximal_mu == 0, "strategy.proximal_mu", "0 with privacy.dp=local (the "
                 "proximal term is not a per-sample loss)", s.proximal_mu)
        _require(s.absent_class_scale == 1, "strategy.absent_class_scale", "1 with "
                 "privacy.dp=local (the site's label set is not covered by per-sample clipping)",
                 s.absent_class_scale)
        hidden = s.modality_dropout_text + s.modality_dropout_image
        _require(hidden == 0, "strategy.modality_dropout_text", "0 (and modality_dropout_image "
                 "0) with privacy.dp=local (a tower that skips rows breaks Opacus's per-sample "
                 "gradients)", hidden)
        _require(s.max_grad_norm == 0, "strategy.max_grad_norm", "0 with privacy.dp=local "
                 "(DP-SGD clips each sample to privacy.clipping_norm)", s.max_grad_norm)
    if p.dp in CENTRAL_DP:
        why = (f"with privacy.dp={p.dp} (the DP wrappers clip and noise one uniform mean of "
               "whole-adapter updates)")
        _require(s.name in MEAN_STRATEGIES, "strategy.name", f"one of {list(MEAN_STRATEGIES)} "
                 + why, s.name)
        _require(s.lora_aggregation == "naive", "strategy.lora_aggregation", "naive " + why,
                 s.lora_aggregation)
        _require(not c.simulation.site_ranks, "simulation.site_ranks", "[] " + why,
                 c.simulation.site_ranks)
        _require(not p.secagg, "privacy.secagg", f"false with privacy.dp={p.dp} (central DP "
                 "here is wired to the plaintext Message-API strategy; use privacy.dp=local "
                 "with SecAgg+)", p.secagg)
    if not p.secagg:
        return
    _require(not c.resume, "resume", "false with privacy.secagg=true (Flower's legacy SecAgg+ "
             "workflow always starts at round 1)", c.resume)
    why = "with privacy.secagg=true (the server only sees the sum of masked updates; "
    _require(s.lora_aggregation != "exact", "strategy.lora_aggregation", "naive or ffa " + why
             + "exact needs each site's factors to form the product residual)",
             s.lora_aggregation)
    _require(s.name in MEAN_STRATEGIES, "strategy.name", f"one of {list(MEAN_STRATEGIES)} "
             + why + ("robust aggregation needs each update in plaintext)"
                      if s.name in NEEDS_PLAINTEXT else "server optimizers are not wired "
                      "through SecAgg+ here)"), s.name)
    _require(not c.simulation.site_ranks, "simulation.site_ranks", "[] " + why
             + "heterogeneous ranks need each site's factors)", c.simulation.site_ranks)
    _require(s.max_update_norm == 0, "strategy.max_update_norm", "0 " + why
             + "screening an update's norm needs it in plaintext)", s.max_update_norm)
    _require(s.fraction_evaluate == 0, "strategy.fraction_evaluate", "0 " + why
             + "the server evaluates the global adapter on the test split)", s.fraction_evaluate)
    _require(p.num_shares > 0, "privacy.num_shares", "> 0", p.num_shares)
    _require(p.num_shares <= 1 or (p.num_shares == int(p.num_shares) and p.num_shares > 2),
             "privacy.num_shares", "a fraction in (0, 1] or an integer > 2", p.num_shares)
    _require(0 < p.reconstruction_threshold, "privacy.reconstruction_threshold", "> 0",
             p.reconstruction_threshold)
    _require(p.reconstruction_threshold <= 1 or p.reconstruction_threshold < p.num_shares
             or p.num_shares <= 1, "privacy.reconstruction_threshold",
             "a fraction in (0, 1] or an integer < privacy.num_shares",
             p.reconstruction_threshold)
    _require(p.clipping_range > 0, "privacy.clipping_range", "> 0", p.clipping_range)
    _require(0 < p.quantization_range < 2**31, "privacy.quantization_range", "in (0, 2**31)",
             p.quantization_range)
    _require(p.max_weight > 0, "privacy.max_weight", "> 0", p.max_weight)
    _require(num_sampled_sites(c) >= 3, "strategy.fraction_train",
             "large enough to sample >= 3 sites with privacy.secagg=true", s.fraction_train)
