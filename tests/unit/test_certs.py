"""`fedmm certs`: a CA, a SuperLink certificate it signs (with SANs), Flower-loadable site keys."""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (load_ssh_private_key,
                                                          load_ssh_public_key)

from common.certs import CertsError, write_certs


def test_server_certificate_is_signed_by_the_ca_and_names_the_hosts(tmp_path):
    paths = write_certs(tmp_path, ["fl.example.org", "10.0.0.5"], ["a"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.0.0.5"),
                                                            ipaddress.ip_address("127.0.0.1")}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert paths.ca_key.stat().st_mode & 0o077 == 0 and paths.server_key.stat().st_mode & 0o077 == 0


def test_site_keys_are_the_openssh_ecdsa_pairs_flower_loads(tmp_path):
    paths = write_certs(tmp_path, ["127.0.0.1"], ["a", "b"])
    (a_key, a_pub), (b_key, _) = paths.site_keys["a"], paths.site_keys["b"]
    private = load_ssh_private_key(a_key.read_bytes(), None)  # what flower-supernode does
    public = load_ssh_public_key(a_pub.read_bytes())  # what `flwr supernode register` does
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert a_key.read_bytes() != b_key.read_bytes()
    assert a_key.stat().st_mode & 0o077 == 0


def test_existing_keys_are_not_overwritten_without_force(tmp_path):
    paths = write_certs(tmp_path, ["127.0.0.1"], ["a"])
    before = paths.ca_key.read_bytes()
    with pytest.raises(CertsError, match="--force"):
        write_certs(tmp_path, ["127.0.0.1"], ["a"])
    assert paths.ca_key.read_bytes() == before
    write_certs(tmp_path, ["127.0.0.1"], ["a"], force=True)
    assert paths.ca_key.read_bytes() != before


def test_cli_refuses_to_overwrite_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", "launcher.cli", "certs", "--out", str(tmp_path),
           "--server-host", "127.0.0.1", "--site", "a"]
    assert subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2
    assert "--force" in again.stderr and "Traceback" not in again.stderr
