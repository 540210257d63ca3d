"""Simulated site faults: the crashing share is drawn per (seed, round), stragglers per round."""

from __future__ import annotations

from dataclasses import replace

from common.config import load_config
from common.faults import crashes, crashing_sites, hang_seconds


def test_crashing_sites_are_the_configured_share_drawn_anew_each_round():
    draws = [crashing_sites(seed=0, server_round=r, num_sites=10, fraction=0.3)
             for r in range(1, 6)]
    assert all(len(d) == 3 and d <= set(range(10)) for d in draws)
    assert len({frozenset(d) for d in draws}) > 1  # not the same sites every round
    assert draws == [crashing_sites(0, r, 10, 0.3) for r in range(1, 6)]  # seeded
    assert crashing_sites(1, 1, 10, 0.3) != draws[0] or crashing_sites(1, 2, 10, 0.3) != draws[1]


def test_each_site_decides_alone_what_the_draw_says():
    sim = replace(load_config([]).simulation, crash_fraction=0.3)
    for server_round in (1, 2, 3):
        crashed = {s for s in range(10) if crashes(sim, 7, server_round, s, 10)}
        assert crashed == crashing_sites(7, server_round, 10, 0.3)
    assert not any(crashes(load_config([]).simulation, 7, 1, s, 10) for s in range(10))


def test_stragglers_hang_only_in_their_rounds():
    sim = replace(load_config([]).simulation, straggler_sites=(2,), straggler_rounds=(1, 3),
                  straggler_s=4.5)
    assert [hang_seconds(sim, r, 2) for r in (1, 2, 3)] == [4.5, 0.0, 4.5]
    assert hang_seconds(sim, 1, 0) == 0.0
