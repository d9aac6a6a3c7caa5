"""Concurrent create-if-absent writes to etcd, grouped into one transaction (group commit)."""

from __future__ import annotations

import asyncio
import itertools

from modelmesh.errors import Unavailable
from modelmesh.registry import etcd as e


class CreateBatcher:
    """Coalesces concurrent create-if-absent writes into one etcd transaction.

    Why: a client registering models one ``registerModel`` RPC each, with many in
    flight, would otherwise cost one etcd transaction per model: a round trip, a
    raft entry, and a gRPC client call that was a third of the mesh's CPU per
    registration (benchmarks/registry.py: 1.0 ms before, 0.65 ms after, and
    etcd's CPU per registration fell from 0.38 to 0.2 ms). Writes that arrive
    while a transaction is in flight go out together in the next one (group
    commit), so a lone write still goes out at once and a busy writer gets
    batches without waiting on a timer.

    A batch is all-or-nothing (one compare per key): when any key exists, the
    transaction writes nothing and says which keys exist; their callers get ``0``
    and take their own compare-and-set path (which tells "same model" from
    "conflict"), the others go out in the next transaction.
    """

    def __init__(self, client: e.EtcdClient, max_batch: int = 100) -> None:
        self.client = client
        self.max_batch = min(max_batch, e.MAX_TXN_OPS)
        self._pending: dict[bytes, tuple[bytes, asyncio.Future[int]]] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def create(self, key: bytes, value: bytes) -> int:
        """Put ``key`` if it does not exist; the revision written, or 0 if it was not."""
        if key in self._pending:  # the same key twice in one transaction is refused
            return 0
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[key] = (value, fut)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush(), name="registry-create-batch")
        return await fut

    async def _flush(self) -> None:
        batch: list[tuple[bytes, bytes, asyncio.Future[int]]] = []
        try:
            while self._pending:
                keys = list(itertools.islice(self._pending, self.max_batch))
                batch = [(k, *self._pending.pop(k)) for k in keys]
                try:
                    resp = await self.client.txn(
                        [e.cmp_version(k, "==", 0) for k, _, _ in batch],
                        [e.op_put(k, v) for k, v, _ in batch],
                        [e.op_get(k, count_only=True) for k, _, _ in batch],
                    )
                except Exception as exc:  # each caller gets the failure (e.g. Unavailable)
                    _settle(batch, exc)
                    continue
                if resp.succeeded:
                    _settle(batch, int(resp.header.revision))
                    continue
                # Some keys exist: their callers take the slow path, the rest go again.
                for (k, v, fut), r in zip(batch, resp.responses, strict=True):
                    if r.response_range.count or k in self._pending or fut.done():
                        _settle([(k, v, fut)], 0)
                    else:
                        self._pending[k] = (v, fut)
                batch = []
        finally:  # cancelled (the instance stops): nobody may wait forever
            stopped = Unavailable("registry write interrupted; retry")
            _settle(batch, stopped)
            _settle([(k, *self._pending.pop(k)) for k in list(self._pending)], stopped)


def _settle(batch: list[tuple[bytes, bytes, asyncio.Future[int]]],
            outcome: int | Exception) -> None:
    """Give every still-waiting caller in ``batch`` its revision or its exception."""
    for _, _, fut in batch:
        if fut.done():
            continue
        if isinstance(outcome, Exception):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)
