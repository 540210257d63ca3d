"""The `fedmm` command: the Flower command lines it builds, and one-line user errors."""

from __future__ import annotations

import importlib.metadata
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomli
from flwr.cli.build import build_fab_from_disk

from launcher.cli import parser, site_argv
from launcher.deployment import APP_DIR, flower_app, superlink_argv

ROOT = Path(__file__).resolve().parents[2]


def test_site_runs_a_supernode_with_tls_node_auth_and_its_node_config(tmp_path):
    for name in ("train.csv", "ca.crt", "clinic-a.key"):
        (tmp_path / name).write_text("x")
    args = parser().parse_args(["site", "--superlink", "fl.example.org:9093", "--data",
                                str(tmp_path / "train.csv"), "--ca", str(tmp_path / "ca.crt"),
                                "--key", str(tmp_path / "clinic-a.key"), "--rank", "4",
                                "--device", "cuda"])
    argv = site_argv(args)
    assert argv[0].endswith("flower-supernode") and "--insecure" not in argv
    assert argv[argv.index("--superlink") + 1] == "fl.example.org:9093"
    assert argv[argv.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(tmp_path / "clinic-a.key")
    node = argv[argv.index("--node-config") + 1]
    assert node == (f'data-path="{tmp_path / "train.csv"}" site-name="clinic-a" '
                    f'device="cuda" lora-rank=4')


def test_server_turns_on_tls_node_auth_and_a_state_database(tmp_path):
    argv = superlink_argv("0.0.0.0", 9093, tmp_path / "state.db", tmp_path)
    for flag, value in (("--ssl-ca-certfile", tmp_path / "ca.crt"),
                        ("--ssl-certfile", tmp_path / "server.crt"),
                        ("--ssl-keyfile", tmp_path / "server.key"),
                        ("--database", tmp_path / "state.db")):
        assert argv[argv.index(flag) + 1] == str(value)
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert "--insecure" in superlink_argv("0.0.0.0", 9093, tmp_path / "s.db", None)


@pytest.mark.parametrize("args, expected", [
    (["site", "--superlink", "h:1", "--data", "{tmp}/missing.csv"], "manifest not found"),
    (["site", "--superlink", "h:1", "--data", "{tmp}/train.csv"], "--ca"),
    (["server"], "--certs"),
    (["server", "--certs", "{tmp}"], "site public keys"),
    (["train", "--superlink", "h:1"], "--ca"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, args, expected):
    (tmp_path / "train.csv").write_text("image,text,label\n")
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "server.key").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "launcher.cli",
                           *[a.format(tmp=tmp_path) for a in args]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_an_installed_wheel_stages_the_flower_app_that_pyproject_declares(tmp_path):
    assert flower_app(tmp_path / "unused") == APP_DIR == ROOT  # a source tree is the app
    site_packages = tmp_path / "site-packages"  # what a wheel leaves: packages, no pyproject
    site_packages.mkdir()
    for package in importlib.metadata.distribution("fedmm").read_text("top_level.txt").split():
        (site_packages / package).symlink_to(ROOT / package)
    app = flower_app(tmp_path / "app", app_dir=site_packages)
    staged = tomli.loads((app / "pyproject.toml").read_text())
    declared = tomli.loads((ROOT / "pyproject.toml").read_text())
    assert staged["tool"]["flwr"]["app"] == declared["tool"]["flwr"]["app"]
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    assert {"server/app.py", "client/app.py", "common/conf/config.yaml"} <= set(names)
