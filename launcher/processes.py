"""Starting and tearing down Flower's processes (SuperLink, SuperNodes, SuperExec, Ray).

Shared by the simulation launcher (launcher/simulation.py), the `fedmm` CLI and the deployment
tests. Flower and Ray start children in sessions of their own, so every process started here
carries an environment tag (`FEDMM_SIM_TAG`) that its descendants inherit, and teardown signals
every process with that tag: nothing survives a test or a launcher, however it ends.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
TAG = "FEDMM_SIM_TAG"
QUIET_FLOWER = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"}


class DeployError(RuntimeError):
    """Something a user can fix (missing certificate, refused key, failed run)."""


def new_tag() -> str:
    """A tag naming this process as the owner of everything started under it."""
    return f"{os.getpid()}:{uuid.uuid4().hex}"


def flower_env(home: Path, tag: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: private FLWR_HOME, this venv first on PATH, tag."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update({"FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                **QUIET_FLOWER, TAG: tag, **(extra or {})})
    return env


def parent_death_signal() -> None:
    """In the child: get SIGTERM when the parent dies (Linux)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def popen_kwargs(env: dict[str, str], cwd: Path) -> dict:
    """Popen arguments: own session (for group signals), no stdin, dies with the parent."""
    return dict(env=env, cwd=cwd, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=parent_death_signal if sys.platform.startswith("linux") else None)


def tagged(match: Callable[[str], bool]) -> list[int]:
    """PIDs whose environment carries TAG with a value for which `match` is true."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            value = proc.environ().get(TAG)
        except (psutil.Error, OSError):
            continue
        if value is not None and match(value):
            found.append(proc.pid)
    return found


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children in sessions of their own included)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def cmdline(pid: int) -> str:
    """The command line of a process ('' if it is gone)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def send(pids: list[int], sig: int) -> None:
    """Signal each pid, ignoring those already gone."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def sweep_orphans() -> None:
    """Kill leftovers (Ray agents) of earlier launchers that were themselves killed."""
    send(tagged(lambda v: not psutil.pid_exists(int(v.split(":")[0]))), signal.SIGKILL)


def teardown(procs: list[subprocess.Popen], tag: str, grace: float = 10.0) -> None:
    """SIGTERM the started process groups, then every tagged process; SIGKILL what is left.

    Processes that re-tag their children (`fedmm server` tears down its own) are also
    covered: whatever was below a started process at teardown time is killed at the end.
    """
    family = [d for proc in procs if proc.poll() is None for d in descendants(proc.pid)]
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
    while (pids := tagged(lambda v: v == tag)) and time.monotonic() < deadline:
        send(pids, signal.SIGTERM)
        time.sleep(0.5)
    send(tagged(lambda v: v == tag), signal.SIGKILL)  # Ray agents ignore SIGTERM
    send([pid for pid in family if psutil.pid_exists(pid)], signal.SIGKILL)
    for proc in procs:
        if proc.poll() is None:
            proc.wait(timeout=5)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, address: str, ca_cert: str | Path | None = None,
                 timeout: float = 60.0) -> None:
    """Poll a SuperLink's /health (https when `ca_cert` is given) until it answers."""
    scheme = "https" if ca_cert else "http"
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{scheme}://{address}/health", timeout=1,
                                        context=context):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"flower-superlink not healthy after {timeout:.0f}s") from None
            time.sleep(0.2)
