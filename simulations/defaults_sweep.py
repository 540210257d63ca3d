"""The measured choice of the default local-training recipe: recipes × heterogeneous splits × seeds.

    python -m simulations.defaults_sweep --out runs/defaults          # make defaults-sweep
    python -m simulations.defaults_sweep --out runs/defaults --splits alpha0.1 --seeds 0
    python -m simulations.defaults_sweep --out runs/defaults --tables-only

Every recipe (a `train=` option of common/conf/train/, or one knob changed on `train=plain`)
runs on the splits and seeds it is listed for, on the packaged default model and data (the
finalists on every split with 2 seeds, the screened variants once);
every site holds out its share and scores the global model each round
(`strategy.fraction_evaluate=1.0`). A run folder `--out/<split>/<recipe>-seed<k>/` that holds
a summary.json is not run again, so an interrupted sweep goes on where it stopped. Writes
`defaults.csv`, `defaults.md` (final test accuracy, mean over seeds, recipe × split; the
packaged default's gap to the best recipe of each split) and `defaults.png` into `--out`.
Not a test: the whole sweep takes about two hours on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from common.config import ConfigError, from_json, load_config
from launcher.processes import DeployError
from simulations.federation import launch, prepare

SPLITS = {  # the heterogeneity each default must survive (README, "Defaults")
    "iid": ["partition=iid"],
    "alpha0.5": ["partition.alpha=0.5"],
    "alpha0.1": ["partition.alpha=0.1"],
    "no-image": ["skew.missing_image_clients=0.5"],  # half the sites hold no image, α = 0.5
    "natural": ["partition=natural", "data.demo_site_by_shape=0.9",
                "data.demo_dir=data/demo-natural"],  # 4 sites, each mostly one shape
}
ALL = tuple(SPLITS)
# beyond the default model: α = 0.1 on the earlier one, whose image tower trains from scratch
SPLITS["alpha0.1-cnn"] = ["partition.alpha=0.1", "model=minilm_cnn"]
RECIPES = {  # name: (overrides, the splits it runs on, its seeds)
    "default": ([], (*ALL, "alpha0.1-cnn"), (0, 1)),  # common/conf/train/default.yaml
    "plain": (["train=plain"], (*ALL, "alpha0.1-cnn"), (0, 1)),  # the earlier default
    "prox_rs": (["train=prox_rs"], ALL, (0, 1)),
    # screened once: the earlier label-skew recipe, and one knob at a time on train=plain
    "label_skew": (["train=label_skew"], ("alpha0.1", "no-image"), (0,)),
    **{knob: (["train=plain", f"train.{knob}"], ("alpha0.1",), (0,)) for knob in (
        "absent_class_scale=0", "proximal_mu=0.1", "proximal_mu=0.01",
        "max_grad_norm=1.0", "modality_dropout_text=0.5", "lr=0.01", "epochs=1")},
    "modality_dropout_image=0.3": (["train=plain", "train.modality_dropout_image=0.3"],
                                   ("no-image",), (0,)),
}
SHARED = ["strategy.fraction_evaluate=1.0"]
COLUMNS = ("split", "recipe", "seeds", "final_accuracy_mean", "final_accuracy_min",
           "final_accuracy_max", "worst_site_accuracy_mean", "rounds_to_0.9_mean", "is_default")


def run_dir(split: str, recipe: str, seed: int, out: Path) -> Path:
    """Where one run writes: `out/<split>/<recipe>-seed<k>`."""
    return out / split / f"{recipe}-seed{seed}"


def overrides_of(split: str, recipe: str, seed: int, out: Path) -> list[str]:
    """The Hydra overrides of one run; its folder is quoted (a probe's name holds an `=`)."""
    return [*SPLITS[split], *RECIPES[recipe][0], *SHARED, f"seed={seed}",
            f"output_dir='{run_dir(split, recipe, seed, out)}'"]


def run_one(split: str, recipe: str, seed: int, out: Path) -> None:
    """One federation, unless its run folder already holds a summary."""
    if (run_dir(split, recipe, seed, out) / "summary.json").is_file():
        return
    print(f"fedmm: defaults sweep: {split} / {recipe} / seed {seed}", flush=True)
    launch(prepare(load_config(overrides_of(split, recipe, seed, out))))


def rows_of(out: Path) -> list[dict]:
    """Seed means of the finished runs, one row per (split, recipe)."""
    default = load_config([]).train
    groups: dict[tuple[str, str], list[Path]] = {}
    for summary in sorted(out.glob("*/*-seed*/summary.json")):
        split, recipe = summary.parent.parent.name, summary.parent.name.rsplit("-seed", 1)[0]
        groups.setdefault((split, recipe), []).append(summary.parent)
    rows = []
    for (split, recipe), dirs in groups.items():
        finals, worst, reached = [], [], []
        for d in dirs:
            summary = json.loads((d / "summary.json").read_text())
            finals.append(summary["test_accuracy"])
            worst.append(summary.get("site_accuracy_worst", float("nan")))
            rounds = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            hit = [r["round"] for r in rounds if r["round"] > 0 and r["test_accuracy"] >= 0.9]
            reached.append(hit[0] if hit else float("nan"))
        train = from_json((dirs[0] / "config.json").read_text()).train
        rows.append({"split": split, "recipe": recipe, "seeds": len(dirs),
                     "final_accuracy_mean": round(sum(finals) / len(finals), 4),
                     "final_accuracy_min": min(finals), "final_accuracy_max": max(finals),
                     "worst_site_accuracy_mean": round(sum(worst) / len(worst), 4),
                     "rounds_to_0.9_mean": sum(reached) / len(reached),
                     "is_default": train == default})
    order = {name: i for i, name in enumerate([*SPLITS, *RECIPES])}  # ties go to the first
    return sorted(rows, key=lambda r: (order.get(r["split"], 99), order.get(r["recipe"], 99)))


def write_tables(rows: list[dict], out: Path) -> list[Path]:
    """defaults.csv, defaults.md (recipe × split) and defaults.png in `out`."""
    csv_path, md_path, png_path = out / "defaults.csv", out / "defaults.md", out / "defaults.png"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    splits = [s for s in SPLITS if any(r["split"] == s for r in rows)]
    recipes = [r for r in RECIPES if any(row["recipe"] == r for row in rows)]
    cell = {(r["split"], r["recipe"]): r for r in rows}
    default = {r["recipe"] for r in rows if r["is_default"]}
    lines = ["Mean over seeds: final test accuracy / the worst site's held-out accuracy / rounds "
             "to 0.9 test accuracy (— not reached); bold: the packaged default:", "",
             "| recipe (seeds) | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for recipe in recipes:
        cells = []
        for split in splits:
            r = cell.get((split, recipe))
            reached = r and r["rounds_to_0.9_mean"]
            cells.append("" if r is None else f"{r['final_accuracy_mean']:.3f} / "
                         f"{r['worst_site_accuracy_mean']:.3f} / "
                         f"{'—' if reached != reached else f'{reached:g}'}")
        seeds = max(r["seeds"] for r in rows if r["recipe"] == recipe)
        name = f"**{recipe}**" if recipe in default else recipe  # bold: the packaged default
        lines.append(f"| {name} ({seeds}) | " + " | ".join(cells) + " |")
    lines += ["", "| split | best recipe | best | default | default − best |", "|---|---|---|---|---|"]
    for split in splits:
        here = [r for r in rows if r["split"] == split]
        best = max(here, key=lambda r: r["final_accuracy_mean"])
        mine = [r for r in here if r["is_default"]]
        gap = f"{mine[0]['final_accuracy_mean'] - best['final_accuracy_mean']:+.3f}" if mine else "—"
        shown = f"{mine[0]['final_accuracy_mean']:.3f}" if mine else "not run"
        lines.append(f"| {split} | {best['recipe']} | {best['final_accuracy_mean']:.3f} | "
                     f"{shown} | {gap} |")
    md_path.write_text("\n".join(lines) + "\n")
    _plot(rows, splits, recipes, png_path)
    return [csv_path, md_path, png_path]


def _plot(rows: list[dict], splits: list[str], recipes: list[str], path: Path) -> None:
    """Two panels of grouped bars (split × recipe): final test accuracy, worst site's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = {(r["split"], r["recipe"]): r for r in rows}
    default = {r["recipe"] for r in rows if r["is_default"]}
    width = 0.8 / len(recipes)
    fig, axes = plt.subplots(2, 1, sharex=True, figsize=(
        min(14, max(6, 1.6 * len(splits) * max(1, len(recipes) / 3))), 7))
    for ax, key, label in zip(axes, ("final_accuracy_mean", "worst_site_accuracy_mean"),
                              ("final test accuracy", "worst site's held-out accuracy")):
        for i, recipe in enumerate(recipes):
            here = [(j, cell[(s, recipe)][key]) for j, s in enumerate(splits) if (s, recipe) in cell]
            ax.bar([j + i * width for j, _ in here], [v for _, v in here], width,
                   label=recipe + (" (packaged default)" if recipe in default else ""))
        ax.set(ylabel=f"{label}\n(mean over seeds)", ylim=(0, 1.05))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("Local-training recipes across heterogeneous splits")
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(splits))], splits)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/defaults"))
    p.add_argument("--splits", nargs="+", choices=list(SPLITS), default=list(SPLITS))
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="of each recipe's seeds, run these")
    p.add_argument("--tables-only", action="store_true",
                   help="only (re)write the tables from the finished runs in --out")
    args = p.parse_args()
    out = args.out.resolve()
    jobs = [(split, recipe, seed) for seed in args.seeds for split in args.splits
            for recipe in args.recipes
            if split in RECIPES[recipe][1] and seed in RECIPES[recipe][2]]
    try:
        for split, recipe, seed in [] if args.tables_only else jobs:
            run_one(split, recipe, seed, out)
            write_tables(rows_of(out), out)  # after every run: a long sweep shows its progress
    except (ConfigError, DeployError) as err:
        sys.exit(f"fedmm: {err}")
    for path in write_tables(rows_of(out), out):
        print(f"fedmm: wrote {path}")


if __name__ == "__main__":
    main()
