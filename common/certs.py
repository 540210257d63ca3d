"""Certificates and keys for a deployed federation, generated with `cryptography`.

    fedmm certs --out certs --server-host fl.example.org --site clinic-a --site clinic-b

writes

    certs/ca.crt  ca.key             the federation's own CA (keep ca.key offline)
    certs/server.crt  server.key     the SuperLink's TLS certificate, SANs = the server hosts
                                     plus localhost/127.0.0.1 (its own SuperExec connects there)
    certs/sites/NAME.key  NAME.pub   per-site ECDSA P-384 key pair (OpenSSH format) for Flower's
                                     SuperNode authentication; the server registers NAME.pub

Every site gets `ca.crt` and its own `NAME.key`; nothing else leaves the coordinator.
Existing keys are never overwritten unless `force` is set.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825
LOOPBACK = ("localhost", "127.0.0.1")


class CertsError(ValueError):
    """The certificates cannot be written as asked (e.g. they exist and `force` is off)."""


@dataclass
class CertPaths:
    """Where `write_certs` put everything."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    site_keys: dict[str, tuple[Path, Path]]  # name -> (private key, public key)


def cert_paths(out: Path, sites: list[str]) -> CertPaths:
    """The file layout of a certificate folder."""
    return CertPaths(out / "ca.crt", out / "ca.key", out / "server.crt", out / "server.key",
                     {s: (out / "sites" / f"{s}.key", out / "sites" / f"{s}.pub") for s in sites})


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmm"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS)))


def make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA key and certificate."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("fedmm federation CA")
    cert = (_builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     hosts: list[str]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server key and certificate for `hosts` (DNS names or IPs), signed by the CA."""
    key = ec.generate_private_key(ec.SECP384R1())
    names = list(dict.fromkeys([*hosts, *LOOPBACK]))
    cert = (_builder(_name(hosts[0] if hosts else LOOPBACK[0]), ca_cert.subject,
                     key.public_key())
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def make_site_keys() -> tuple[bytes, bytes]:
    """An ECDSA P-384 key pair for SuperNode authentication: (OpenSSH private, public)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, secret: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_certs(out: str | Path, server_hosts: list[str], sites: list[str],
                force: bool = False) -> CertPaths:
    """Write the CA, the SuperLink certificate and one key pair per site into `out`."""
    out = Path(out)
    if not server_hosts:
        raise CertsError("--server-host: give at least one name or IP the sites will dial")
    bad = [s for s in sites if not s or "/" in s or s.startswith(".")]
    if bad or len(set(sites)) != len(sites):
        raise CertsError(f"--site: names must be unique and plain file names (got {sites})")
    paths = cert_paths(out, sites)
    targets = [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key,
               *(p for pair in paths.site_keys.values() for p in pair)]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise CertsError(f"{existing[0]} exists; refusing to overwrite keys (use --force)")
    ca_key, ca_cert = make_ca()
    server_key, server_cert = make_server_cert(ca_key, ca_cert, server_hosts)
    pem = serialization.Encoding.PEM
    _write(paths.ca_key, _pem_key(ca_key), secret=True)
    _write(paths.ca_cert, ca_cert.public_bytes(pem), secret=False)
    _write(paths.server_key, _pem_key(server_key), secret=True)
    _write(paths.server_cert, server_cert.public_bytes(pem), secret=False)
    for private_path, public_path in paths.site_keys.values():
        private, public = make_site_keys()
        _write(private_path, private, secret=True)
        _write(public_path, public, secret=False)
    return paths
