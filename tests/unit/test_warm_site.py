"""A warm site: `fedmm site` names its trainer's socket in the node config; the ClientApp
Flower loads stays torch-free; the code digest tells the trainer whose code a run brings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from client.warm import CODE_DIRS, code_digest
from launcher.cli import parser, site_argv

ROOT = Path(__file__).resolve().parents[2]


def test_site_node_config_names_the_trainer_socket_unless_cold(tmp_path):
    (tmp_path / "train.csv").write_text("x")
    args = parser().parse_args(["site", "--superlink", "h:1", "--data",
                                str(tmp_path / "train.csv"), "--insecure"])
    assert not args.cold
    args.trainer_socket = "/tmp/fedmm-site-x/trainer.sock"
    node = site_argv(args)[site_argv(args).index("--node-config") + 1]
    assert 'trainer-socket="/tmp/fedmm-site-x/trainer.sock"' in node
    cold = parser().parse_args(["site", "--superlink", "h:1", "--data",
                                str(tmp_path / "train.csv"), "--insecure", "--cold"])
    assert cold.cold and "trainer-socket" not in " ".join(site_argv(cold))


def test_the_client_app_module_flower_loads_imports_no_torch():
    code = ("import sys; import client.warm; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_code_digest_follows_the_code_and_nothing_else(tmp_path):
    for folder in CODE_DIRS:
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    assert code_digest(tmp_path) == code_digest(ROOT)
    (tmp_path / "notes.txt").write_text("not code")
    (tmp_path / "client" / "__pycache__").mkdir(exist_ok=True)
    assert code_digest(tmp_path) == code_digest(ROOT)
    with open(tmp_path / "common" / "keys.py", "a") as f:
        f.write("\n# changed\n")
    assert code_digest(tmp_path) != code_digest(ROOT)
