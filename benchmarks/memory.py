"""Peak memory of a simulation with 10 vs 200 virtual sites (goal: ratio <= 1.2x).

    python -m benchmarks.memory [--sites 10 200] [--trained 4] [hydra overrides ...]

Each federation is a real `flwr run` on Flower's simulation engine (simulations.federation.launch):
the default model on the default demo data split IID over `--sites` sites, one round in which
`--trained` sites train one epoch (the same work for either size: what grows is only the number
of virtual sites Flower and fedmm keep track of). A sampler sums, once a second, the memory of
every process below this one (SuperLink, SuperExec, ServerApp, Ray and its workers): RSS, which
counts pages shared by several processes once per process, and PSS, which splits them. One JSON
line per federation and one with the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.measure import emit
from common.config import load_config
from simulations.federation import launch, prepare


class PeakMemory:
    """Sample the summed RSS and PSS of this process's descendants until stopped."""

    def __init__(self, every_s: float = 1.0):
        self.every_s, self.rss, self.pss, self.processes = every_s, 0, 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            rss = pss = count = 0
            for proc in psutil.Process().children(recursive=True):
                try:
                    info = proc.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss, pss, count = rss + info.rss, pss + getattr(info, "pss", info.rss), count + 1
            if pss > self.pss:
                self.rss, self.pss, self.processes = rss, pss, count


def run(sites: int, trained: int, root: Path, overrides: list[str] = ()) -> dict:
    cfg = prepare(load_config([*overrides,
        "partition=iid", f"partition.num_clients={sites}", "strategy.rounds=1",
        f"strategy.fraction_train={trained / sites}", "train.epochs=1",
        f"output_dir={root / f'sites-{sites}'}"]))
    start = time.monotonic()
    with PeakMemory() as peak:
        summary = launch(cfg)
    return {"sites": sites, "trained_sites": trained, "peak_rss_mb": round(peak.rss / 2**20),
            "peak_pss_mb": round(peak.pss / 2**20), "processes_at_peak": peak.processes,
            "wall_s": round(time.monotonic() - start, 1), "test_accuracy": summary["test_accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites", type=int, nargs=2, default=[10, 200])
    p.add_argument("--trained", type=int, default=4)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for both federations")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedmm-bench-memory-")) / "runs"
    small, large = (run(n, args.trained, root, args.overrides) for n in args.sites)
    for result in (small, large):
        emit(figure="simulation memory", **result)
    emit(figure="simulation memory ratio", sites=args.sites,
         rss_ratio=round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
         pss_ratio=round(large["peak_pss_mb"] / small["peak_pss_mb"], 3), goal="<= 1.2x")


if __name__ == "__main__":
    main()
