"""A small asyncio etcd v3 client: KV, transactions, leases and resumable watches.

It speaks etcd's gRPC API through the protobuf stubs that ship in ``aetcd``
(``aetcd.rpc``), but manages the channel, retries and watch streams itself:
aetcd's own watch iterator ends for good when the connection drops, while the
mesh needs a watch that survives an etcd restart and resumes from the last
revision it saw (``watch_prefix``).

Security (``EtcdSecurity``, in ``etcd_security``): TLS with the CA, client certificate and key that
etcdctl calls ``--cacert/--cert/--key`` (files re-read on reconnect when their
mtime changed, so rotated certificates are picked up), and etcd's own users:
the client authenticates, sends the token as ``token`` metadata on every call
and, when etcd says the token is invalid (expired simple tokens, a restarted or
another member), authenticates again and retries once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import grpc
from aetcd import rpc

from modelmesh.errors import Unavailable
from modelmesh.registry.etcd_security import (
    EtcdSecurity,
    TokenFiles,
    explain,
    misconfigured,
    split_endpoints,
    token_rejected,
)

log = logging.getLogger(__name__)

_MAX_MESSAGE = 256 * 1024 * 1024
# etcd's default limit on a transaction's operations is 128.
MAX_TXN_OPS = 128


def prefix_end(prefix: bytes) -> bytes:
    """The range end that selects every key starting with ``prefix``."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


@dataclass(frozen=True, slots=True)
class KV:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


class EventType(Enum):
    PUT = 0
    DELETE = 1


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    key: bytes
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Resync:
    """Emitted by a watch when history was compacted away: re-list and carry on."""

    revision: int


def _kv(kv: rpc.KeyValue) -> KV:
    return KV(kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.version, kv.lease)


# Comparisons and operations for transactions, as raw etcd messages.
def cmp_version(key: bytes, op: str, version: int, prefix: bool = False) -> rpc.Compare:
    """Compare a key's version; with ``prefix``, every key under it (none: version 0)."""
    return rpc.Compare(key=key, target=rpc.Compare.VERSION, result=_RESULT[op], version=version,
                       range_end=prefix_end(key) if prefix else b"")


def cmp_mod_revision(key: bytes, op: str, revision: int, prefix: bool = False) -> rpc.Compare:
    """Compare a key's mod revision; with ``prefix``, every key under it (none: 0)."""
    return rpc.Compare(
        key=key, target=rpc.Compare.MOD, result=_RESULT[op], mod_revision=revision,
        range_end=prefix_end(key) if prefix else b"",
    )


def cmp_value(key: bytes, op: str, value: bytes) -> rpc.Compare:
    return rpc.Compare(key=key, target=rpc.Compare.VALUE, result=_RESULT[op], value=value)


_RESULT = {
    "==": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}


def op_put(key: bytes, value: bytes, lease: int = 0) -> rpc.RequestOp:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def op_delete(key: bytes, prefix: bool = False) -> rpc.RequestOp:
    req = rpc.DeleteRangeRequest(key=key, range_end=prefix_end(key) if prefix else b"")
    return rpc.RequestOp(request_delete_range=req)


def op_get(key: bytes, prefix: bool = False, count_only: bool = False) -> rpc.RequestOp:
    return rpc.RequestOp(request_range=rpc.RangeRequest(
        key=key, range_end=prefix_end(key) if prefix else b"", count_only=count_only))


