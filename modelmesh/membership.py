"""This instance's presence in etcd: its lease, its instance record, its copy records.

- The lease (``--lease-ttl``) is kept alive; when it expires anyway (etcd was
  unreachable for longer) a new one is granted and everything republished.
- The instance record (capacity, used bytes, load, shutting down) is bound to
  the lease and republished when it changes, coalesced briefly under churn
  since placement elsewhere reads used bytes from it.
- Copy records follow the cache's events (loading, loaded, failed, unloaded),
  are bound to the lease and written by one publisher task, so a dead
  instance's copies vanish with its lease. The publisher gathers what changed
  for 20 ms and writes it in one transaction: a load and the evictions that made
  room for it are one etcd write, not three, and a quick load's LOADING and
  LOADED states are one. Under sustained churn writes are at least
  ``BUSY_GAP_S`` apart (so one carries many loads; each etcd write costs etcd
  about a millisecond of CPU), while a change after a quiet spell still goes out
  within 20 ms. The instance record is paced the same way.
- A model's measured size and its use at eviction are written back to the
  model record (placement elsewhere values unloaded models by them), gathered
  for up to ``USE_GATHER_S`` and written together; nothing on a request's or a
  load's path waits for etcd.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping

from modelmesh import __version__
from modelmesh.cache.local import CacheEvent, EventKind, ModelCache, UnloadReason
from modelmesh.errors import MeshError, Unavailable
from modelmesh.metrics import Metrics
from modelmesh.node import Node, Spawn
from modelmesh.registry.etcd import EtcdClient
from modelmesh.registry.records import CopyRecord, CopyState, InstanceRecord, Use
from modelmesh.registry.store import MAX_TXN_OPS, Registry, now_ms

log = logging.getLogger(__name__)

#: The instance record is refreshed at least this often (load figures drift).
INSTANCE_REFRESH_S = 5.0
#: How long the copy publisher (and the instance record) gathers changes before one write.
COPY_GATHER_S = 0.02
#: Under sustained change, the shortest gap between two writes of either kind.
BUSY_GAP_S = 0.1
#: How long uses and sizes to write back are gathered (placement elsewhere reads
#: them only for models that are not loaded: they need not be fresh).
USE_GATHER_S = 1.0


class Membership:
    """Publishes what etcd must know about this instance. ``start`` once the port is known."""

    def __init__(self, node: Node, registry: Registry, client: EtcdClient, cache: ModelCache,
                 metrics: Metrics, spawn: Spawn, *, lease_ttl: float, loading_slots: int,
                 labels: Mapping[str, str], request_rate: Callable[[], float]) -> None:
        self.node = node
        self.registry = registry
        self.client = client
        self.cache = cache
        self.metrics = metrics
        self.spawn = spawn
        self.lease_ttl = max(int(lease_ttl), 2)
        self.loading_slots = loading_slots
        self.labels = dict(labels)
        self.request_rate = request_rate
        self.endpoint = ""
        self._copies: dict[str, CopyRecord | None] = {}  # desired copy records, by model
        self._dirty: set[str] = set()
        self._publish = asyncio.Event()
        self._uses: dict[str, Use] = {}  # to write back into model records
        self._uses_due = asyncio.Event()
        self._instance_dirty = asyncio.Event()
        self._started_ms = now_ms()
        self._cache_seq = 0  # cache events seen; copy and instance records carry it

    async def start(self, endpoint: str) -> None:
        """Take a lease, publish the instance record, and keep both up to date."""
        self.endpoint = endpoint
        self.node.lease = await self.client.lease_grant(self.lease_ttl)
        await self.publish_instance()
        self.spawn(self._keepalive(), "lease-keepalive")
        self.spawn(self._publish_copies(), "copy-publisher")
        self.spawn(self._write_uses(), "use-writer")
        self.spawn(self._refresh_instance(), "instance-refresh")

    async def leave(self, timeout: float = 3.0) -> None:
        """Revoke the lease: drops the instance record and copies at once (else they expire)."""
        if not self.node.lease:
            return
        try:
            await asyncio.wait_for(self.client.lease_revoke(self.node.lease), timeout)
        except (MeshError, TimeoutError) as exc:
            log.warning("could not revoke lease on shutdown: %s", exc or "timed out")

    # -- the instance record -----------------------------------------------------------

    def instance_record(self) -> InstanceRecord:
        mem = self.cache.memory()
        node = self.node
        return InstanceRecord(
            instance_id=node.instance_id, endpoint=self.endpoint,
            capacity_bytes=self.cache.capacity_bytes, used_bytes=self.cache.used_bytes,
            model_count=self.cache.loaded_count, loading_count=self.cache.loading_count,
            loading_slots=self.loading_slots, concurrency=node.concurrency,
            pinned_bytes=mem.pinned_bytes,
            min_priority=round(mem.min_priority, 6) if mem.min_priority is not None else None,
            lru_time_ms=int(mem.lru_time * 1000) if mem.lru_time else 0,
            requests_per_minute=round(self.request_rate() * 60, 1),
            in_flight=node.in_flight[node.instance_id],
            labels=self.labels, shutting_down=node.draining or node.stopping,
            version=__version__, started_ms=self._started_ms, cache_seq=self._cache_seq,
        )

    async def publish_instance(self) -> None:
        """Write the instance record now."""
        await self.registry.put_instance(self.instance_record(), self.node.lease)

    async def _refresh_instance(self) -> None:
        last: InstanceRecord | None = None
        written = 0.0  # monotonic time of the last write
        while True:
            try:
                await asyncio.wait_for(self._instance_dirty.wait(), INSTANCE_REFRESH_S)
            except TimeoutError:
                pass
            # Under churn every load and eviction marks the record dirty: coalesce
            # bursts, but briefly, since placement elsewhere reads used bytes from it.
            await _paced(written)
            self._instance_dirty.clear()
            rec = self.instance_record()
            self.metrics.registered_models.set(len(self.registry.models))
            lru = self.cache.lru_time()
            self.metrics.lru_age_seconds.set(time.monotonic() - lru if lru else 0)
            if last is not None and rec == last:
                continue
            written = time.monotonic()
            try:
                await self.registry.put_instance(rec, self.node.lease)
                last = rec
            except Unavailable:
                await asyncio.sleep(1.0)

    async def _keepalive(self) -> None:
        """Keep the lease alive; after losing it (etcd down too long) re-create and republish."""
        interval = max(self.lease_ttl / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
            try:
                ttl = await self.client.lease_keepalive_once(self.node.lease)
                if ttl > 0:
                    continue
                log.warning("etcd lease %x expired; re-registering this instance", self.node.lease)
                self.node.lease = await self.client.lease_grant(self.lease_ttl)
                await self.publish_instance()
                for model_id in list(self._copies):
                    self._dirty.add(model_id)
                self._publish.set()
            except Unavailable as exc:
                log.debug("lease keep-alive: %s", exc)

    # -- copy records ------------------------------------------------------------------

    def on_cache_event(self, ev: CacheEvent) -> None:
        """The cache changed: update this instance's copy record of the model."""
        me = self.node.instance_id
        self._cache_seq = seq = self._cache_seq + 1
        rec: CopyRecord | None
        if ev.kind is EventKind.LOADING:
            rec = CopyRecord(ev.model_id, me, CopyState.LOADING, updated_ms=now_ms(),
                             cache_seq=seq)
        elif ev.kind is EventKind.LOADED:
            rec = CopyRecord(ev.model_id, me, CopyState.LOADED, ev.size_bytes, int(ev.load_ms),
                             updated_ms=now_ms(), cache_seq=seq)
            known = self.registry.models.get(ev.model_id)
            if known is not None and abs(known.size_estimate - ev.size_bytes) > \
                    0.1 * ev.size_bytes:
                self._record_use(ev.model_id, Use(size_bytes=ev.size_bytes))
        elif ev.kind is EventKind.FAILED:
            rec = CopyRecord(ev.model_id, me, CopyState.FAILED, ev.size_bytes, error=ev.error,
                             updated_ms=now_ms(), cache_seq=seq)
            if ev.size_bytes:  # measured, then found too big: every instance should know
                self._record_use(ev.model_id, Use(size_bytes=ev.size_bytes))
        else:
            rec = None
            usage = self.cache.usage.get(ev.model_id)
            if ev.reason is UnloadReason.EVICTED and usage is not None and usage.last_used:
                self._record_use(ev.model_id, Use(int(usage.last_used * 1000), usage.rate))
        self._copies[ev.model_id] = rec
        self._dirty.add(ev.model_id)
        self._publish.set()
        self._instance_dirty.set()

    def republish_copy(self, model_id: str, request_rate: float) -> None:
        """Publish the copy record again with a new request rate."""
        rec = self._copies.get(model_id)
        if rec is None:
            return
        self._copies[model_id] = dataclasses.replace(rec, request_rate=round(request_rate, 3))
        self._dirty.add(model_id)
        self._publish.set()

    def _record_use(self, model_id: str, use: Use) -> None:
        """Write ``use`` back into the model's record soon (merged with one not yet written)."""
        pending = self._uses.get(model_id)
        self._uses[model_id] = use if pending is None else pending.merged(use)
        self._uses_due.set()

    async def _write_uses(self) -> None:
        while True:
            await self._uses_due.wait()
            await asyncio.sleep(USE_GATHER_S)
            self._uses_due.clear()
            while self._uses:
                batch = dict(list(self._uses.items())[:MAX_TXN_OPS])
                for model_id in batch:
                    del self._uses[model_id]
                try:
                    await self.registry.record_uses(batch)
                except MeshError as exc:  # placement's figures only: not worth a retry
                    log.debug("could not record the use of %d models: %s", len(batch), exc)

    async def _publish_copies(self) -> None:
        me = self.node.instance_id
        written = 0.0  # monotonic time of the last write
        while True:
            await self._publish.wait()
            await _paced(written)  # a burst of events becomes one write
            self._publish.clear()
            written = time.monotonic()
            while self._dirty:
                batch = [self._dirty.pop() for _ in range(min(len(self._dirty), MAX_TXN_OPS))]
                puts, deletes = [], []
                for model_id in batch:
                    rec = self._copies.get(model_id)
                    if rec is None:
                        self._copies.pop(model_id, None)
                        deletes.append(model_id)
                    else:
                        puts.append(rec)
                try:
                    await self.registry.write_copies(me, puts, deletes, self.node.lease)
                except Unavailable:
                    self._dirty.update(batch)
                    await asyncio.sleep(0.5)


async def _paced(written: float) -> None:
    """Wait until ``COPY_GATHER_S`` from now and ``BUSY_GAP_S`` after ``written``."""
    await asyncio.sleep(max(COPY_GATHER_S, written + BUSY_GAP_S - time.monotonic()))
