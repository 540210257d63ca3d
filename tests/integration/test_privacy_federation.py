"""Small real federations through `flwr run` with SecAgg+, central DP and local DP-SGD.

SecAgg+ and plaintext FedAvg run the same 4-site federation in which site 0 fails mid-round
every round: every SecAgg+ round must complete over the 3 survivors, and the first round's
global adapter must equal the plaintext one within the documented quantisation bound.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from safetensors.numpy import load_file

from common.config import load_config
from common.demo_data import generate
from simulations.federation import launch, prepare
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_text_dir):
    """Federations of tiny towers: the privacy protocols, not the model, are under test."""
    root = tmp_path_factory.mktemp("privacy")
    train, test = generate(root / "site-data", 160, 40, seed=1)

    def federation(name: str, *overrides: str) -> Path:
        cfg = load_config(["data=manifest", f"data.train={train}", f"data.test={test}",
                           "partition.num_clients=4", "partition.min_partition_size=10",
                           "strategy.rounds=2", "train.epochs=1",
                           "strategy.min_train_nodes=3", f"output_dir={root / name}",
                           "simulation.timeout_s=600", *tiny_overrides(tiny_text_dir),
                           *overrides])
        launch(prepare(cfg))
        return root / name

    return federation


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def secagg_and_plain(run):
    drop = "simulation.drop_sites=[0]"
    return run("secagg", "privacy=secagg", drop), run("plain", drop)


def test_secagg_rounds_complete_over_the_survivors_when_a_site_drops_out(secagg_and_plain):
    secagg, _ = secagg_and_plain
    rows = _rows(secagg)[1:]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["sampled"] == 4 and r["replied"] == 3 and r["rejected"] == 1 for r in rows)
    log = open(secagg / "flower.log").read()  # (Flower's log stream repeats some lines)
    assert "Secure aggregation completed" in log and "Secure aggregation halted" not in log


def test_secagg_aggregate_equals_plaintext_fedavg_within_the_bound(secagg_and_plain):
    secagg, plain = secagg_and_plain
    a = load_file(str(secagg / "adapters/round-001/adapter_model.safetensors"))
    b = load_file(str(plain / "adapters/round-001/adapter_model.safetensors"))
    gap = max(float(np.abs(a[k] - b[k]).max()) for k in b)
    bound = _rows(secagg)[1]["secagg_error_bound"]
    assert 0 < bound < 1e-3
    assert gap <= bound
    assert max(float(np.abs(b[k]).max()) for k in b) > 100 * bound  # not a vacuous comparison


def test_central_dp_rounds_carry_the_epsilon_an_independent_accountant_gives(run):
    out = run("central", "privacy=central_dp", "privacy.dp=client_fixed")
    z = json.load(open(out / "config.json"))["privacy"]["noise_multiplier"]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    for row in _rows(out)[1:]:
        rdp = compute_rdp(q=1.0, noise_multiplier=z, steps=row["round"], orders=orders)
        reference = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0]
        assert row["epsilon"] == pytest.approx(reference, rel=0.01)
        assert row["delta"] == 1e-5
    summary = json.load(open(out / "summary.json"))
    assert summary["epsilon"] == pytest.approx(8.0, rel=0.01)  # the target, after the last round


def test_local_dp_sites_report_their_own_growing_epsilon(run):
    out = run("local", "privacy=local_dp", "privacy.target_epsilon=0",
              "privacy.noise_multiplier=1.0", "simulation.drop_sites=[]")
    first, second = (r["epsilon"] for r in _rows(out)[1:])
    assert 0 < first < second < np.inf


def test_poisson_sampled_central_dp_with_ffa_reports_the_sampled_epsilon_and_keeps_a(run):
    out = run("poisson", "privacy=central_dp", "strategy.sampling=poisson",
              "strategy.fraction_train=0.5", "strategy.lora_aggregation=ffa")
    z = json.load(open(out / "config.json"))["privacy"]["noise_multiplier"]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rows = _rows(out)[1:]
    for row in rows:  # the same accountant, now with the sampling rate the sites were drawn at
        rdp = compute_rdp(q=0.5, noise_multiplier=z, steps=row["round"], orders=orders)
        assert row["epsilon"] == pytest.approx(get_privacy_spent(orders=orders, rdp=rdp,
                                                                 delta=1e-5)[0], rel=0.01)
    assert all(r["sampled"] <= 4 for r in rows)
    first, last = (load_file(str(out / f"adapters/round-00{r}/adapter_model.safetensors"))
                   for r in (1, 2))
    a_keys = [k for k in first if ".lora_A." in k]
    assert a_keys and all(np.array_equal(first[k], last[k]) for k in a_keys)  # A frozen
    assert any(not np.array_equal(first[k], last[k]) for k in first if k not in a_keys)