class EtcdClient:
    """One connection to an etcd cluster, failing over between its endpoints.

    Every unary call retries on UNAVAILABLE across endpoints until ``timeout``
    runs out, then raises ``modelmesh.errors.Unavailable`` with a message that
    says what went wrong (TLS, authentication, permissions, or plain absence).
    With ``security``, the channel uses TLS and/or etcd authentication.
    """

    def __init__(self, endpoints: Sequence[str], timeout: float = 5.0,
                 security: EtcdSecurity | None = None) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints, https = split_endpoints(endpoints)
        self.timeout = timeout
        self.security = sec = security or EtcdSecurity()
        self._tls = https or sec.cacert is not None or sec.cert is not None
        # Read now: a missing or unreadable file fails the start, not the first call.
        self._files = TokenFiles([sec.cacert, sec.cert, sec.key, sec.password_file])
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()
        self._reached = False  # any call has succeeded: TLS and credentials work
        self._misconfigured: set[int] = set()  # endpoints whose handshake cannot work
        self._index = 0
        self._channel: grpc.aio.Channel | None = None
        self._open(0)

    def _credentials(self) -> grpc.ChannelCredentials:
        sec, files = self.security, self._files
        return grpc.ssl_channel_credentials(
            root_certificates=files.get(sec.cacert),  # None: the system roots
            private_key=files.get(sec.key), certificate_chain=files.get(sec.cert))

    def _open(self, index: int) -> None:
        self._index = index % len(self.endpoints)
        target = self.endpoints[self._index]
        options = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Reconnect quickly after an etcd restart.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if self._tls:
            self._channel = grpc.aio.secure_channel(target, self._credentials(), options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self.kv = rpc.KVStub(self._channel)
        self.leases = rpc.LeaseStub(self._channel)
        self.watches = rpc.WatchStub(self._channel)
        self.maintenance = rpc.MaintenanceStub(self._channel)
        self.auth = rpc.AuthStub(self._channel)

    async def _rotate(self, failed: grpc.aio.Channel | None) -> None:
        """After a failure on ``failed``: the next endpoint, or new credential files."""
        if failed is not self._channel:
            return
        renewed = self._files.changed()
        if renewed:
            try:
                self._files.refresh()
            except OSError as exc:  # mid-rotation (a file replaced, not yet written)
                log.warning("etcd: cannot re-read a credential file (%s); keeping the old", exc)
                renewed = False
        if len(self.endpoints) == 1 and not renewed:
            return
        old = self._channel
        self._open(self._index + 1)
        if renewed:
            log.info("etcd: credential files changed; reconnecting to %s",
                     self.endpoints[self._index])
        else:
            log.info("etcd: switching to endpoint %s", self.endpoints[self._index])
        if old is not None:
            await old.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    # -- authentication ---------------------------------------------------

    async def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The ``token`` metadata for a call (authenticating first if need be), or None."""
        if not self.security.user:
            return None
        token = self._token
        if token is None:
            async with self._auth_lock:  # concurrent callers share one Authenticate
                if self._token is None:
                    self._token = await self._authenticate()
                token = self._token
        return (("token", token),)

    def _drop_token(self, metadata: tuple[tuple[str, str], ...] | None) -> None:
        """Forget the token ``metadata`` carried, unless another call already replaced it."""
        if metadata and self._token == metadata[0][1]:
            self._token = None

    def _password(self) -> str:
        if self._files.changed():
            self._files.refresh()
        raw = self._files.get(self.security.password_file) or b""
        return raw.decode().removesuffix("\n").removesuffix("\r")

    async def _authenticate(self) -> str:
        req = rpc.AuthenticateRequest(name=self.security.user, password=self._password())
        resp = await self._call("Authenticate", "auth", req, authenticated=False)
        log.debug("etcd: authenticated as %r", self.security.user)
        return str(resp.token)

    # -- calls ------------------------------------------------------------

    async def _call(self, method: str, stub_attr: str, request: object,
                    authenticated: bool = True) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        delay = 0.05
        reauthenticated_on: grpc.aio.Channel | None = None
        while True:
            channel = self._channel
            metadata = await self._metadata() if authenticated else None
            stub = getattr(self, stub_attr)
            remaining = deadline - loop.time()
            try:
                resp = await getattr(stub, method)(request, timeout=max(remaining, 0.05),
                                                   metadata=metadata)
                self._reached = True
                return resp
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if (task is not None and task.cancelling()) or channel is self._channel:
                    raise  # the caller is being cancelled
                # Another call switched endpoints and closed this channel under us
                # (grpc.aio cancels a closed channel's calls): retry on the new one.
                if loop.time() + delay >= deadline:
                    raise Unavailable(f"etcd {method} failed: its channel closed") from None
                continue
            except grpc.aio.AioRpcError as exc:
                if metadata and token_rejected(exc) and reauthenticated_on is not channel:
                    # Once per channel: a new member may not know the old token either.
                    reauthenticated_on = channel
                    self._drop_token(metadata)
                    continue
                retryable = exc.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
                if retryable and not self._reached and misconfigured(exc, self._tls):
                    self._misconfigured.add(self._index)
                    retryable = len(self._misconfigured) < len(self.endpoints)
                if not retryable or loop.time() + delay >= deadline:
                    raise Unavailable(explain(method, exc, self.security, tls=self._tls)) from exc
                await self._rotate(channel)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    # -- KV ---------------------------------------------------------------

    async def get(self, key: bytes) -> KV | None:
        resp = await self._call("Range", "kv", rpc.RangeRequest(key=key))
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(self, prefix: bytes, page: int = 5000) -> tuple[list[KV], int]:
        """All keys under ``prefix`` at one revision, read in pages; returns (kvs, revision)."""
        out: list[KV] = []
        end = prefix_end(prefix)
        start = prefix
        revision = 0
        while True:
            req = rpc.RangeRequest(key=start, range_end=end, limit=page, revision=revision)
            resp = await self._call("Range", "kv", req)
            if revision == 0:
                revision = resp.header.revision
            out.extend(_kv(kv) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return out, revision
            start = resp.kvs[-1].key + b"\0"

    async def count_prefix(self, prefix: bytes) -> int:
        req = rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix), count_only=True)
        resp = await self._call("Range", "kv", req)
        return int(resp.count)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        resp = await self._call("Put", "kv", rpc.PutRequest(key=key, value=value, lease=lease))
        return int(resp.header.revision)

    async def delete(self, key: bytes, prefix: bool = False) -> int:
        req = rpc.DeleteRangeRequest(key=key, range_end=prefix_end(key) if prefix else b"")
        resp = await self._call("DeleteRange", "kv", req)
        return int(resp.deleted)

    async def txn(
        self,
        compare: Sequence[rpc.Compare],
        success: Sequence[rpc.RequestOp] = (),
        failure: Sequence[rpc.RequestOp] = (),
    ) -> Any:
        req = rpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        return await self._call("Txn", "kv", req)

    async def status(self) -> int:
        """Ping the cluster; returns the current revision."""
        resp = await self._call("Status", "maintenance", rpc.StatusRequest())
        return int(resp.header.revision)

    # -- leases -----------------------------------------------------------

    async def lease_grant(self, ttl: int) -> int:
        resp = await self._call("LeaseGrant", "leases", rpc.LeaseGrantRequest(TTL=ttl))
        return int(resp.ID)

    async def lease_keepalive_once(self, lease_id: int) -> int:
        """Refresh a lease; returns its remaining TTL (0 when it has expired)."""
        for attempt in (1, 2):  # a second time with a fresh token, if etcd refused the old
            metadata = await self._metadata()
            call = self.leases.LeaseKeepAlive(timeout=self.timeout, metadata=metadata)
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                resp = await call.read()
                await call.done_writing()
            except grpc.aio.AioRpcError as exc:
                if attempt == 1 and metadata and token_rejected(exc):
                    self._drop_token(metadata)
                    continue
                await self._rotate(self._channel)
                raise Unavailable(f"etcd lease keep-alive failed: {exc.code().name}") from exc
            finally:
                call.cancel()
            break
        if resp is grpc.aio.EOF:
            raise Unavailable("etcd lease keep-alive stream closed")
        return int(resp.TTL)

    async def lease_revoke(self, lease_id: int) -> None:
        await self._call("LeaseRevoke", "leases", rpc.LeaseRevokeRequest(ID=lease_id))

    # -- watches ----------------------------------------------------------

    async def watch_prefix(
        self, prefix: bytes, start_revision: int
    ) -> AsyncIterator[list[WatchEvent] | Resync]:
        """Yield batches of events under ``prefix`` from ``start_revision`` on, forever.

        Reconnects with backoff when the stream breaks (etcd restart, network)
        and resumes from the revision after the last one delivered, so no event
        is lost or repeated. If that history was compacted, yields ``Resync``:
        the consumer re-lists and restarts the watch from the new revision.
        """
        next_rev = start_revision
        delay = 0.1
        end = prefix_end(prefix)
        while True:
            create = rpc.WatchCreateRequest(
                key=prefix, range_end=end, start_revision=next_rev, progress_notify=True
            )
            call: Any = None
            metadata = None
            try:
                # Each (re)connection authenticates anew if need be: etcd checks the
                # token when a watch is created (an expired one cancels it, below).
                metadata = await self._metadata()
                call = self.watches.Watch(metadata=metadata)
                await call.write(rpc.WatchRequest(create_request=create))
                while True:
                    resp = await call.read()
                    if resp is grpc.aio.EOF:
                        raise ConnectionError("watch stream ended")
                    if resp.compact_revision:
                        log.warning(
                            "etcd watch on %r: revision %d compacted (now %d); resyncing",
                            prefix, next_rev, resp.compact_revision,
                        )
                        yield Resync(resp.compact_revision)
                        return
                    if resp.canceled:
                        if metadata and ("permission denied" in resp.cancel_reason
                                         or "auth token" in resp.cancel_reason):
                            self._drop_token(metadata)  # expired: authenticate again
                        raise ConnectionError(f"watch canceled: {resp.cancel_reason}")
                    delay = 0.1
                    if resp.events:
                        batch = [
                            WatchEvent(
                                EventType(ev.type), ev.kv.key, ev.kv.value, ev.kv.mod_revision
                            )
                            for ev in resp.events
                        ]
                        next_rev = batch[-1].mod_revision + 1
                        yield batch
                    elif resp.header.revision >= next_rev:
                        # Progress notification: nothing under the prefix changed.
                        next_rev = resp.header.revision + 1
            except (grpc.aio.AioRpcError, ConnectionError, Unavailable) as exc:
                if isinstance(exc, grpc.aio.AioRpcError):
                    if metadata and token_rejected(exc):
                        self._drop_token(metadata)
                    detail = exc.code().name
                else:
                    detail = str(exc)
                log.info("etcd watch on %r interrupted (%s); resuming at %d", prefix, detail,
                         next_rev)
                await self._rotate(self._channel)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                if call is not None:
                    call.cancel()
