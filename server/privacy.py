"""Central DP on the server: Flower's DP strategy wrappers, inside fedmm's screening.

`privacy.dp` picks Flower's Message-API wrapper (flwr.serverapp.strategy) around the Flower
strategy; fedmm's ScreenedStrategy (server/strategy.py) wraps both:

  server_fixed     DifferentialPrivacyServerSideFixedClipping: the server clips each update
  server_adaptive  DifferentialPrivacyServerSideAdaptiveClipping (Andrew et al. 2019)
  client_fixed     DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod at sites
  client_adaptive  DifferentialPrivacyClientSideAdaptiveClipping + adaptiveclipping_mod

Each adds N(0, (z·C/m)²) to the mean of m sampled sites' updates clipped to L2 norm C. That
sensitivity holds for an unweighted mean only, so in DP mode every kept reply weighs 1 (not its
num-examples). Replies are screened before the wrapper clips them (a malformed reply would
otherwise break its clipping). The accountant (common/privacy.py) counts noised releases: ε after
r releases at sampling rate q = strategy.fraction_train; for adaptive clipping z is the
effective multiplier (Flower splits it between the update and the clipped-count noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from flwr.serverapp.strategy import (DifferentialPrivacyClientSideAdaptiveClipping,
                                     DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideAdaptiveClipping,
                                     DifferentialPrivacyServerSideFixedClipping, Strategy)

from common import keys
from common.config import CENTRAL_DP, Config
from common.privacy import central_sample_rate, epsilon
from server.strategy import RoundStats

WRAPPERS = {"server_fixed": DifferentialPrivacyServerSideFixedClipping,
            "client_fixed": DifferentialPrivacyClientSideFixedClipping,
            "server_adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
            "client_adaptive": DifferentialPrivacyClientSideAdaptiveClipping}


def dp_wrapper(cfg: Config, num_sampled: int) -> Callable[[Strategy], Strategy]:
    """Wrap a Flower strategy in the configured Flower DP wrapper (identity without DP)."""
    p = cfg.privacy
    if p.dp not in CENTRAL_DP:
        return lambda strategy: strategy
    wrapper = WRAPPERS[p.dp]
    if p.dp.endswith("fixed"):
        return lambda strategy: wrapper(strategy, p.noise_multiplier, p.clipping_norm,
                                        num_sampled)
    return lambda strategy: wrapper(strategy, p.noise_multiplier, num_sampled,
                                    initial_clipping_norm=p.clipping_norm,
                                    target_clipped_quantile=p.target_clipped_quantile,
                                    clip_norm_lr=p.clip_norm_lr,
                                    clipped_count_stddev=p.clipped_count_stddev or None)


def privacy_metrics(cfg: Config, releases: int, stats: RoundStats) -> dict[str, float]:
    """A round row's privacy fields: central DP's ε from the releases so far, local DP's
    largest site ε, SecAgg+'s error bound."""
    p = cfg.privacy
    out: dict = {}
    if p.secagg and not math.isnan(stats.secagg_bound):
        out[keys.SECAGG_ERROR_BOUND] = stats.secagg_bound
    if p.dp in CENTRAL_DP:
        eps = epsilon(p.noise_multiplier, central_sample_rate(cfg), releases, p.delta)
        out.update({keys.EPSILON: eps, keys.DELTA: p.delta,
                    keys.NOISE_MULTIPLIER: p.noise_multiplier})
    elif p.dp == "local":
        eps = stats.site_epsilon
        out.update({keys.EPSILON: None if math.isnan(eps) else eps, keys.DELTA: p.delta})
    return out
