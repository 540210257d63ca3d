"""Simulated site faults: which sites fail or hang in a round (simulation only, seeded).

`simulation.drop_sites` fail every round; a share `simulation.crash_fraction` of the sites,
drawn per (seed, round), crash after training and before replying; `simulation.straggler_sites`
hang `simulation.straggler_s` seconds in `simulation.straggler_rounds` before training. The
ClientApp (client/app.py) asks here; the server sees only Flower's error replies and silence.
"""

from __future__ import annotations

import numpy as np

from common.schema import SimulationConfig


def crashing_sites(seed: int, server_round: int, num_sites: int, fraction: float) -> set[int]:
    """The partitions that crash in `server_round`: round(fraction * num_sites) of them."""
    count = round(fraction * num_sites)
    order = np.random.default_rng([seed, server_round]).permutation(num_sites)
    return set(order[:count].tolist())


def crashes(sim: SimulationConfig, seed: int, server_round: int, site: int,
            num_sites: int) -> bool:
    """Whether partition `site` crashes before replying in `server_round`."""
    return sim.crash_fraction > 0 and site in crashing_sites(seed, server_round, num_sites,
                                                             sim.crash_fraction)


def hang_seconds(sim: SimulationConfig, server_round: int, site: int) -> float:
    """How long partition `site` hangs before training in `server_round` (0: not at all)."""
    straggles = site in sim.straggler_sites and server_round in sim.straggler_rounds
    return sim.straggler_s if straggles else 0.0
