"""Run every CPU benchmark and print one table of figures and goals (`make bench`).

    python -m benchmarks [--only bytes aggregation ...] [--out runs/bench.jsonl]

Each benchmark runs as its own process (`python -m benchmarks.<name>`), prints JSON lines, and
the lines are gathered in `--out`; the table printed at the end is the one benchmarks/README.md
holds. The GPU benchmark is `benchmarks/gpu.sh` (it skips where no GPU exists).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SUITE = {  # name -> arguments (sized for a 2-core CPU: the suite stays under 15 minutes)
    "bytes": [],
    "aggregation": [],
    "throughput": [],
    "memory": [],
    "deployed_startup": [],
    "breakdown": ["strategy.rounds=3"],  # round 1 pays the start-up; 2-3 are the steady state
    "dp_coordinates": [],
    "dp_clipping": [],
}


def run(name: str, args: list[str]) -> tuple[list[dict], float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args],
                          capture_output=True, text=True)
    figures = [json.loads(line) for line in proc.stdout.splitlines()
               if line.startswith("{") and '"figure"' in line]
    if proc.returncode != 0:
        figures.append({"figure": f"{name} failed", "error": proc.stderr.strip()[-500:]})
    return figures, time.monotonic() - start


def table(figures: list[dict]) -> str:
    """The figures as Markdown: one row per JSON line."""
    lines = ["| figure | values | goal |", "|---|---|---|"]
    for f in figures:
        goal = f.get("goal") or ""
        values = ", ".join(f"{k}={v}" for k, v in f.items()
                           if k not in ("figure", "goal") and v is not None)
        lines.append(f"| {f['figure']} | {values} | {goal} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=list(SUITE), default=list(SUITE))
    p.add_argument("--out", default="runs/bench.jsonl")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gathered, total = [], 0.0
    with out.open("w") as f:
        for name in args.only:
            figures, seconds = run(name, SUITE[name])
            total += seconds
            print(f"[bench] {name}: {len(figures)} figure(s) in {seconds:.0f}s", flush=True)
            for figure in figures:
                f.write(json.dumps({"benchmark": name, **figure}) + "\n")
            gathered += figures
    print(table(gathered))
    print(f"\n[bench] {len(gathered)} figures in {total / 60:.1f} min; lines in {out}")


if __name__ == "__main__":
    main()
