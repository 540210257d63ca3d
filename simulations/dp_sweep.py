"""The privacy/utility trade-off: one federation per target ε, a table and a plot of accuracy vs ε.

    python -m simulations.dp_sweep --dp central --out runs/dp-central -- partition.num_clients=200 ...
    python -m simulations.dp_sweep --dp local --epsilons 1 8 inf --out runs/dp-local -- ...
    make dp-sweep          # both, at the sizes the README reports

Each ε runs the same config (the Hydra overrides after `--`) with `privacy=central_dp` or
`privacy=local_dp` and `privacy.target_epsilon=ε`; `inf` runs it without DP (same sites, sampling
and rounds). Writes into `--out`: one run folder per ε, `dp_sweep.csv` / `dp_sweep.md` (target
and reported ε at δ, the solved noise multiplier z, the clipping norm C, the expected
noise-to-signal ratio of one release, final and best test accuracy) and `accuracy_vs_epsilon.png`,
plus the per-round comparison of simulations/sweep.py (`comparison.md`, `accuracy.png`).
Not a test: a sweep takes minutes to hours.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from common.config import ConfigError, from_json, load_config
from common.privacy import local_noise_multiplier, noise_to_signal
from launcher.prepare import noised_coordinates, site_train_rows
from launcher.processes import DeployError
from simulations.federation import launch, prepare
from simulations.sweep import write_comparison

PRESETS = {"central": "privacy=central_dp", "local": "privacy=local_dp"}
COLUMNS = ("target_epsilon", "epsilon", "delta", "noise_multiplier", "clipping_norm",
           "noise_to_signal", "final_accuracy", "best_accuracy", "sites", "sites_per_round",
           "rounds", "wall_time_s")


def run_one(dp: str, eps: float, overrides: list[str], out: Path) -> Path:
    """One federation at target ε (inf: no DP); its run folder."""
    private = not math.isinf(eps)
    privacy = [PRESETS[dp], f"privacy.target_epsilon={eps:g}"] if private else ["privacy=none"]
    cfg = prepare(load_config(overrides + privacy + [f"output_dir={out / f'eps-{eps:g}'}"]))
    launch(cfg)
    return Path(cfg.output_dir)


def row_of(run_dir: Path, eps: float) -> dict:
    """A finished run's row of the table (from its config.json, summary.json, metrics.jsonl)."""
    cfg = from_json((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    private, dp = cfg.privacy.dp != "none", "local" if cfg.privacy.dp == "local" else "central"
    with open(cfg.data.train, newline="") as f:
        site_rows = site_train_rows(cfg, sum(1 for _ in csv.DictReader(f)))
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sampled = [r["sampled"] for r in rounds if r["round"] > 0]
    p, t = cfg.privacy, cfg.train
    z = p.noise_multiplier  # central: solved before the run; local: a site of average size
    if private and dp == "local":
        z = local_noise_multiplier(eps, site_rows, t.batch_size, t.epochs, cfg.strategy.rounds,
                                   p.delta)
    ratio = noise_to_signal(cfg, noised_coordinates(cfg), site_rows) if private else 0.0
    return {"target_epsilon": eps, "epsilon": summary.get("epsilon") if private else math.inf,
            "delta": p.delta if private else None, "noise_multiplier": z if private else 0.0,
            "clipping_norm": p.clipping_norm if private else None,
            "noise_to_signal": round(ratio, 3),
            "final_accuracy": summary["test_accuracy"],
            "best_accuracy": max(r["test_accuracy"] for r in rounds),
            "sites": cfg.partition.num_clients,
            "sites_per_round": round(sum(sampled) / max(len(sampled), 1), 1),
            "rounds": cfg.strategy.rounds, "wall_time_s": summary["wall_time_s"]}


def write_table(rows: list[dict], dp: str, out: Path) -> list[Path]:
    """dp_sweep.csv, dp_sweep.md and accuracy_vs_epsilon.png in `out` (rows by ε)."""
    rows = sorted(rows, key=lambda r: r["target_epsilon"])
    csv_path, md_path, png_path = (out / "dp_sweep.csv", out / "dp_sweep.md",
                                   out / "accuracy_vs_epsilon.png")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    def cell(value: object) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return "∞" if math.isinf(value) else f"{value:.3g}" if value < 100 else f"{value:.0f}"
        return str(value)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = [r for r in rows if not math.isinf(r["target_epsilon"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["target_epsilon"] for r in private], [r["final_accuracy"] for r in private],
            marker="o", label=f"{dp} DP")
    for r in rows:
        if math.isinf(r["target_epsilon"]):
            ax.axhline(r["final_accuracy"], linestyle="--", color="grey", label="no DP (ε = ∞)")
    ax.set(xscale="log" if private else "linear", xlabel="ε (δ = 1e-5)",
           ylabel="final test accuracy", ylim=(0, 1.02),
           title=f"{dp} DP: {rows[0]['sites']} sites, {rows[0]['rounds']} rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return [csv_path, md_path, png_path]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dp", choices=sorted(PRESETS), required=True)
    p.add_argument("--epsilons", type=float, nargs="+", default=[1, 2, 4, 8, 16, math.inf])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tables-only", action="store_true",
                   help="only (re)write the tables from the finished runs in --out")
    p.add_argument("overrides", nargs="*", help="Hydra overrides shared by every run")
    args = p.parse_args()
    args.out = args.out.resolve()
    try:
        for eps in [] if args.tables_only else args.epsilons:
            run_one(args.dp, eps, list(args.overrides), args.out)
            write_tables(args.dp, args.out)  # after every run: a long sweep shows its progress
    except (ConfigError, DeployError) as err:
        sys.exit(f"fedmm: {err}")
    for path in write_tables(args.dp, args.out):
        print(f"fedmm: wrote {path}")


def write_tables(dp: str, out: Path) -> list[Path]:
    """The ε table and plot, and simulations/sweep.py's comparison, of the finished runs."""
    done = [(d, float(d.name.removeprefix("eps-"))) for d in sorted(out.glob("eps-*"))
            if (d / "summary.json").is_file()]
    rows = [row_of(d, eps) for d, eps in done]
    for row in rows:
        print(f"fedmm: ε={row['target_epsilon']:g}: accuracy {row['final_accuracy']:.3f}")
    return (write_table(rows, dp, out) + write_comparison(out)) if rows else []


if __name__ == "__main__":
    main()
