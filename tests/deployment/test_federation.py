"""Real `flower-superlink` + three `flower-supernode` processes over TLS with node authentication.

Two rounds of the real app through `fedmm train`; the final adapter loads with PEFT and
reproduces the server's accuracy; `fedmm predict` writes label names; a SecAgg+ run over the same
processes equals the plaintext one within its quantisation bound. A SuperNode whose key
was never registered is refused, and one that lacks the federation's CA cannot connect.
"""

from __future__ import annotations

import csv
import json

import numpy as np
from safetensors.numpy import load_file

from common import keys
from common.inference import load_for_inference
from common.model import read_label_names
from common.data import encode, load_manifest
from common.task import input_encoding
from common.train import evaluate
from launcher.processes import BIN, free_port
from tests.deployment.conftest import SITES

REFUSED_WITHIN = ["--max-retries", "1", "--max-wait-time", "30"]


def test_two_rounds_over_tls_and_node_auth_give_an_adapter_that_loads(federation,
                                                                      reference_run):
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["num_clients"] == len(SITES)
    rows = [json.loads(line) for line in (reference_run / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["replied"] == len(SITES) and r["rejected"] == 0 for r in rows[1:])
    bundle = load_for_inference(reference_run / "adapter")  # PeftModel.from_pretrained
    result = evaluate(bundle, encode(load_manifest(federation.test_manifest)[0],
                                     bundle.label_names, input_encoding(bundle.cfg)))
    assert result["accuracy"] == summary["test_accuracy"]


def test_predict_writes_label_names(federation, reference_run):
    out = federation.root / "preds.csv"
    code, log = federation.run_fedmm(
        ["predict", "--adapter", str(reference_run / "adapter"), "--data",
         str(federation.test_manifest), "--out", str(out), "--device", "cpu"],
        federation.root / "predict.log", timeout=300)
    assert code == 0, log[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 30
    names = set(read_label_names(reference_run / "adapter"))
    assert {r["prediction"] for r in rows} <= names and all(r["label"] in names for r in rows)


def test_a_site_with_an_unregistered_key_is_refused(federation, tmp_path):
    rogue = write_rogue_key(tmp_path)
    code, log = federation.run_fedmm(
        federation.site_args("site-a", rogue, "--name", "rogue", *REFUSED_WITHIN),
        tmp_path / "rogue.log", timeout=180)
    assert code != 0
    assert "Failed to activate SuperNode" in log


def test_a_site_without_the_ca_certificate_cannot_connect(federation, tmp_path):
    argv = [str(BIN / "flower-supernode"), "--superlink", federation.address,
            "--auth-supernode-private-key", str(federation.certs / "sites" / "site-a.key"),
            "--port", str(free_port()), *REFUSED_WITHIN]  # no --root-certificates: the system CAs only
    proc = federation.popen(argv, tmp_path / "no-ca.log")
    assert proc.wait(timeout=180) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "no-ca.log").read_text()


def write_rogue_key(folder):
    """A well-formed site key pair that the server never registered."""
    from common.certs import make_site_keys

    private, _ = make_site_keys()
    path = folder / "rogue.key"
    path.write_bytes(private)
    path.chmod(0o600)
    return path


def test_secagg_across_real_processes_equals_plaintext_within_its_bound(federation,
                                                                        reference_run):
    out = federation.root / "runs" / "secagg"
    code, log = federation.run_fedmm(  # one round: repeated rounds are tested in simulation
        federation.train_args(out, "privacy=secagg", "strategy.rounds=1"),
        federation.root / "secagg.log")
    assert code == 0, log[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == [0, 1]
    assert all(r["replied"] == len(SITES) for r in rows[1:])
    # round 1 starts from the same global adapter with the same site seeds as the plaintext run
    masked = load_file(str(out / "adapters" / "round-001" / "adapter_model.safetensors"))
    plain = load_file(str(reference_run / "adapters" / "round-001" / "adapter_model.safetensors"))
    worst = max(float(np.abs(masked[k] - plain[k]).max()) for k in plain)
    assert worst <= rows[1][keys.SECAGG_ERROR_BOUND]
