"""Bad input stops the launcher before any work, with one line that names the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.run", *overrides,
                           f"hydra.run.dir={cwd / 'hydra'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("overrides, expected", [
    (["partition.alpha=0"], "partition.alpha"),
    (["model.lora.r=-2"], "model.lora.r"),
    (["strategy=fedmagic"], "strategy/fedmagic"),
    (["strategy.name=fedmagic"], "strategy.name"),
])
def test_bad_config_values_fail_fast_without_traceback(tmp_path, overrides, expected):
    proc = _run(*overrides, f"data.demo_dir={tmp_path / 'demo'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "demo").exists()  # nothing was generated


def test_fewer_samples_than_clients_fails_before_training(tmp_path):
    proc = _run(f"data.demo_dir={tmp_path / 'demo'}", "data.demo_train=6", "data.demo_test=6",
                "partition.num_clients=8", "strategy.min_train_nodes=2", cwd=tmp_path)
    assert proc.returncode != 0 and "partition.num_clients" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "hydra" / "summary.json").exists()


def test_manifest_missing_a_column_names_file_and_column(tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_text("image,text\nx.png,hello\n")
    proc = _run("data=manifest", f"data.train={bad}", f"data.test={bad}", cwd=tmp_path)
    assert proc.returncode != 0
    assert str(bad) in proc.stderr and "label" in proc.stderr
    assert "Traceback" not in proc.stderr
