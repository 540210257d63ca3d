"""Deployed start-up: seconds from `flwr-clientapp` start to a site's first training step.

    python -m benchmarks.deployed_startup [--rows 2000 200] [--rounds 2] [--cold-rounds 1]
                                          [--epochs 3] [--modes cold warm]

Real processes on loopback (plain text, no node authentication, which do not change start-up):
`fedmm server`, one `fedmm site` (a `flower-supernode`) on a manifest of `--rows` rows, and
`fedmm train` of the default model, twice per size: the site started `--cold` (Flower's one
`flwr-clientapp` process per message imports torch, builds the backbone, encodes the data and
computes the stems every time: before; every round costs the same, so `--cold-rounds` 1) and
warm (the default: the ClientApp relays to the site's trainer process, client/trainer.py:
after; `--rounds` 2, since its first round computes the site's stems). Every site reports, in
its train metrics, the seconds from its `flwr-clientapp` process start to its first training
step and the training seconds; metrics.jsonl records them per round. One JSON line per (rows,
mode, round), and one per size with the round-1 adapters of both compared byte for byte (results
unchanged). Goal: start-up <= 15% of the site-round's training time for a 2,000-row site.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measure import emit
from common.demo_data import generate, split_sites
from launcher.processes import flower_env, free_port, new_tag, popen_kwargs, teardown

ROOT = Path(__file__).resolve().parents[1]
FEDMM = [sys.executable, "-m", "launcher.cli"]


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.is_file() else ""):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[3:5]} exited: {path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in {path} after {timeout:.0f}s")
        time.sleep(0.5)


def federation(root: Path, manifest: Path, test: Path, cold: bool, rounds: int, epochs: int,
               env: dict, port: int) -> Path:
    """One `fedmm site` (cold or warm) and one `fedmm train`; the run folder."""
    mode = "cold" if cold else "warm"
    out = root / f"run-{manifest.stem}-{mode}"
    site_log = root / f"site-{manifest.stem}-{mode}.log"
    with open(site_log, "w") as log:
        site = subprocess.Popen([*FEDMM, "site", "--insecure", "--superlink", f"127.0.0.1:{port}",
                                 "--data", str(manifest), "--name", "bench-site", "--device",
                                 "cpu", *(["--cold"] if cold else [])],
                                stdout=log, stderr=subprocess.STDOUT, **popen_kwargs(env, ROOT))
    try:
        if not cold:  # the trainer's imports happen at site start, not in any message
            wait_for_text(site_log, "site trainer ready", site)
        train = subprocess.run(
            [*FEDMM, "train", "--insecure", "--superlink", f"127.0.0.1:{port}", "data=manifest",
             f"data.train={manifest}", f"data.test={test}", "partition.num_clients=1",
             "strategy.min_train_nodes=1", "strategy.min_available_nodes=1",
             f"strategy.rounds={rounds}", f"train.epochs={epochs}", "device=cpu",
             f"output_dir={out}"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
        if train.returncode != 0:
            raise RuntimeError(f"fedmm train failed: {(train.stdout + train.stderr)[-3000:]}")
    finally:
        teardown([site], env["FEDMM_SIM_TAG"] + "-site")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[2000, 200])
    p.add_argument("--rounds", type=int, default=2, help="rounds of the warm site")
    p.add_argument("--cold-rounds", type=int, default=1, help="rounds of the cold site")
    p.add_argument("--epochs", type=int, default=3, help="local epochs (the default task's: 3)")
    p.add_argument("--modes", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedmm-bench-deploy-"))
    train_csv, test_csv = generate(root / "data", max(args.rows), 100, seed=0)
    manifests = {max(args.rows): Path(train_csv)}
    for rows in args.rows:
        if rows not in manifests:  # the first `rows` rows: one of max/rows equal sites
            manifests[rows] = Path(split_sites(train_csv, max(args.rows) // rows)[0])
    tag, port = new_tag(), free_port()
    env = flower_env(root / "flwr-home", tag)
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen([*FEDMM, "server", "--insecure", "--host", "127.0.0.1",
                                   "--port", str(port), "--state", str(root / "state")],
                                  stdout=log, stderr=subprocess.STDOUT, **popen_kwargs(env, ROOT))
    try:
        wait_for_text(root / "server.log", "SuperLink ready", server)
        for rows in args.rows:
            adapters = {}
            for cold in [mode == "cold" for mode in args.modes]:
                out = federation(root, manifests[rows], Path(test_csv), cold,
                                 args.cold_rounds if cold else args.rounds, args.epochs, env, port)
                adapters[cold] = (out / "adapters" / "round-001" / "adapter_model.safetensors"
                                  ).read_bytes()
                metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
                for row in metrics[1:]:
                    startup, training = row["site_startup_s"], row["site_train_s"]
                    emit(figure="deployed start-up", rows=rows, mode="cold" if cold else "warm",
                         round=row["round"], epochs=args.epochs, startup_s=startup,
                         train_s=training,
                         startup_of_train_pct=round(100 * startup / training, 1),
                         test_accuracy=row["test_accuracy"],
                         goal="<= 15% (2,000 rows)" if rows == 2000 else None)
            if len(adapters) == 2:
                emit(figure="deployed results unchanged", rows=rows,
                     round_1_adapters_equal=adapters[True] == adapters[False])
    finally:
        teardown([server], tag)


if __name__ == "__main__":
    main()
