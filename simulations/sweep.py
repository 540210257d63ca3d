"""Comparison of the runs of a Hydra multirun sweep: one table and one plot.

    python -m simulations.run -m strategy=fedavg,fedprox partition.alpha=0.1,1.0

writes, in the sweep folder, `comparison.csv` and `comparison.md` (final and best accuracy,
macro-F1, rounds to the target accuracy, the worst site's held-out accuracy and the mean
personalization gain where sites evaluated, total bytes uploaded, wall time; one row per run)
and `accuracy.png` (test accuracy against round, one line per run; beside it the worst site's
accuracy per round when any run has per-site figures). Runs that differ only in `seed` are
also averaged: `seed_means.csv` and a second table in `comparison.md` (mean, min and max final
accuracy, mean worst site). `write_comparison(sweep_dir)` also works on any folder of finished
runs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

COLUMNS = ("run", "final_accuracy", "best_accuracy", "final_macro_f1", "rounds_to_target",
           "worst_site_accuracy", "personal_gain_mean", "bytes_uploaded",
           "upload_per_site_round", "site_round_s", "wall_time_s")


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    return [o for o in yaml.safe_load(path.read_text()) or []
            if not o.startswith(("output_dir=", "hydra."))]


def _run_names(run_dirs: list[Path]) -> list[str]:
    """Name each run by the overrides that tell it apart (those shared by all runs are left out)."""
    overrides = [_overrides(d) for d in run_dirs]
    shared = set.intersection(*map(set, overrides)) if len(overrides) > 1 else set()
    names = [" ".join(o for o in items if o not in shared) for items in overrides]
    return [name or d.name for name, d in zip(names, run_dirs)]


def collect(sweep_dir: Path, target_accuracy: float) -> list[dict[str, Any]]:
    """One row per finished run below `sweep_dir` (a run folder holding summary.json)."""
    rows = []
    run_dirs = [p.parent for p in sorted(sweep_dir.glob("*/summary.json"))]
    for run_dir, name in zip(run_dirs, _run_names(run_dirs)):
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text())
        rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        reached = [r["round"] for r in rounds if r["round"] > 0
                   and r["test_accuracy"] >= target_accuracy]
        rows.append({"run": name, "dir": run_dir,
                     "final_accuracy": summary["test_accuracy"],
                     "best_accuracy": max(r["test_accuracy"] for r in rounds),
                     "final_macro_f1": summary["test_macro_f1"],
                     "rounds_to_target": reached[0] if reached else None,
                     "worst_site_accuracy": summary.get("site_accuracy_worst"),
                     "personal_gain_mean": summary.get("personal_gain_mean"),
                     "bytes_uploaded": summary["bytes_uploaded"],
                     "upload_per_site_round": round(summary["bytes_uploaded_per_client_round"]),
                     "site_round_s": summary.get("site_train_s_steady"),
                     "wall_time_s": summary["wall_time_s"],
                     "curve": [(r["round"], r["test_accuracy"]) for r in rounds],
                     "worst_site_curve": [(r["round"], r["site_accuracy_worst"]) for r in rounds
                                          if "site_accuracy_worst" in r]})
    return rows


def write_comparison(sweep_dir: Path, target_accuracy: float = 0.9) -> list[Path]:
    """Write comparison.csv, comparison.md and accuracy.png into `sweep_dir`."""
    rows = collect(sweep_dir, target_accuracy)
    if not rows:
        return []
    csv_path, md_path, png_path = (sweep_dir / "comparison.csv", sweep_dir / "comparison.md",
                                   sweep_dir / "accuracy.png")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    header = [c if c != "rounds_to_target" else f"rounds_to_{target_accuracy:g}" for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [row["run"], f"{row['final_accuracy']:.3f}", f"{row['best_accuracy']:.3f}",
                 f"{row['final_macro_f1']:.3f}", str(row["rounds_to_target"] or "not reached"),
                 _maybe(row["worst_site_accuracy"], "{:.3f}"),
                 _maybe(row["personal_gain_mean"], "{:+.3f}"),
                 f"{row['bytes_uploaded'] / 1e6:.1f} MB",
                 f"{row['upload_per_site_round'] / 1e6:.2f} MB",
                 "-" if row["site_round_s"] is None else f"{row['site_round_s']:.1f}",
                 f"{row['wall_time_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    paths = [csv_path, md_path, png_path]
    means = seed_means(rows)
    if any(m["seeds"] > 1 for m in means):
        paths.insert(2, sweep_dir / "seed_means.csv")
        with paths[2].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(means[0]))
            writer.writeheader()
            writer.writerows(means)
        lines += ["", "Mean over seeds:", "",
                  "| run | seeds | final_accuracy mean | min | max | worst_site_accuracy mean |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {m['run'] or '(all)'} | {m['seeds']} | {m['final_accuracy_mean']:.3f} | "
                  f"{m['final_accuracy_min']:.3f} | {m['final_accuracy_max']:.3f} | "
                  f"{_maybe(m['worst_site_accuracy_mean'], '{:.3f}')} |" for m in means]
    md_path.write_text("\n".join(lines) + "\n")
    _plot(rows, png_path)
    return paths


def seed_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run name with its `seed=` override left out: the seeds' mean, min, max."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        name = " ".join(o for o in row["run"].split() if not o.startswith("seed="))
        groups.setdefault(name, []).append(row)
    out = []
    for name, group in groups.items():
        final = [r["final_accuracy"] for r in group]
        worst = [r["worst_site_accuracy"] for r in group]
        out.append({"run": name, "seeds": len(group),
                    "final_accuracy_mean": round(sum(final) / len(final), 4),
                    "final_accuracy_min": min(final), "final_accuracy_max": max(final),
                    "worst_site_accuracy_mean": None if None in worst
                    else round(sum(worst) / len(worst), 4)})
    return out


def _maybe(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("curve", "test accuracy", "Global model test accuracy per round")]
    if any(row["worst_site_curve"] for row in rows):
        panels.append(("worst_site_curve", "worst site's held-out accuracy",
                       "The global model on its worst site, per round"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (key, ylabel, title) in zip(axes[0], panels):
        for row in rows:
            if row[key]:
                rounds, accuracy = zip(*row[key])
                ax.plot(rounds, accuracy, marker="o", label=row["run"])
        ax.set(xlabel="round", ylabel=ylabel, ylim=(0, 1.02), title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SweepReport(Callback):
    """Hydra callback: write the comparison when a multirun ends."""

    def __init__(self, target_accuracy: float = 0.9) -> None:
        self.target_accuracy = target_accuracy

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        paths = write_comparison(Path(config.hydra.sweep.dir), self.target_accuracy)
        for path in paths:
            print(f"fedmm: wrote {path}")
