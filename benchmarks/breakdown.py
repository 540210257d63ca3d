"""Where the default run's time goes: start-up, local training, aggregation, evaluation.

    python -m benchmarks.breakdown [hydra overrides]
    python -m benchmarks.breakdown --run RUN_DIR --wall SECONDS   # a run made before

Runs the default federation (`python -m simulations.run`: 10 sites, 5 rounds) and splits its
wall time with the columns metrics.jsonl records each round:
    start-up         everything outside rounds 1..R: SuperLink, Ray, the ServerApp's imports
                     and backbone, the initial evaluation, the final save and teardown
    local training   the rest of each round: messages out, the sites' work, replies back (and
                     the round's checkpoint); the sites' own reports split their site-seconds
                     into start-up (handler call to first step) and training
    aggregation      screening + aggregation at the server (aggregate_s)
    evaluation       the server's test-set evaluation (evaluate_s)
One JSON line for the run, one per round, and the run's site-updates per minute.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchmarks.measure import emit
from common.config import load_config
from simulations.federation import launch, prepare


def main() -> None:
    overrides = sys.argv[1:]
    if overrides[:1] == ["--run"]:  # an existing run folder, and the wall seconds it took
        run_dir, wall = Path(overrides[1]), float(overrides[3])
        return report(run_dir, wall, json.loads((run_dir / "summary.json").read_text()))
    if not any(o.startswith("output_dir=") for o in overrides):
        overrides.append(f"output_dir=runs/bench-breakdown-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = prepare(load_config(overrides))
    start = time.monotonic()
    summary = launch(cfg)
    report(Path(cfg.output_dir), time.monotonic() - start, summary)


def report(run_dir: Path, wall: float, summary: dict) -> None:
    """Print the breakdown of the run in `run_dir`, which took `wall` seconds to launch."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    first, last = rows[0], rows[-1]
    rounds_s = last["elapsed_s"] - first["elapsed_s"]
    evaluation = sum(r["evaluate_s"] for r in rows[1:])
    aggregation = sum(r["aggregate_s"] or 0.0 for r in rows[1:])
    updates = sum(r["replied"] for r in rows[1:])
    site_startup = sum((r["site_startup_s"] or 0.0) * r["replied"] for r in rows[1:])
    site_train = sum((r["site_train_s"] or 0.0) * r["replied"] for r in rows[1:])
    for prev, row in zip(rows, rows[1:]):
        emit(figure="default run round", round=row["round"],
             round_s=round(row["elapsed_s"] - prev["elapsed_s"], 2),
             site_startup_s=row["site_startup_s"], site_train_s=row["site_train_s"],
             aggregate_s=row["aggregate_s"], evaluate_s=row["evaluate_s"],
             test_accuracy=row["test_accuracy"])
    emit(figure="default run breakdown", wall_s=round(wall, 1),
         startup_s=round(wall - rounds_s, 1), initial_evaluation_s=first["evaluate_s"],
         local_training_s=round(rounds_s - evaluation - aggregation, 1),
         aggregation_s=round(aggregation, 2), evaluation_s=round(evaluation, 1),
         site_seconds_startup=round(site_startup, 1), site_seconds_training=round(site_train, 1),
         site_updates_per_minute=round(60 * updates / rounds_s, 2),
         test_accuracy=summary["test_accuracy"], rounds=summary["rounds"],
         sites=summary["num_clients"])


if __name__ == "__main__":
    main()
