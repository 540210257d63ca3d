"""A real federation on loopback: `fedmm server` (SuperLink with TLS, node authentication and a
state database) and three `fedmm site` SuperNodes, each on its own manifest, with a tiny model.

Every process started here carries one environment tag; teardown signals every tagged process
(SuperLink, SuperExec, ServerApp, SuperNodes, ClientApps), on success and on failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.certs import write_certs
from common.demo_data import generate, split_sites
from launcher.processes import (BIN, flower_env, free_port, new_tag, popen_kwargs, tagged,
                              teardown)
from tests.conftest import tiny_overrides

SITES = ("site-a", "site-b", "site-c")
FEDMM = [sys.executable, "-m", "launcher.cli"]
ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 180.0  # SuperLink up, keys registered, all sites online (2 busy cores)
RUN_TIMEOUT = 600.0


@dataclass
class Federation:
    root: Path
    certs: Path
    address: str
    tag: str
    sites: dict[str, Path]
    test_manifest: Path
    overrides: list[str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, args: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
        """Start a tagged process (own session, output to `log`)."""
        kwargs = popen_kwargs(flower_env(self.root / "flwr-home", self.tag), cwd or self.root)
        with open(log, "w") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **kwargs)
        self.procs.append(proc)
        return proc

    def run_fedmm(self, args: list[str], log: Path, timeout: float = RUN_TIMEOUT
                  ) -> tuple[int, str]:
        """Run a `fedmm` command to completion; its exit code and output."""
        proc = self.popen([*FEDMM, *args], log, cwd=ROOT)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            teardown([proc], self.tag + "-none", grace=5)
            raise
        return code, log.read_text()

    def train_args(self, out: Path, *extra: str) -> list[str]:
        """`fedmm train` arguments for a run written to `out`."""
        return ["train", "--superlink", self.address, "--ca", str(self.certs / "ca.crt"),
                *self.overrides, f"output_dir={out}", *extra]

    def site_args(self, name: str, key: Path, *extra: str) -> list[str]:
        """`fedmm site` arguments for a site of this federation."""
        return ["site", "--superlink", self.address, "--data", str(self.sites[name]),
                "--ca", str(self.certs / "ca.crt"), "--key", str(key), "--device", "cpu", *extra]


def online_nodes(fed: Federation) -> int:
    """How many SuperNodes the SuperLink reports online (via `flwr supernode ls`)."""
    out = subprocess.run([str(BIN / "flwr"), "supernode", "ls", "fedmm", "--format", "json"],
                         env=flower_env(fed.root / "state" / "flwr-home", fed.tag),
                         cwd=fed.root, capture_output=True, text=True, timeout=60).stdout
    try:
        return sum(n["status"] == "online" for n in json.loads(out[out.index("{"):])["nodes"])
    except (ValueError, KeyError):
        return 0


def wait_for(condition, timeout: float, what: str, procs: list[subprocess.Popen]) -> None:
    """Poll `condition` until true; fail early if a started process died."""
    deadline = time.monotonic() + timeout
    while not condition():
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"while waiting for {what}: exited early: {dead[0]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f}s")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def federation(tmp_path_factory, tiny_text_dir) -> Federation:
    root = tmp_path_factory.mktemp("deploy")
    certs = root / "certs"
    write_certs(certs, ["127.0.0.1"], list(SITES))
    train, test = generate(root / "data", 90, 30, seed=1)
    sites = dict(zip(SITES, split_sites(train, len(SITES))))
    port = free_port()
    overrides = [*tiny_overrides(tiny_text_dir), "model.vision.channels=[8,16]", "model.lora.r=4",
                 "data=manifest", f"data.train={train}", f"data.test={test}",
                 "partition.num_clients=3", "strategy.min_train_nodes=3",
                 "strategy.min_available_nodes=3", "strategy.rounds=2",
                 "train.epochs=1", "simulation.timeout_s=300", "device=cpu"]
    fed = Federation(root, certs, f"127.0.0.1:{port}", new_tag(), sites, test, overrides)
    try:
        server = fed.popen([*FEDMM, "server", "--certs", str(certs), "--host", "127.0.0.1",
                            "--port", str(port), "--state", str(root / "state")],
                           root / "server.log", cwd=ROOT)
        wait_for(lambda: "SuperLink ready" in (root / "server.log").read_text(),
                 START_TIMEOUT, "SuperLink ready", [server])
        for name in SITES:
            fed.popen([*FEDMM, *fed.site_args(name, certs / "sites" / f"{name}.key")],
                      root / f"{name}.log", cwd=ROOT)
        wait_for(lambda: online_nodes(fed) == len(SITES), START_TIMEOUT, "3 sites online",
                 fed.procs)
        yield fed
    finally:
        teardown(fed.procs, fed.tag)
        assert tagged(lambda v: v == fed.tag) == [], "a federation process survived teardown"


@pytest.fixture(scope="session")
def reference_run(federation) -> Path:
    """One uninterrupted 2-round run through `fedmm train`."""
    out = federation.root / "runs" / "reference"
    code, log = federation.run_fedmm(federation.train_args(out), federation.root / "train.log")
    assert code == 0, log[-3000:]
    return out
