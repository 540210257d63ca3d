"""Privacy math: the (ε, δ) accountant, the noise solver, the SecAgg+ error bound.

Which privacy settings compose with what is in the rule table, common/rules.py.

Accounting uses Google's dp-accounting RDP accountant (add/remove-one neighbours). One DP release
is a Gaussian mechanism of noise multiplier z (noise std = z × sensitivity), subsampled with
rate q:

  central DP   one release per round; the unit is a site, q = strategy.fraction_train,
               sensitivity of the uniform mean = clipping_norm / sampled sites
  local DP     one release per DP-SGD step at a site; the unit is a sample,
               q = batch_size / site samples (Poisson, as Opacus samples batches)

q < 1 is accounted as Poisson subsampling. With `strategy.sampling=poisson` that is what happens:
each site joins a round independently with probability q (`poisson_sample`) and the server
releases the Gaussian sum mechanism with a fixed denominator (`gaussian_sum_release`, DP-FedAvg
of McMahan et al. 2018: (Σ clip(Δ_k, C) + N(0, z²C²)) / (q·N)), so the amplification the
accountant assumes is the one that holds. With `strategy.sampling=fixed` Flower samples a fixed
number of sites, for which Poisson accounting is the usual approximation (docs/threat_model.md).
With q = 1 there is no amplification. tests/unit/test_privacy.py checks this accountant against
Opacus's RDP analysis, with and without sampling.

`noise_to_signal` is the advice the launcher prints before a run: the expected norm of one
release's noise over the clipping norm, z·√d / m for d noised coordinates and m sites (central)
or samples (local DP-SGD) per release; above 1 the noise outweighs any update.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from common.schema import Config


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


def expected_sampled_sites(cfg: Config, num_nodes: int | None = None) -> float:
    """Sites per round: q·N under Poisson sampling (the release's fixed denominator), else
    Flower's fixed sample size."""
    if cfg.strategy.sampling == "poisson":
        return central_sample_rate(cfg) * (num_nodes or cfg.partition.num_clients)
    return num_sampled_sites(cfg, num_nodes)


def poisson_sample(node_ids: list[int], rate: float, seed: int, server_round: int) -> list[int]:
    """The nodes that train this round: each independently with probability `rate` (seeded)."""
    rng = np.random.default_rng([seed, server_round, 0x5A3])
    nodes = sorted(node_ids)
    return [n for n, keep in zip(nodes, rng.random(len(nodes)) < rate) if keep]


def gaussian_sum_release(updates: list[dict[str, np.ndarray]], shapes: dict[str, tuple],
                         clipping_norm: float, noise_multiplier: float, divisor: float,
                         rng: np.random.Generator) -> dict[str, np.ndarray]:
    """(Σ_k clip(Δ_k, C) + N(0, (z·C)²·I)) / divisor, over the keys of `shapes`.

    Each site's update Δ_k (all its tensors together) is scaled to L2 norm <= C, so adding or
    removing one site moves the sum by <= C: noise of std z·C makes it a Gaussian mechanism of
    multiplier z. The divisor is public (q·N), never the number of sites that replied; a round
    that sampled no site releases noise alone.
    """
    total = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
    for update in updates:
        norm = math.sqrt(sum(float(np.sum(np.square(update[k], dtype=np.float64)))
                             for k in shapes))
        scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
        for k in shapes:
            total[k] += scale * update[k]
    std = noise_multiplier * clipping_norm
    return {k: ((v + rng.normal(0.0, std, v.shape)) / divisor).astype(np.float32)
            for k, v in total.items()}


def noise_to_signal(cfg: Config, num_coordinates: int, site_examples: int = 0) -> float:
    """Expected ‖noise‖ / C of one DP release: z·√d / m (0 without DP).

    Central DP: m = sites per release (`expected_sampled_sites`), d = uploaded coordinates.
    Local DP-SGD: m = the batch size, d = trainable coordinates, z solved for a site of
    `site_examples` rows when a target ε is set.
    """
    p = cfg.privacy
    if p.dp == "none":
        return 0.0
    z, m = p.noise_multiplier, expected_sampled_sites(cfg)
    if p.dp == "local":
        t = cfg.train
        m = t.batch_size
        if p.target_epsilon > 0 and site_examples > 0:
            z = local_noise_multiplier(p.target_epsilon, site_examples, t.batch_size, t.epochs,
                                       cfg.strategy.rounds, p.delta)
    return z * math.sqrt(num_coordinates) / max(m, 1e-12)


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
