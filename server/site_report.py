"""Per-site results in the run folder: metrics.jsonl columns, summary.json fields, per_site.png.

Every round with federated evaluation (`strategy.fraction_evaluate > 0`) each site reports the
global adapter on its own held-out share (client/app.py); a row then holds `sites` (name ->
accuracy, macro_f1, loss, num_examples) and the mean / worst site / spread of accuracy and
macro-F1 (common/site_metrics.py). After the last round with `personalization` set, each site
also reports its personal adapter on the same rows; the summary compares the two per site.
Under DP these figures are released outside the accountant (ε covers the adapter updates).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from common.config import Config
from common.site_metrics import site_summary

PLOT = "per_site.png"


def site_columns(cfg: Config, sites: dict[str, dict]) -> dict:
    """A metrics.jsonl row's per-site columns ({} when no site evaluated this round)."""
    if not sites:
        return {}
    out = {"sites": sites, **site_summary(sites)}
    if cfg.privacy.dp != "none":
        out["sites_outside_accountant"] = True
    return out


def site_outcome(cfg: Config, rows: list[dict]) -> dict:
    """summary.json's per-site part: the last evaluated round's sites, global vs personal."""
    last = next((r for r in reversed(rows) if r.get("sites")), None)
    if last is None:
        return {}
    sites = last["sites"]
    out = {"sites_round": last["round"],
           **{k: v for k, v in site_columns(cfg, sites).items()}}
    personal = {n: {"accuracy": s["personal_accuracy"], "macro_f1": s["personal_macro_f1"]}
                for n, s in sites.items() if "personal_accuracy" in s}
    if personal:
        out["personalization"] = cfg.personalization.name
        out.update(site_summary(personal, prefix="personal"))
        gains = {n: personal[n]["accuracy"] - sites[n]["accuracy"] for n in personal}
        out["personal_gain"] = gains  # personalized - global accuracy, per site
        out["personal_gain_mean"] = sum(gains.values()) / len(gains)
        out["personal_gain_worst"] = min(gains.values())
    return out


def plot_sites(path: Path, rows: list[dict]) -> Path | None:
    """Per-site accuracy per round (left) and, last round, global vs personal per site."""
    evaluated = [r for r in rows if r.get("sites")]
    if not evaluated:
        return None
    names = sorted({n for r in evaluated for n in r["sites"]})
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    curves, bars = fig.subplots(1, 2)
    for name in names:
        points = [(r["round"], r["sites"][name]["accuracy"]) for r in evaluated
                  if name in r["sites"]]
        curves.plot(*zip(*points), marker="o", label=name)
    curves.set(xlabel="round", ylabel="held-out accuracy", ylim=(0, 1.02),
               title="global adapter on each site's held-out rows")
    if len(names) <= 12:
        curves.legend(fontsize=7)
    last = evaluated[-1]["sites"]
    x = range(len(names))
    glob = [last.get(n, {}).get("accuracy", 0.0) for n in names]
    if any("personal_accuracy" in s for s in last.values()):
        width = 0.4
        bars.bar([i - width / 2 for i in x], glob, width, label="global")
        bars.bar([i + width / 2 for i in x],
                 [last.get(n, {}).get("personal_accuracy", 0.0) for n in names], width,
                 label="personal")
        bars.legend(fontsize=7)
    else:
        bars.bar(x, glob, label="global")
    bars.set_xticks(list(x), names, rotation=45, ha="right")
    bars.set(ylabel="accuracy", ylim=(0, 1.02), title=f"round {evaluated[-1]['round']}")
    fig.savefig(path, dpi=100)
    return path
