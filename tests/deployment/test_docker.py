"""docker/: the compose file is a valid local federation (one server, three sites) with TLS,
node authentication, a persistent state volume, a loopback host-network variant and a GPU
variant; images install the project offline from the wheelhouse and run `fedmm`.

`docker-compose config` validates them where Docker Compose is installed (Debian's
docker-compose package; no Docker engine is needed); the structure is checked everywhere.
Building the images and training in containers is `make docker-e2e` (docker/e2e.sh).
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


def _without(command: list[str], *flags: str) -> list[str]:
    """`command` less each `flag VALUE` pair."""
    out, skip = [], False
    for arg in command:
        if skip or arg in flags:
            skip = not skip
            continue
        out.append(arg)
    return out


def test_server_and_three_sites_run_fedmm_with_tls_and_node_auth():
    services = _compose()["services"]
    server = services["superlink"]
    assert server["command"][0] == "server" and "--certs" in server["command"]
    assert "--insecure" not in server["command"]
    assert any(v.startswith("superlink-state:") for v in server["volumes"])
    assert not any(".key" in v for v in server["volumes"])  # no site private key on the server
    targets = {v.removesuffix(":ro").rsplit(":", 1)[1] for v in server["volumes"]}
    assert {f"/certs/sites/{s}.pub" for s in SITES} <= targets
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


def test_host_override_keeps_the_federation_on_loopback_with_its_own_ports():
    base, host = _compose()["services"], _compose("compose.host.yml")["services"]
    assert set(host) == set(base) and all(s["network_mode"] == "host" for s in host.values())
    assert "ports" not in base["superlink"]  # compose.publish.yml publishes it (not with host)
    server = host["superlink"]["command"]
    assert server[server.index("--host") + 1] == "127.0.0.1"
    assert _without(server, "--host", "--port") == _without(base["superlink"]["command"],
                                                            "--host", "--port")
    address = f"127.0.0.1:{server[server.index('--port') + 1]}"
    ports = {server[server.index("--port") + 1]}
    for name in SITES:
        command = host[name]["command"]
        assert command[command.index("--superlink") + 1] == address
        assert _without(command, "--superlink", "--runtime-port") == _without(
            base[name]["command"], "--superlink")  # the same site, reached over loopback
        ports.add(command[command.index("--runtime-port") + 1])
    assert len(ports) == 1 + len(SITES)  # one port per listener on the shared host network
    train = host["train"]["entrypoint"]
    assert train[train.index("--superlink") + 1] == address
    assert _without(train, "--superlink") == _without(base["train"]["entrypoint"], "--superlink")


@pytest.mark.parametrize("dockerfile", ["server.Dockerfile", "site.Dockerfile",
                                        "site-cuda.Dockerfile"])
def test_images_install_the_wheelhouse_offline_and_run_fedmm(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    assert 'ENTRYPOINT ["fedmm"]' in text and text.count("pip install") == 2
    assert text.count("--no-index") == 2 and "ARG BASE=" in text
    assert "source=docker/wheelhouse/deps" in text and "source=docker/wheelhouse/fedmm" in text
    assert "COPY" not in text  # nothing from the source tree: the fedmm wheel only


def test_build_context_holds_the_wheelhouse_only():
    lines = (DOCKER.parent / ".dockerignore").read_text().split("\n")
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules == ["*", "!docker/wheelhouse"]  # certificates and site keys never reach a build


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
@pytest.mark.parametrize("files", [["compose.yml"], ["compose.yml", "compose.host.yml"],
                                   ["compose.yml", "compose.publish.yml"],
                                   ["compose.yml", "compose.gpu.yml"]])
def test_docker_compose_config_validates(files):
    args = [a for f in files for a in ("-f", str(DOCKER / f))]
    proc = subprocess.run(["docker-compose", *args, "config", "-q"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
