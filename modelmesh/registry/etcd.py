"""A small asyncio etcd v3 client: KV, transactions, leases and resumable watches.

It speaks etcd's gRPC API through the protobuf stubs that ship in ``aetcd``
(``aetcd.rpc``), but manages the channel, retries and watch streams itself:
aetcd's own watch iterator ends for good when the connection drops, while the
mesh needs a watch that survives an etcd restart and resumes from the last
revision it saw (``watch_prefix``).
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
    runs out, then raises ``modelmesh.errors.Unavailable``.
    """

    def __init__(self, endpoints: Sequence[str], timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._index = 0
        self._channel: grpc.aio.Channel | None = None
        self._open(0)

    def _open(self, index: int) -> None:
        self._index = index % len(self.endpoints)
        target = self.endpoints[self._index]
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.max_send_message_length", _MAX_MESSAGE),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
                # Reconnect quickly after an etcd restart.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self.kv = rpc.KVStub(self._channel)
        self.leases = rpc.LeaseStub(self._channel)
        self.watches = rpc.WatchStub(self._channel)
        self.maintenance = rpc.MaintenanceStub(self._channel)

    async def _rotate(self, failed: grpc.aio.Channel | None) -> None:
        if len(self.endpoints) == 1 or failed is not self._channel:
            return
        old = self._channel
        self._open(self._index + 1)
        log.info("etcd: switching to endpoint %s", self.endpoints[self._index])
        if old is not None:
            await old.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _call(self, method: str, stub_attr: str, request: object) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        delay = 0.05
        while True:
            channel = self._channel
            stub = getattr(self, stub_attr)
            remaining = deadline - loop.time()
            try:
                return await getattr(stub, method)(request, timeout=max(remaining, 0.05))
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
                retryable = exc.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
                if not retryable or loop.time() + delay >= deadline:
                    raise Unavailable(
                        f"etcd {method} failed: {exc.code().name}: {exc.details()}"
                    ) from exc
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
        call = self.leases.LeaseKeepAlive(timeout=self.timeout)
        try:
            await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
            resp = await call.read()
            await call.done_writing()
        except grpc.aio.AioRpcError as exc:
            await self._rotate(self._channel)
            raise Unavailable(f"etcd lease keep-alive failed: {exc.code().name}") from exc
        finally:
            call.cancel()
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
            call = self.watches.Watch()
            try:
                await call.write(rpc.WatchRequest(create_request=create))
                while True:
                    resp = await call.read()
                    if resp is grpc.aio.EOF:
                        raise ConnectionError("watch stream ended")
                    delay = 0.1
                    if resp.compact_revision:
                        log.warning(
                            "etcd watch on %r: revision %d compacted (now %d); resyncing",
                            prefix, next_rev, resp.compact_revision,
                        )
                        yield Resync(resp.compact_revision)
                        return
                    if resp.canceled:
                        raise ConnectionError(f"watch canceled: {resp.cancel_reason}")
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
            except (grpc.aio.AioRpcError, ConnectionError) as exc:
                detail = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.info("etcd watch on %r interrupted (%s); resuming at %d", prefix, detail,
                         next_rev)
                await self._rotate(self._channel)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                call.cancel()
