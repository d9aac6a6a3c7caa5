"""Real X.509 certificates for the TLS tests, made with ``cryptography``.

``make_pki(dir)`` writes a CA and, signed by it, certificates for a server (the
mesh's serving identity, also what its instances present to each other), a client,
an outsider client, an expired client, plus a second CA with a client of its own:

    pki.ca, pki.server, pki.client, pki.outsider, pki.expired, pki.other_ca, pki.foreign

Each ``Pair`` has ``cert`` and ``key`` paths (PEM) and ``read()`` for the bytes.
Server certificates carry ``localhost``, ``127.0.0.1`` and ``::1`` as SANs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The common name of the mesh's serving / peer certificate.
SERVER_CN = "modelmesh.test"


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM)."""
        return self.cert.read_bytes(), self.key.read_bytes()


@dataclass(frozen=True)
class Pki:
    ca: Pair
    server: Pair
    client: Pair
    outsider: Pair
    expired: Pair
    other_ca: Pair
    foreign: Pair
    root: Path

    def issue(self, name: str, cn: str, *, server: bool = False,
              days: int = 30) -> Pair:
        """Another certificate signed by ``ca`` (e.g. a rotated server certificate)."""
        return _issue(self.root, name, cn, self.ca, server=server, days=days)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(root: Path, name: str, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> Pair:
    pair = Pair(root / f"{name}.crt", root / f"{name}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return pair


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(root: Path, name: str, cn: str) -> Pair:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False),
                critical=True)
            .sign(key, hashes.SHA256()))
    return _write(root, name, cert, key)


def _issue(root: Path, name: str, cn: str, ca: Pair, *, server: bool = False,
           days: int = 30, expired: bool = False) -> Pair:
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    key = _key()
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired \
        else (now - dt.timedelta(minutes=5), now + dt.timedelta(days=days))
    names: list[x509.GeneralName] = [x509.DNSName(cn)]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                  x509.IPAddress(ipaddress.ip_address("::1"))]
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    return _write(root, name, cert, key)


def make_pki(root: Path) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    ca = _ca(root, "ca", "modelmesh test CA")
    other = _ca(root, "other-ca", "another CA")
    return Pki(
        ca=ca,
        server=_issue(root, "server", SERVER_CN, ca, server=True),
        client=_issue(root, "client", "ops-console", ca),
        outsider=_issue(root, "outsider", "outsider", ca),
        expired=_issue(root, "expired", "ops-console", ca, expired=True),
        other_ca=other,
        foreign=_issue(root, "foreign", "ops-console", other),
        root=root,
    )
