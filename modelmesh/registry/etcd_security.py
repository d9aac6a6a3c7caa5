"""What the etcd client needs to reach a secured etcd: TLS files, a user, and the words
for what went wrong.

``EtcdSecurity`` names the files (as etcdctl's ``--cacert/--cert/--key``) and the
user; ``TokenFiles`` reads them and notices when they change (rotation);
``token_rejected`` recognises etcd's "your token is no good" answers, and
``explain`` turns a failed call into a sentence an operator can act on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from modelmesh.settings import Settings


@dataclass(frozen=True, slots=True)
class EtcdSecurity:
    """How to reach a secured etcd: TLS files (named as etcdctl names them) and a user.

    Holds paths only; the password is read from ``password_file`` by the client.
    """

    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str = ""
    password_file: Path | None = None

    @classmethod
    def from_settings(cls, s: Settings) -> EtcdSecurity:
        return cls(s.etcd_cacert, s.etcd_cert, s.etcd_key, s.etcd_user, s.etcd_password_file)


def split_endpoints(endpoints: Sequence[str]) -> tuple[list[str], bool]:
    """(gRPC targets HOST:PORT, whether a scheme asked for TLS) from etcd endpoints.

    An endpoint is ``HOST:PORT``, ``http://HOST:PORT`` or ``https://HOST:PORT``
    (a trailing ``/`` is dropped); mixing http:// and https:// is refused.
    """
    targets: list[str] = []
    schemes: set[str] = set()
    for endpoint in endpoints:
        scheme, sep, rest = endpoint.strip().partition("://")
        if sep:
            if scheme.lower() not in ("http", "https"):
                raise ValueError(f"etcd endpoint {endpoint!r}: the scheme must be http or https")
            schemes.add(scheme.lower())
        else:
            rest = scheme
        rest = rest.rstrip("/")
        if not rest or "/" in rest:
            raise ValueError(f"etcd endpoint {endpoint!r} is not [https://]HOST:PORT")
        targets.append(rest)
    if len(schemes) > 1:
        raise ValueError("etcd endpoints mix http:// and https://")
    return targets, schemes == {"https"}


class TokenFiles:
    """Files read at start and again when their mtime changed (cheap rotation support)."""

    def __init__(self, paths: Sequence[Path | None]) -> None:
        self._paths = [p for p in paths if p is not None]
        self._mtimes: dict[Path, int] = {}
        self._data: dict[Path, bytes] = {}
        self.refresh()

    def _mtime(self, path: Path) -> int:
        try:
            return os.stat(path).st_mtime_ns
        except OSError:
            return -1

    def changed(self) -> bool:
        return any(self._mtime(p) != self._mtimes.get(p) for p in self._paths)

    def refresh(self) -> None:
        """Read every file that changed; raises OSError naming one that cannot be read."""
        for path in self._paths:
            mtime = self._mtime(path)
            if mtime != self._mtimes.get(path) or path not in self._data:
                self._data[path] = path.read_bytes()
                self._mtimes[path] = mtime

    def get(self, path: Path | None) -> bytes | None:
        return None if path is None else self._data[path]


def token_rejected(exc: grpc.aio.AioRpcError) -> bool:
    """etcd says the auth token is no good (expired, from another member, auth changed)."""
    details = exc.details() or ""
    return exc.code() == grpc.StatusCode.UNAUTHENTICATED or (
        exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        and ("invalid auth token" in details or "revision of auth store is old" in details))


# gRPC's words for a TLS set-up that cannot work: retrying will not help a client that
# has never reached etcd, so it gives up at once with a message saying what is wrong.
_HANDSHAKE = ("handshake failed", "ssl_error", "certificate_verify_failed", "bad_certificate",
              "certificate_required", "wrong_version_number")


def misconfigured(exc: grpc.aio.AioRpcError, tls: bool) -> bool:
    details = (exc.details() or "").lower()
    if any(word in details for word in _HANDSHAKE):
        return True
    return not tls and details.endswith("socket closed")


def explain(method: str, exc: grpc.aio.AioRpcError, sec: EtcdSecurity, *, tls: bool) -> str:
    """What went wrong, in words an operator can act on (never the password)."""
    code, details = exc.code(), exc.details() or ""
    low = details.lower()
    if "bad_certificate" in low or "certificate_required" in low:
        what = (f"it refused the client certificate {sec.cert} (not signed by a CA it "
                "trusts, or expired)" if sec.cert else
                "it requires a client certificate: give --etcd-cert and --etcd-key")
        return f"TLS handshake failed: {what} ({details})"
    if "certificate_verify_failed" in low:
        roots = sec.cacert or "the system roots"
        return f"TLS handshake failed: etcd's certificate is not trusted by {roots} ({details})"
    if "wrong_version_number" in low or ("handshake failed" in low and tls):
        return (f"TLS handshake failed: does etcd serve plaintext? (drop https:// and "
                f"--etcd-cacert) ({details})")
    if not tls and low.endswith("socket closed"):
        return (f"etcd closed the plaintext connection: does it expect TLS? (give "
                f"--etcd-cacert or https:// endpoints) ({details})")
    if method == "Authenticate":
        return f"authentication failed for user {sec.user!r}: {details}"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        who = f"user {sec.user!r}" if sec.user else (
            "the client certificate's user (its common name)" if sec.cert else
            "an unauthenticated client (give --etcd-user and --etcd-password-file)")
        return f"etcd {method}: permission denied for {who}: {details}"
    return f"etcd {method} failed: {code.name}: {details}"
