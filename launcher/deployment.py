"""The server side and the run side of a deployed federation, over Flower's own commands.

    serve(...)   flower-superlink with TLS (server.crt/key, ca.crt), SuperNode authentication
                 and a state database; once healthy, registers each site's public key through
                 the Control API (`flwr supernode register`), then runs until stopped.
    train(...)   `flwr run APP fedmm --stream` of a prepared config (launcher/prepare.py) against
                 the SuperLink's Control API (TLS with the federation's CA), and reads the run's
                 final status back (`flwr ls`).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import tempfile
from pathlib import Path

from typing import TYPE_CHECKING

from common import keys
from launcher.flwr_cli import FlowerRun, register_node, submit, write_connection, write_run_config
from launcher.processes import (BIN, DeployError, flower_env, new_tag, popen_kwargs, teardown,
                              wait_healthy)

if TYPE_CHECKING:  # the run side needs torch and Hydra; the server side starts without them
    from common.config import Config

APP_DIR = Path(__file__).resolve().parent.parent  # the Flower app: pyproject.toml + packages
CONNECTION = "fedmm"
# [tool.flwr.app] of pyproject.toml, for an installed wheel (which carries no pyproject.toml);
# tests/unit/test_fedmm_cli.py keeps the two equal.
FLOWER_APP = {"publisher": "fedmm",
              "components": {"serverapp": "server.app:app", "clientapp": "client.warm:app"},
              "config": {keys.RUN_CONFIG: ""}}


def superlink_argv(host: str, port: int, database: Path, certs: Path | None) -> list[str]:
    """flower-superlink with TLS + SuperNode authentication (or plain text if `certs` is None)."""
    argv = [str(BIN / "flower-superlink"), "--host", host, "--port", str(port),
            "--database", str(database), "--disable-runtime-dependency-installation"]
    if certs is None:
        return argv + ["--insecure"]
    return argv + ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile",
                   str(certs / "server.crt"), "--ssl-keyfile", str(certs / "server.key"),
                   "--enable-supernode-auth"]


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DeployError(f"{path}: {what} not found (create it with `fedmm certs`)")
    return path


def flower_app(staging: Path, app_dir: Path = APP_DIR) -> Path:
    """The folder `flwr run` packages: the source tree, or the installed packages staged."""
    pyproject = app_dir / "pyproject.toml"
    if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text():
        return app_dir
    import tomli_w  # a dependency of flwr

    dist = importlib.metadata.distribution("fedmm")
    project = {"name": dist.metadata["Name"], "version": dist.version,
               "description": dist.metadata["Summary"],
               "license": dist.metadata["License-Expression"] or "Apache-2.0",
               "dependencies": dist.requires or []}
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "pyproject.toml").write_text(tomli_w.dumps(
        {"project": project, "tool": {"flwr": {"app": FLOWER_APP}}}))
    for package in dist.read_text("top_level.txt").split():
        shutil.copytree(app_dir / package, staging / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return staging


def serve(*, host: str, port: int, state_dir: Path, certs: Path | None,
          site_keys: list[Path], home: Path | None = None) -> int:
    """Run the SuperLink in the foreground; register `site_keys` once it is up."""
    if certs is not None:
        for name in ("ca.crt", "server.crt", "server.key"):
            _need(certs / name, "TLS file")
        for key in site_keys:
            _need(key, "site public key")
    state_dir.mkdir(parents=True, exist_ok=True)
    home = home or state_dir / "flwr-home"
    local = f"127.0.0.1:{port}"  # the server certificate always names 127.0.0.1
    write_connection(home, CONNECTION, local, certs / "ca.crt" if certs else None)
    tag = new_tag()
    popen = popen_kwargs(flower_env(home, tag), state_dir)
    superlink = subprocess.Popen(superlink_argv(host, port, state_dir / "state.db", certs),
                                 **popen)
    try:
        wait_healthy(superlink, local, certs / "ca.crt" if certs else None)
        for key in site_keys if certs is not None else []:
            node_id = register_node(key, CONNECTION, popen)
            print(f"[fedmm] site key {key.name}: "
                  f"{'registered as node ' + node_id if node_id else 'already registered'}",
                  flush=True)
        print(f"[fedmm] SuperLink ready on {host}:{port} "
              f"({'TLS + node authentication' if certs else 'INSECURE: plain text'}), "
              f"state in {state_dir / 'state.db'}", flush=True)
        return superlink.wait()
    except (RuntimeError, TimeoutError) as err:
        raise DeployError(str(err)) from None
    finally:
        teardown([superlink], tag)


def train(cfg: Config, *, superlink: str, ca_cert: Path | None, timeout: float) -> FlowerRun:
    """Submit the run to the federation and stream its log until it ends."""
    from common.config import to_json

    if ca_cert is not None:
        _need(ca_cert, "CA certificate")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="fedmm-train-"))
    (home / "cwd").mkdir()
    write_connection(home, CONNECTION, superlink, ca_cert)
    run_config = write_run_config(home / "run-config.toml", {keys.RUN_CONFIG: to_json(cfg)})
    tag = new_tag()
    procs: list[subprocess.Popen] = []
    try:
        return submit(flower_app(home / "app"), CONNECTION, run_config,
                      popen=popen_kwargs(flower_env(home, tag), home / "cwd"),
                      timeout=timeout, log_path=out / "flower.log", procs=procs)
    finally:
        teardown(procs, tag)
