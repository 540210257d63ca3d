"""Run a Flower app on Flower's simulation engine, the supported way in flwr 1.42.

    flower-superlink --simulation   (own port on loopback, private FLWR_HOME, empty cwd)
      <- flwr run APP sim --stream --federation-config "num-supernodes=N ..." --run-config rc.toml
    -> run status from `flwr ls` (the CLI exits 0 even when the ServerApp fails)

Everything started here is torn down on success, failure, timeout or Ctrl-C (process tagging
and teardown live in launcher/processes.py, shared with the `fedmm` CLI). Runtime dependency installation is disabled: the app
runs in this virtual environment and nothing is fetched.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from launcher.flwr_cli import FlowerRun, submit, toml_value, write_connection, write_run_config
from launcher.processes import (BIN, flower_env, free_port, new_tag, popen_kwargs, sweep_orphans,
                              teardown, wait_healthy)

CONNECTION = "fedmm-sim"


def run_app(app_dir: Path, run_config: dict, federation: dict, *, timeout: float,
            log_path: Path, env_extra: dict[str, str] | None = None) -> FlowerRun:
    """Run the Flower app in `app_dir` as a simulation; stream its log to stdout and a file."""
    sweep_orphans()
    tag = new_tag()
    home = Path(tempfile.mkdtemp(prefix="fedmm-flwr-"))
    cwd = home / "cwd"  # Ray actors put the cwd first on sys.path: keep it empty
    cwd.mkdir()
    port = free_port()
    write_connection(home, CONNECTION, f"127.0.0.1:{port}", ca_cert=None)
    write_run_config(home / "run-config.toml", run_config)
    env = flower_env(home, tag, {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(home),
                                 **(env_extra or {})})
    popen = popen_kwargs(env, cwd)
    result, procs, t0 = FlowerRun(log_path=log_path), [], time.monotonic()
    try:
        with open(home / "superlink.log", "w") as superlink_log:
            procs.append(subprocess.Popen(
                [str(BIN / "flower-superlink"), "--simulation", "--insecure", "--host",
                 "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
                stdout=superlink_log, stderr=subprocess.STDOUT, **popen))
        wait_healthy(procs[0], f"127.0.0.1:{port}")
        result.timings["superlink_ready_s"] = time.monotonic() - t0
        fed = " ".join(f"{k}={toml_value(v)}" for k, v in federation.items())
        run = submit(app_dir, CONNECTION, home / "run-config.toml", popen=popen,
                     timeout=timeout, log_path=log_path, extra=["--federation-config", fed],
                     procs=procs)
        run.timings.update(result.timings)
        run.timings["flwr_run_s"] = time.monotonic() - t0
        return run
    finally:
        teardown(procs, tag)
        shutil.rmtree(home, ignore_errors=True)
