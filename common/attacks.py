"""Simulated Byzantine sites, for robustness experiments only (`simulation.attack`).

A malicious site trains honestly, then replaces its update u = w_local - w_global by
50·u (`scale`) or -u (`signflip`). Which sites attack is fixed by their partition id, so the
same config and seed always have the same attackers.
"""

from __future__ import annotations

import math

import numpy as np


def is_attacker(partition_id: int, num_partitions: int, fraction: float) -> bool:
    """The lowest `fraction` of partition ids attack."""
    return partition_id < math.floor(fraction * num_partitions + 1e-9)


def poison(local: dict[str, np.ndarray], global_: dict[str, np.ndarray], kind: str,
           scale: float) -> dict[str, np.ndarray]:
    """Return the state a malicious site sends instead of `local`."""
    factor = {"scale": scale, "signflip": -1.0}[kind]
    return {k: (global_[k] + factor * (v - global_[k])).astype(v.dtype) for k, v in local.items()}
