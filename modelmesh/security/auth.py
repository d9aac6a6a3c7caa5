"""Who may do what: ``--auth-file``, roles per operation, and the peer rule.

The file (YAML, re-read when it changes)::

    tokens:                      # bearer tokens, stored as SHA-256 hex digests
      - sha256: 9f86d081884c7d65...
        roles: [infer, read]
    identities:                  # mTLS client certificates (needs --tls-ca)
      - cn: ops-console          # subject common name, or san: <DNS, URI or IP SAN>
        roles: [manage, read, infer]

Roles: ``infer`` (the V2 data plane), ``read`` (status, list, metadata),
``manage`` (register, unregister, vmodels, repository load / unload). The
operation's role comes from ``role_of``; liveness / readiness probes, the gRPC
health service and reflection need none. A caller's roles are those of its
token and of its certificate together. No credential: ``Unauthenticated``; a
credential without the role: ``PermissionDenied``.

Peers: with TLS, a caller whose verified client certificate has this instance's
own primary name (its common name, else its first DNS name) is another instance
of the mesh (instances share that identity). A peer's call was authorized by the instance that
received it from the client, so it is not checked again, and only a peer's
internal headers (``mm-hops``, ``mm-load-here``) are honoured.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from modelmesh.errors import PermissionDenied, Unauthenticated
from modelmesh.security.tls import Identity, primary_name

log = logging.getLogger(__name__)

ROLES = ("infer", "read", "manage")

#: Operations anyone may call: probes and service discovery.
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})
OPEN_OPERATIONS = frozenset({"ServerLive", "ServerReady", "ServerHealth"})
#: Operations that carry other calls: each carried call is admitted on its own, with its
#: own credentials (``api.peer``), so the carrier itself needs no role.
CARRIER_OPERATIONS = frozenset({"ForwardInferBatch"})
INFER_OPERATIONS = frozenset({"ModelInfer", "ModelStreamInfer", "V1Predict"})
MANAGE_OPERATIONS = frozenset({
    "registerModel", "unregisterModel", "setVModel", "deleteVModel", "ensureLoaded",
    "registerModels", "RepositoryModelLoad", "RepositoryModelUnload",
    "RepositoryModel",  # REST's load / unload
})

#: How often (seconds) the file's modification time is looked at.
RELOAD_CHECK_S = 1.0


def role_of(service: str, operation: str) -> str | None:
    """The role ``operation`` of ``service`` needs (None: open to anyone)."""
    if service in OPEN_SERVICES or operation in OPEN_OPERATIONS \
            or operation in CARRIER_OPERATIONS:
        return None
    if operation in INFER_OPERATIONS:
        return "infer"
    if operation in MANAGE_OPERATIONS:
        return "manage"
    return "read"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request, as the ingress decided."""

    name: str
    roles: frozenset[str] = frozenset()
    peer: bool = False


ANONYMOUS = Principal("anonymous", frozenset(ROLES))  # no --auth-file: everything is open


@dataclass(frozen=True, slots=True)
class _Rules:
    tokens: dict[str, frozenset[str]]
    cns: dict[str, frozenset[str]]
    sans: dict[str, frozenset[str]]


def _roles(entry: Any, where: str) -> frozenset[str]:
    roles = entry.get("roles") if isinstance(entry, dict) else None
    if not isinstance(roles, list) or not roles:
        raise ValueError(f"{where}: 'roles' must be a non-empty list of {', '.join(ROLES)}")
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"{where}: unknown role(s) {bad} (known: {', '.join(ROLES)})")
    return frozenset(roles)


