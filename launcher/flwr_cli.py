"""Calling Flower's own CLI (`flwr`): connections, `flwr run`, status, node registration.

Shared by the simulation launcher and the `fedmm` CLI. Every call runs with a private
`FLWR_HOME` whose `config.toml` names one SuperLink connection (address, and the CA
certificate for TLS, or `insecure = true`). `flwr run` exits 0 even when the ServerApp fails,
so the run's final status is read back with `flwr ls`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher.processes import BIN
from launcher.progress import Display

FLWR = str(BIN / "flwr")


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


def write_connection(home: Path, name: str, address: str, ca_cert: str | Path | None) -> None:
    """Write FLWR_HOME/config.toml with one SuperLink connection, the default."""
    security = (f"root-certificates = {json.dumps(str(Path(ca_cert).resolve()))}\n" if ca_cert
                else "insecure = true\n")
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
                                      f'address = "{address}"\n{security}')


def toml_value(value: object) -> str:
    """A TOML literal for a run-config or federation-config value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, (int, float)) else json.dumps(str(value))


def write_run_config(path: Path, run_config: dict) -> Path:
    """Write a run config as a TOML file for `flwr run --run-config`."""
    path.write_text("".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in run_config.items()))
    return path


def submit(app_dir: Path, connection: str, run_config: Path, *, popen: dict, timeout: float,
           log_path: Path, extra: list[str] | None = None,
           procs: list[subprocess.Popen] | None = None) -> FlowerRun:
    """`flwr run APP CONNECTION --stream`: stream the log to stdout and `log_path`, wait."""
    t0 = time.monotonic()
    result = FlowerRun(log_path=log_path)
    cmd = [FLWR, "run", str(app_dir), connection, "--stream", "--run-config", str(run_config),
           *(extra or [])]
    flwr = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)
    if procs is not None:
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
    read_status(result, "".join(lines), connection, popen, timed_out=bool(result.details))
    return result


def _pump(proc: subprocess.Popen, lines: list[str], log_path: Path) -> None:
    display = Display(sys.stdout)  # a progress bar on a terminal, plain lines otherwise
    with open(log_path, "a", encoding="utf-8") as log:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            log.write(line)
            log.flush()
            display.write(line)
    display.close()


def _flwr(args: list[str], popen: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([FLWR, *args], env=popen["env"], cwd=popen["cwd"], text=True,
                          capture_output=True, timeout=timeout)


def read_status(result: FlowerRun, output: str, connection: str, popen: dict,
                timed_out: bool) -> None:
    """Fill run id and final status from the CLI output and `flwr ls`."""
    match = re.search(r"Successfully started run (\d+)", output)
    if not match:
        tail = output.strip().splitlines()[-1] if output.strip() else "no output from flwr run"
        result.details = result.details or tail
        return
    result.run_id = int(match[1])
    if timed_out:
        _flwr(["stop", str(result.run_id), connection], popen, timeout=30)
    ls = _flwr([ "ls", connection, "--run-id", str(result.run_id), "--format", "json"], popen,
               timeout=30)
    try:
        info = json.loads(ls.stdout)["runs"][0]
        result.status = info["status"]
        result.details = result.details or str(info.get("status-details", ""))
    except (ValueError, KeyError, IndexError):
        result.status = "unknown"
        result.details = result.details or (ls.stdout + ls.stderr)[-300:]


def register_node(public_key: Path, connection: str, popen: dict) -> str:
    """Register a SuperNode's public key with the SuperLink; its node id ('' if already known).

    Raises RuntimeError with Flower's message if the key is refused for another reason.
    """
    proc = _flwr(["supernode", "register", str(public_key), connection, "--name",
                  public_key.stem, "--format", "json"], popen)
    try:
        reply = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        raise RuntimeError(f"{public_key}: {(proc.stdout + proc.stderr).strip()[-300:]}") from None
    if reply.get("success"):
        return str(reply["node-id"])
    message = str(reply.get("error-message", ""))
    if "already in use" in message:  # registered before (the state database keeps it)
        return ""
    raise RuntimeError(f"{public_key}: {message.strip().splitlines()[-1]}")
