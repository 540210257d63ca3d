"""Fault scenarios on real federations (`make faults`, marker `faults_slow`); each test adds one
row (scenario, expected, observed, command) to the table `make faults` prints.

Simulated (`python -m simulations.run`, Flower's simulation engine, tiny towers, iid sites):
  every site failing every round       the run fails: exit != 0, one line, status failed
  30% of the sites crashing each round  the rounds complete with the rest; accuracy within
    (the default config)                2 points of the clean run
  a straggler past the round timeout    its round goes on without it; it rejoins the next one
  a full disk mid-checkpoint (hook)     one line; the previous checkpoint is whole; resume works
Deployed (`fedmm server` + three `fedmm site` SuperNodes, TLS + node authentication):
  a SuperNode killed and restarted      it rejoins; the run completes
  the ServerApp killed (SIGKILL) while  resume continues from the last complete checkpoint;
  a checkpoint is written (slowed)      the half-written one is ignored, then removed
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from launcher.processes import cmdline, descendants, send, teardown
from server.checkpoint import last_checkpoint
from tests.conftest import tiny_overrides
from tests.deployment.conftest import FEDMM, ROOT, online_nodes, wait_for

pytestmark = pytest.mark.faults_slow
RUN_TIMEOUT = 1800  # one simulated run, 2 busy cores
TIMEOUT_S, HANG_S = 150, 225  # the straggler hangs past the round timeout, not past two
SLOW_CHECKPOINT_S = 5  # deployed: every round checkpoint pauses mid-write this long


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    out: Path
    command: str

    @property
    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    @property
    def rows(self) -> list[dict]:
        return [json.loads(line) for line in (self.out / "metrics.jsonl").open()]

    @property
    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


def _short(line: str, out: Path, limit: int = 240) -> str:
    """An error line as the table shows it: the run folder as RUN, cut at `limit`."""
    line = line.replace(str(out), "RUN")
    return line if len(line) <= limit else line[:limit] + "..."


def _clients(rows: list[dict]) -> str:
    return ", ".join(f"{r['replied']}/{r['sampled']}" for r in rows)


@pytest.fixture(scope="module")
def simulate(tmp_path_factory, tiny_text_dir):
    """Run `python -m simulations.run` on tiny towers and 600/200 demo rows split iid, or on
    the default config (`default=True`: pretrained towers, the default task)."""
    root = tmp_path_factory.mktemp("scenarios")
    tiny = [*tiny_overrides(tiny_text_dir), "model.vision.channels=[8,16]", "model.lora.r=4",
            f"data.demo_dir={root / 'demo'}", "data.demo_train=600", "data.demo_test=200",
            "partition=iid", "train.lr=0.01", "train.epochs=8"]

    def run(name: str, *overrides: str, env: dict[str, str] | None = None,
            default: bool = False) -> Run:
        out = root / name
        base = [f"data.demo_dir={root / 'demo-default'}"] if default else tiny
        proc = subprocess.run([sys.executable, "-m", "simulations.run", *base, *overrides,
                               f"output_dir={out}"], cwd=ROOT, env={**os.environ, **(env or {})},
                              capture_output=True, text=True, timeout=RUN_TIMEOUT)
        command = " ".join([*(f"{k}={v}" for k, v in (env or {}).items()),
                            "python -m simulations.run", *overrides])
        return Run(proc.returncode, proc.stdout, proc.stderr, out, command)
    return run


def test_every_site_failing_every_round_fails_the_run_in_one_line(simulate, record):
    run = simulate("all-fail", "partition.num_clients=2", "strategy.rounds=1",
                   "simulation.drop_sites=[0,1]")
    record("every site fails every round", "exit != 0; one line; summary status failed",
           f"exit {run.code}: {_short(run.last_line, run.out)}", run.command)
    assert run.code != 0 and "Traceback" not in run.stderr
    assert run.last_line.startswith("fedmm: run failed: 0 of 1 rounds aggregated an update")
    assert "simulated dropout of site" in run.last_line and "untrained" in run.last_line
    assert run.summary["status"] == "failed" and run.summary["completed_rounds"] == 0


def test_rounds_complete_and_accuracy_holds_when_30_percent_of_sites_crash(simulate, record):
    # The default config (10 sites, 5 rounds), where the clean run converges: on the tiny
    # towers both runs are still learning and 2 points is below the test set's noise.
    clean = simulate("clean", default=True)
    crashed = simulate("crash", "simulation.crash_fraction=0.3", default=True)
    assert clean.code == 0, clean.stderr[-2000:]
    assert crashed.code == 0, crashed.stderr[-2000:]
    rows = crashed.rows[1:]
    got, want = crashed.summary["test_accuracy"], clean.summary["test_accuracy"]
    record("30% of 10 sites crash every round (seeded)",
           "every round aggregates the other 7; accuracy within 2 points of the clean run",
           f"clients per round {'/'.join(str(r['replied']) for r in rows)} of 10; accuracy "
           f"{got:.3f} vs clean {want:.3f} (gap {abs(got - want) * 100:.1f} points); "
           f"{crashed.summary['wall_time_s']:.0f}s vs {clean.summary['wall_time_s']:.0f}s",
           crashed.command)
    assert all(r["aggregated"] and r["replied"] == 7 for r in rows)
    assert all(len(r["reasons"]) == 3 and all("simulated crash of site" in x for x in r["reasons"])
               for r in rows)
    assert abs(got - want) <= 0.02


def test_a_straggler_past_the_round_timeout_is_left_behind_then_rejoins(simulate, record):
    run = simulate("straggler", "partition.num_clients=3", "strategy.rounds=3",
                   f"strategy.round_timeout_s={TIMEOUT_S}", "simulation.straggler_sites=[0]",
                   "simulation.straggler_rounds=[2]", f"simulation.straggler_s={HANG_S}")
    assert run.code == 0, run.stderr[-2000:]
    rows = run.rows
    seconds = [round(b["elapsed_s"] - a["elapsed_s"]) for a, b in zip(rows, rows[1:])]
    record(f"a site hangs {HANG_S}s in round 2 of 3 (round timeout {TIMEOUT_S}s)",
           "round 2 goes on without it; it rejoins in round 3; the run completes",
           f"clients per round {_clients(rows[1:])}; "
           f"round seconds {seconds} (round 1 starts the sites)", run.command)
    assert [r["replied"] for r in rows[1:]] == [3, 2, 3]
    assert re.fullmatch(rf"node \d+: no reply within strategy.round_timeout_s={TIMEOUT_S}",
                        " ".join(rows[2]["reasons"]))
    assert run.summary["status"] == "completed"


def test_a_full_disk_mid_checkpoint_stops_in_one_line_and_keeps_the_last_one(simulate, record):
    from common.inference import load_for_inference

    sites = ["partition.num_clients=2", "strategy.rounds=2"]
    full = simulate("disk-full", *sites, env={"FEDMM_TEST_DISK_FULL_ROUND": "2"})
    adapters = full.out / "adapters"
    folders = sorted(p.name for p in adapters.iterdir())
    load_for_inference(adapters / "round-001")  # the previous checkpoint loads, whole
    resumed = simulate("disk-full", *sites, "resume=true")  # space freed: continue the run
    record("the disk fills while round 2's checkpoint is written (test hook)",
           "exit != 0, one line; round 1's checkpoint intact, no temp folder; resume completes",
           f"exit {full.code}: {_short(full.last_line, full.out)}; adapters/ holds {folders}; "
           f"resume: exit {resumed.code}, rounds "
           f"{[r['round'] for r in resumed.rows]}", full.command)
    assert full.code != 0 and "Traceback" not in full.stderr
    assert "round-002: checkpoint not written (No space left on device); round 1's checkpoint"\
        in full.last_line and "is intact" in full.last_line
    assert folders == ["round-001"]
    assert resumed.code == 0, resumed.stderr[-2000:]
    assert [r["round"] for r in resumed.rows] == [0, 1, 2]


# --- deployed: real SuperLink and SuperNodes ---------------------------------------------------

@pytest.fixture(scope="module")
def deployed(request):
    """The deployment tests' federation, its ServerApps pausing mid-checkpoint (test hook)."""
    os.environ["FEDMM_TEST_SLOW_CHECKPOINT_S"] = str(SLOW_CHECKPOINT_S)
    try:  # the SuperLink passes its environment to every ServerApp it starts
        return request.getfixturevalue("federation")
    finally:
        del os.environ["FEDMM_TEST_SLOW_CHECKPOINT_S"]


