"""Run a Flower app on Flower's simulation engine, the supported way in flwr 1.42.

    flower-superlink --simulation   (own port on loopback, private FLWR_HOME, empty cwd)
      <- flwr run APP sim --stream --federation-config "num-supernodes=N ..." --run-config rc.toml
    -> run status from `flwr ls` (the CLI exits 0 even when the ServerApp fails)

Everything started here is torn down on success, failure, timeout or Ctrl-C: Flower and Ray
start children in sessions of their own, so every descendant carries an environment tag and
teardown signals the tagged processes. Runtime dependency installation is disabled: the app
runs in this virtual environment and nothing is fetched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
CONNECTION = "fedmm-sim"
TAG = "FEDMM_SIM_TAG"


@dataclass
class FlowerRun:
    """What one `flwr run` left behind."""

    run_id: int | None = None
    status: str = "not-started"
    details: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    log_path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def _parent_death_signal() -> None:  # runs in the child: SIGTERM it if the launcher dies
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _tagged(match) -> list[int]:
    """PIDs whose environment carries TAG with a value for which `match` is true."""
    prefix, found = f"{TAG}=".encode(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(prefix) and match(e[len(prefix):].decode()) for e in env):
            found.append(int(proc.name))
    return found


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _sweep_orphans() -> None:
    """Kill leftovers (Ray agents) of earlier launchers that were themselves killed."""
    _signal(_tagged(lambda v: not Path(f"/proc/{v.split(':')[0]}").exists()), signal.SIGKILL)


def _teardown(procs: list[subprocess.Popen], tag: str, grace: float = 10.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    while (pids := _tagged(lambda v: v == tag)) and time.monotonic() < deadline:
        _signal(pids, signal.SIGTERM)
        time.sleep(0.5)
    _signal(_tagged(lambda v: v == tag), signal.SIGKILL)  # Ray agents ignore SIGTERM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(superlink: subprocess.Popen, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if superlink.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {superlink.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"flower-superlink not healthy after {timeout:.0f}s") from None
            time.sleep(0.2)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, (int, float)) else json.dumps(str(value))


def run_app(app_dir: Path, run_config: dict, federation: dict, *, timeout: float,
            log_path: Path, env_extra: dict[str, str] | None = None) -> FlowerRun:
    """Run the Flower app in `app_dir` as a simulation; stream its log to stdout and a file."""
    _sweep_orphans()
    tag = f"{os.getpid()}:{uuid.uuid4().hex}"
    home = Path(tempfile.mkdtemp(prefix="fedmm-flwr-"))
    cwd = home / "cwd"  # Ray actors put the cwd first on sys.path: keep it empty
    cwd.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    (home / "run-config.toml").write_text(
        "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in run_config.items()))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update({"FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(home),
                "PYTHONUNBUFFERED": "1", TAG: tag, **(env_extra or {})})
    popen = dict(env=env, cwd=cwd, stdin=subprocess.DEVNULL, start_new_session=True,
                 preexec_fn=_parent_death_signal if sys.platform.startswith("linux") else None)
    result, procs, t0 = FlowerRun(log_path=log_path), [], time.monotonic()
    try:
        with open(home / "superlink.log", "w") as superlink_log:
            procs.append(subprocess.Popen(
                [str(BIN / "flower-superlink"), "--simulation", "--insecure", "--host",
                 "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
                stdout=superlink_log, stderr=subprocess.STDOUT, **popen))
        _wait_healthy(procs[0], port)
        result.timings["superlink_ready_s"] = time.monotonic() - t0
        fed = " ".join(f"{k}={_toml_value(v)}" for k, v in federation.items())
        cmd = [str(BIN / "flwr"), "run", str(app_dir), CONNECTION, "--stream",
               "--federation-config", fed, "--run-config", str(home / "run-config.toml")]
        flwr = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                **popen)
        procs.append(flwr)
        lines: list[str] = []
        pump = threading.Thread(target=_pump, args=(flwr, lines, log_path), daemon=True)
        pump.start()
        try:
            flwr.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(flwr.pid, signal.SIGKILL)  # an open log stream blocks SuperLink exit
            flwr.wait()
            result.details = f"timed out after {timeout:.0f}s"
        pump.join(timeout=5)
        result.timings["flwr_run_s"] = time.monotonic() - t0
        _read_status(result, "".join(lines), env, cwd, timed_out=bool(result.details))
        return result
    finally:
        _teardown(procs, tag)
        shutil.rmtree(home, ignore_errors=True)


def _pump(proc: subprocess.Popen, lines: list[str], log_path: Path) -> None:
    with open(log_path, "a", encoding="utf-8") as log:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            log.write(line)
            log.flush()
            sys.stdout.write(line)
            sys.stdout.flush()


def _read_status(result: FlowerRun, output: str, env: dict, cwd: Path, timed_out: bool) -> None:
    """Fill run id and final status from the CLI output and `flwr ls`."""
    import re

    match = re.search(r"Successfully started run (\d+)", output)
    if not match:
        tail = output.strip().splitlines()[-1] if output.strip() else "no output from flwr run"
        result.details = result.details or tail
        return
    result.run_id = int(match[1])
    flwr = str(BIN / "flwr")
    if timed_out:
        subprocess.run([flwr, "stop", str(result.run_id), CONNECTION], env=env, cwd=cwd,
                       capture_output=True, timeout=30)
    ls = subprocess.run([flwr, "ls", CONNECTION, "--run-id", str(result.run_id), "--format",
                         "json"], env=env, cwd=cwd, capture_output=True, text=True, timeout=30)
    try:
        info = json.loads(ls.stdout)["runs"][0]
        result.status = info["status"]
        result.details = result.details or str(info.get("status-details", ""))
    except (ValueError, KeyError, IndexError):
        result.status = "unknown"
        result.details = result.details or (ls.stdout + ls.stderr)[-300:]
