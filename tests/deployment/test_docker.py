"""docker/: the compose file is a valid local federation (one server, three sites) with TLS,
node authentication, a persistent state volume and a GPU variant; images run `fedmm`.

`docker-compose config` validates it where Docker Compose is installed (Debian's
docker-compose package; no Docker engine is needed); the structure is checked everywhere.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"
SITES = ("site-1", "site-2", "site-3")


def _compose(name: str = "compose.yml") -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def test_server_and_three_sites_run_fedmm_with_tls_and_node_auth():
    services = _compose()["services"]
    server = services["superlink"]
    assert server["command"][0] == "server" and "--certs" in server["command"]
    assert "--insecure" not in server["command"]
    assert any(v.startswith("superlink-state:") for v in server["volumes"])
    assert not any(".key" in v for v in server["volumes"])  # no site private key on the server
    assert {f"/certs/sites/{s}.pub" for s in SITES} <= {v.split(":")[1] for v in server["volumes"]}
    for name in SITES:
        command = services[name]["command"]
        assert command[:3] == ["site", "--superlink", "superlink:9093"]
        assert "--ca" in command and "--key" in command and f"/data/{name}.csv" in command
        secrets = {s if isinstance(s, str) else s["source"] for s in services[name]["secrets"]}
        assert secrets == {"ca", f"{name}-key"}  # each site sees its own key only
    assert services["train"]["entrypoint"][:2] == ["fedmm", "train"]
    assert "superlink-state" in _compose()["volumes"]


def test_gpu_override_reserves_an_nvidia_gpu_with_the_cuda_image():
    site = _compose("compose.gpu.yml")["services"]["site-3"]
    device = site["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert site["build"]["dockerfile"] == "docker/site-cuda.Dockerfile"


@pytest.mark.parametrize("dockerfile", ["server.Dockerfile", "site.Dockerfile",
                                        "site-cuda.Dockerfile"])
def test_images_install_the_project_and_run_fedmm(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    assert 'ENTRYPOINT ["fedmm"]' in text and "pip install --no-cache-dir -e ." in text


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
@pytest.mark.parametrize("files", [["compose.yml"], ["compose.yml", "compose.gpu.yml"]])
def test_docker_compose_config_validates(files):
    args = [a for f in files for a in ("-f", str(DOCKER / f))]
    proc = subprocess.run(["docker-compose", *args, "config", "-q"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
