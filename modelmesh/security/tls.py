"""TLS material from files, re-read when the files change (cert-manager rotates in place).

``TlsFiles`` holds the paths of ``--tls-cert``, ``--tls-key`` and ``--tls-ca`` and
reads them again whenever one's modification time or size changes, so a rotated
certificate is used by the next connection without a restart:

- ``server_credentials()``: gRPC server credentials whose configuration is
  fetched on every new connection (``grpc.dynamic_ssl_server_credentials``);
  with a CA, client certificates are required and verified against it;
- ``server_context()``: an ``ssl.SSLContext`` for the REST port, reloaded in
  place by ``refresh()`` (new handshakes use the new certificate);
- ``channel_credentials()``: what this instance presents to its peers (its own
  certificate as the client certificate) and how it verifies them (the CA).

Connections already open keep the certificate they were made with; requests on
them are not disturbed.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Material:
    """One reading of the files: PEM bytes (``ca`` empty without a CA)."""

    cert: bytes
    key: bytes
    ca: bytes


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a certificate names: its subject common name and its DNS / URI / IP SANs."""

    cn: str = ""
    sans: frozenset[str] = frozenset()

    def names(self) -> frozenset[str]:
        return self.sans | ({self.cn} if self.cn else frozenset())


def certificate_identity(pem: bytes) -> Identity:
    """The identity of the first certificate in ``pem``."""
    cert = x509.load_pem_x509_certificate(pem)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    sans: set[str] = set()
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans.update(str(v) for v in ext.get_values_for_type(x509.DNSName))
        sans.update(str(v) for v in ext.get_values_for_type(x509.UniformResourceIdentifier))
        sans.update(str(v) for v in ext.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        pass
    return Identity(cn, frozenset(sans))


def primary_name(identity: Identity) -> str:
    """A certificate's primary name: its common name, else its first DNS SAN (never an
    IP address, which many certificates of a CA may share)."""
    if identity.cn:
        return identity.cn
    dns = sorted(n for n in identity.sans if not _is_ip(n) and "://" not in n)
    return dns[0] if dns else ""


class TlsFiles:
    """The serving certificate, key and (optional) client CA, re-read when they change."""

    def __init__(self, cert: Path, key: Path, ca: Path | None = None) -> None:
        self.cert, self.key, self.ca = Path(cert), Path(key), Path(ca) if ca else None
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.material = self._read()
        #: This instance's own identity (what its peers present too).
        self.identity = certificate_identity(self.material.cert)
        self._contexts: list[ssl.SSLContext] = []

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate signed by the CA."""
        return self.ca is not None

    def _paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.ca,) if self.ca else ())

    def _stat(self) -> tuple[tuple[int, int], ...]:
        out = []
        for p in self._paths():
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _read(self) -> Material:
        return Material(self.cert.read_bytes(), self.key.read_bytes(),
                        self.ca.read_bytes() if self.ca else b"")

    def refresh(self) -> bool:
        """Read the files again if they changed; True when the material was replaced.

        A half-written rotation (a file that does not parse yet) keeps the old
        material and is tried again on the next call.
        """
        with self._lock:
            try:
                stamp = self._stat()
            except OSError as exc:
                log.warning("TLS files not readable (%s); keeping the current certificate", exc)
                return False
            if stamp == self._stamp:
                return False
            try:
                material = self._read()
                identity = certificate_identity(material.cert)
                for ctx in self._contexts:
                    self._load(ctx, material)
            except (OSError, ValueError, ssl.SSLError) as exc:
                log.warning("TLS files changed but cannot be used yet (%s); keeping the "
                            "current certificate", exc)
                return False
            self._stamp, self.material, self.identity = stamp, material, identity
        log.info("TLS certificate reloaded from %s", self.cert)
        return True

    # -- gRPC -----------------------------------------------------------------------

    def _grpc_config(self, m: Material) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(m.key, m.cert)], root_certificates=m.ca or None)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server credentials re-reading the files on each new connection when changed."""
        def fetch() -> grpc.ServerCertificateConfiguration | None:
            return self._grpc_config(self.material) if self.refresh() else None

        return grpc.dynamic_ssl_server_credentials(
            self._grpc_config(self.material), fetch,
            require_client_authentication=self.mutual)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """This instance towards a peer: verify it against the CA (else the system roots)
        and present our own certificate (so the peer knows we are one of its own)."""
        m = self.material
        return grpc.ssl_channel_credentials(root_certificates=m.ca or None,
                                            private_key=m.key, certificate_chain=m.cert)

    def peer_name(self) -> str:
        """The name peers are verified by: instances share the serving identity, so a
        peer must present a certificate valid for our own name (gRPC checks the DNS SANs:
        the first of ours, else our common name)."""
        dns = sorted(n for n in self.identity.sans if not _is_ip(n) and "://" not in n)
        return dns[0] if dns else self.identity.cn

    # -- REST -----------------------------------------------------------------------

    def server_context(self) -> ssl.SSLContext:
        """An SSLContext for the REST port; ``refresh()`` reloads it in place."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(ctx, self.material)
        ctx.verify_mode = ssl.CERT_REQUIRED if self.mutual else ssl.CERT_NONE
        self._contexts.append(ctx)
        return ctx

    def _load(self, ctx: ssl.SSLContext, m: Material) -> None:
        # ssl loads only from files: the (already read and checked) paths themselves.
        ctx.load_cert_chain(self.cert, self.key)
        if m.ca:
            ctx.load_verify_locations(cadata=m.ca.decode())


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
