"""Per-site results: how the global (and a personal) model fares on each site's own rows.

Each site evaluates on its seeded held-out share (`partition.holdout_fraction`, never trained
on); `site_summary` condenses the sites' figures into mean, worst site and spread (best − worst),
the columns `metrics.jsonl`, `summary.json` and `fedmm evaluate` report.
"""

from __future__ import annotations

import numpy as np
import torch

from common.encoded import Encoded
from common.model import Bundle
from common.train import evaluate

SITE_METRICS = ("accuracy", "macro_f1")  # what each site reports, per model


def site_summary(sites: dict[str, dict[str, float]], prefix: str = "site") -> dict:
    """Mean, worst site (its name too) and spread of each per-site metric."""
    out: dict = {}
    for metric in SITE_METRICS:
        values = {name: r[metric] for name, r in sorted(sites.items()) if metric in r}
        if not values:
            continue
        worst = min(values, key=values.__getitem__)
        out[f"{prefix}_{metric}_mean"] = float(np.mean(list(values.values())))
        out[f"{prefix}_{metric}_worst"] = values[worst]
        out[f"{prefix}_{metric}_worst_site"] = worst
        out[f"{prefix}_{metric}_spread"] = max(values.values()) - values[worst]
    return out


def evaluate_by_site(bundle: Bundle, data: Encoded, site_of_row: list[str],
                     device: torch.device | None = None) -> dict[str, dict]:
    """Evaluate `bundle` on the rows of each site (`site_of_row[i]`: row i's site)."""
    out = {}
    for name in sorted(set(site_of_row)):
        rows = [i for i, s in enumerate(site_of_row) if s == name]
        out[name] = evaluate(bundle, data.subset(rows), device=device)
    return out