def _train_args(fed, out: Path, **changes: object) -> list[str]:
    keep = [o for o in fed.overrides if o.split("=", 1)[0] not in changes]
    return ["train", "--superlink", fed.address, "--ca", str(fed.certs / "ca.crt"), *keep,
            *(f"{k}={v}" for k, v in changes.items()), f"output_dir={out}"]


def test_a_supernode_killed_and_restarted_mid_run_rejoins(deployed, record):
    fed = deployed
    out = fed.root / "runs" / "restart"
    train = fed.popen([*FEDMM, *_train_args(fed, out, **{
        "strategy.rounds": 4, "strategy.min_train_nodes": 2, "strategy.round_timeout_s": 120})],
        fed.root / "restart.log", cwd=ROOT)
    wait_for(lambda: (out / "adapters" / "round-001" / "checkpoint.json").is_file(), 600,
             "round 1 checkpoint", [train])
    site = fed.procs[3]  # `fedmm site` for site-c: the SuperNode itself (exec)
    send([site.pid, *descendants(site.pid)], signal.SIGKILL)  # and its ClientApps
    site.wait(timeout=30)
    fed.procs.remove(site)
    wait_for(lambda: online_nodes(fed) == 2, 300, "the SuperLink to see site-c gone", [train])
    fed.popen([*FEDMM, *fed.site_args("site-c", fed.certs / "sites" / "site-c.key")],
              fed.root / "site-c-restarted.log", cwd=ROOT)
    code = train.wait(timeout=900)
    log = (fed.root / "restart.log").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()][1:]
    lost = [x.split(": ", 1)[1][:70] for r in rows for x in r["reasons"]]
    record("a SuperNode killed (SIGKILL) after round 1 of 4, restarted once the SuperLink "
           "saw it gone",
           "its round goes on without it; it rejoins; the run completes",
           f"exit {code}; clients per round {_clients(rows)}; lost: {lost}",
           "fedmm train ... strategy.rounds=4 strategy.min_train_nodes=2 "
           "strategy.round_timeout_s=120; kill -9 the site's flower-supernode; fedmm site ...")
    assert code == 0, log[-3000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert rows[1]["replied"] == 2  # round 2 went on without it
    # Flower sizes a round's sample before waiting for min_available_nodes: a round that
    # starts while the site reconnects samples 2 of the 3; by the last round it is back
    assert rows[-1]["replied"] == rows[-1]["sampled"] == 3


def test_the_serverapp_killed_mid_checkpoint_resumes_from_the_last_complete_one(deployed,
                                                                                 record):
    fed = deployed
    out = fed.root / "runs" / "killed-mid-checkpoint"
    first = fed.popen([*FEDMM, *_train_args(fed, out)], fed.root / "killed.log", cwd=ROOT)
    adapters = out / "adapters"
    writing = lambda: [p for p in adapters.glob(".round-002-*")  # noqa: E731
                       if (p / "adapter_model.safetensors").is_file()]
    wait_for(lambda: bool(writing()), 600, "round 2's checkpoint being written", [first])
    server = fed.procs[0]  # `fedmm server`: SuperLink -> SuperExec -> ServerApp
    serverapps = [p for p in descendants(server.pid) if "flwr-serverapp" in cmdline(p)]
    send(serverapps, signal.SIGKILL)
    teardown([first], tag="none", grace=10)  # the submitting CLI; the federation stays up
    half = writing()
    found = last_checkpoint(out)
    code, log = fed.run_fedmm(["train", "--superlink", fed.address, "--ca",
                               str(fed.certs / "ca.crt"), "--resume", str(out)],
                              fed.root / "killed-resumed.log")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    record("the ServerApp gets SIGKILL while round 2's checkpoint is written (hook: "
           f"{SLOW_CHECKPOINT_S}s pause)",
           "resume finds round 1, the last complete checkpoint; the half-written one is ignored",
           f"half-written: {[p.name for p in half]} (no checkpoint.json); last complete: round "
           f"{found[0] if found else None}; resume: exit {code}, rounds "
           f"{[r['round'] for r in rows]}, left over: "
           f"{sorted(p.name for p in adapters.iterdir() if p.name.startswith('.'))}",
           "FEDMM_TEST_SLOW_CHECKPOINT_S=5 fedmm server ...; fedmm train ...; kill -9 "
           "flwr-serverapp; fedmm train --resume RUN")
    assert serverapps and half and not (half[0] / "checkpoint.json").exists()
    assert found == (1, adapters / "round-001")
    assert code == 0, log[-3000:]
    assert "resume: removed the half-written .round-002-" in log
    assert "resume: continuing after round 1" in log
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert not [p for p in adapters.iterdir() if p.name.startswith(".")]