def parse_rules(text: str, source: str = "auth file") -> _Rules:
    """The rules of an auth file; ``ValueError`` naming the entry at fault."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source} must be a mapping with 'tokens' and/or 'identities'")
    unknown = set(data) - {"tokens", "identities"}
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}")
    tokens: dict[str, frozenset[str]] = {}
    for i, entry in enumerate(data.get("tokens") or []):
        where = f"{source}: tokens[{i}]"
        digest = str(entry.get("sha256", "")).strip().lower() if isinstance(entry, dict) else ""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{where}: 'sha256' must be the 64 hex digits of the token's "
                             "SHA-256 digest")
        tokens[digest] = tokens.get(digest, frozenset()) | _roles(entry, where)
    cns: dict[str, frozenset[str]] = {}
    sans: dict[str, frozenset[str]] = {}
    for i, entry in enumerate(data.get("identities") or []):
        where = f"{source}: identities[{i}]"
        if not isinstance(entry, dict) or ("cn" in entry) == ("san" in entry):
            raise ValueError(f"{where}: give exactly one of 'cn' or 'san'")
        roles = _roles(entry, where)
        table, name = (cns, entry["cn"]) if "cn" in entry else (sans, entry["san"])
        table[str(name)] = table.get(str(name), frozenset()) | roles
    return _Rules(tokens, cns, sans)


class Authorizer:
    """Decides each call: ``principal(token, identity)`` then ``require(principal, role)``.

    ``path`` None: no auth file, every caller may do everything (the mesh warns at
    start when it listens beyond loopback). ``own`` is this instance's TLS identity
    (None without TLS: nobody can be recognised as a peer, and internal headers are
    honoured from every caller, as the README says).
    """

    def __init__(self, path: Path | None, own: Identity | None = None) -> None:
        self.path = Path(path) if path else None
        self.own = own
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._rules = _Rules({}, {}, {})
        if self.path is not None:
            self._load()  # a bad file fails the start

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _load(self) -> None:
        assert self.path is not None
        st = os.stat(self.path)
        rules = parse_rules(self.path.read_text(), str(self.path))
        self._rules, self._stamp = rules, (st.st_mtime_ns, st.st_size)

    def _maybe_reload(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        with self._lock:
            self._checked = now
            try:
                st = os.stat(self.path)
                if (st.st_mtime_ns, st.st_size) == self._stamp:
                    return
                self._load()
                log.info("auth file %s reloaded", self.path)
            except (OSError, ValueError) as exc:
                log.warning("auth file %s changed but cannot be used (%s); keeping the "
                            "previous rules", self.path, exc)
                self._stamp = None if isinstance(exc, OSError) else self._stamp

    def is_peer(self, identity: Identity | None) -> bool:
        """Whether a verified client certificate is another instance of this mesh."""
        if self.own is None or identity is None:
            return False
        name = primary_name(self.own)
        return bool(name) and name == primary_name(identity)

    def principal(self, authorization: str | None, identity: Identity | None) -> Principal:
        """The caller; ``Unauthenticated`` for an unknown or malformed token."""
        if self.is_peer(identity):
            return Principal("peer", frozenset(ROLES), peer=True)
        if self.path is None:
            return ANONYMOUS
        self._maybe_reload()
        rules = self._rules
        roles: frozenset[str] = frozenset()
        names: list[str] = []
        if authorization:
            scheme, _, token = authorization.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("the authorization header must be 'Bearer <token>'")
            digest = token_digest(token)
            found = next((r for d, r in rules.tokens.items()
                          if hmac.compare_digest(d, digest)), None)
            if found is None:
                raise Unauthenticated("unknown token")
            roles |= found
            names.append("token")
        if identity is not None:
            for name, table in ((identity.cn, rules.cns),) + tuple(
                    (san, rules.sans) for san in sorted(identity.sans)):
                if name and name in table:
                    roles |= table[name]
                    names.append(name)
        if not names:
            raise Unauthenticated(
                "no credential: send 'authorization: Bearer <token>'"
                + (" or a client certificate the auth file names" if self.own else ""))
        return Principal("+".join(names), roles)

    @staticmethod
    def require(principal: Principal, role: str | None, operation: str) -> None:
        if role is not None and role not in principal.roles:
            raise PermissionDenied(f"{operation} needs the '{role}' role")
