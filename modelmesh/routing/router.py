"""Where a request is served: here, at a copy elsewhere, or where placement loads it.

Every model-addressed call (inference, metadata, ensureLoaded) goes through
``Router.invoke``. The decisions are placement's (``route`` for a cache hit,
``place`` for a miss) over snapshots built from the etcd mirror and this
instance's live cache; this module only carries them out:

- loaded or loading here: served here (a load in progress is waited for);
- a copy elsewhere: the request's bytes are forwarded to it untouched, with the
  client's metadata, over a pooled channel;
- no copy anywhere: the instance placement picks is asked to load it
  (``mm-load-here``), and concurrent requests for the model share that load: the
  ingress remembers the target it chose, and the target's copy record, once
  published, makes every other instance route to the same load.

Loops are impossible: a forwarded request carries ``mm-hops``, and one that
arrives with ``mm-load-here`` or at the hop limit is served where it lands. A
peer that cannot be reached is excluded for a while and the request tries
another copy or a new placement; one that refuses (it is draining) is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from modelmesh.cache.local import CacheEntry, EntryState
from modelmesh.errors import (
    CapacityExceeded,
    MeshError,
    ModelLoadFailed,
    Rejected,
    Unavailable,
)
from modelmesh.registry.records import CopyState as RecordCopyState
from modelmesh.registry.records import ModelRecord
from modelmesh.routing.peers import PeerError, PeerPool
from placement import (
    ClusterSnapshot,
    CopySnapshot,
    CopyState,
    InstanceSnapshot,
    Memory,
    ModelSnapshot,
    get_policy,
)

if TYPE_CHECKING:
    from modelmesh.instance import MeshInstance

log = logging.getLogger(__name__)

INFER = "/inference.GRPCInferenceService/ModelInfer"
METADATA = "/inference.GRPCInferenceService/ModelMetadata"
ENSURE_LOADED = "/mmesh.ModelMesh/ensureLoaded"

#: Metadata keys the mesh sets between instances (never passed on from clients).
HOPS, LOAD_HERE, REJECT, INSTANCE = "mm-hops", "mm-load-here", "mm-reject", "mm-instance"
BALANCED, MODEL_ID, VMODEL_ID = "mm-balanced", "mm-model-id", "mm-vmodel-id"
_NOT_FORWARDED = frozenset({HOPS, LOAD_HERE, "user-agent", "content-type", "te", "host"})

#: Size assumed for a model nobody has loaded yet and that has no estimate.
DEFAULT_MODEL_BYTES = 1 << 20
#: How long an unreachable peer is left out of routing decisions (seconds).
SUSPECT_S = 5.0
#: Attempts (copies or placements) per request before giving up.
MAX_ATTEMPTS = 4

_COPY_STATES = {
    RecordCopyState.LOADING: CopyState.LOADING,
    RecordCopyState.LOADED: CopyState.LOADED,
    RecordCopyState.FAILED: CopyState.FAILED,
}


class PeerStatus(MeshError):
    """A peer's non-OK answer, passed on to the client with its code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class CallInfo:
    """What the router needs from one incoming call's metadata and deadline."""

    hops: int = 0
    load_here: bool = False
    balanced: bool = False
    model_id: str = ""  # mm-model-id
    vmodel_id: str = ""  # mm-vmodel-id
    metadata: list[tuple[str, str | bytes]] = field(default_factory=list)
    timeout: float | None = None

    @classmethod
    def from_context(cls, context: grpc.aio.ServicerContext) -> CallInfo:
        info = cls(timeout=context.time_remaining())
        for k, v in context.invocation_metadata() or ():
            if k == HOPS:
                try:
                    info.hops = int(v)
                except (TypeError, ValueError):
                    info.hops = 1
            elif k == LOAD_HERE:
                info.load_here = True
            elif k == BALANCED:
                info.balanced = str(v).strip().lower() in ("1", "true", "yes")
                info.metadata.append((k, v))
            elif k == MODEL_ID:
                info.model_id = str(v)
            elif k == VMODEL_ID:
                info.vmodel_id = str(v)
                info.metadata.append((k, v))
            elif k[0] != ":" and not k.startswith("grpc-") and k not in _NOT_FORWARDED:
                info.metadata.append((k, v))
        return info


class Router:
    def __init__(self, instance: MeshInstance) -> None:
        s = instance.settings
        self.instance = instance
        self.registry = instance.registry
        self.cache = instance.cache
        policy = instance.cache.policy
        self.policy = policy if policy is not None else get_policy(*s.placement[:1],
                                                                  **s.placement[1])
        self.max_hops = s.max_hops
        self.peers = PeerPool(s.max_message_bytes)
        self.outstanding: defaultdict[str, int] = defaultdict(int)  # calls in flight, by instance
        self._suspects: dict[str, float] = {}  # instance id -> monotonic time it is trusted again
        # cold model -> (target instance, bytes, monotonic deadline)
        self._pending: dict[str, tuple[str, int, float]] = {}
        self.last_removed: dict[str, float] = {}  # model -> wall time a copy was scaled down here
        self.copy_rates: dict[str, float] = {}  # model -> requests/s of the copy here (chores)

    @property
    def me(self) -> str:
        return self.instance.instance_id

    # -- the request path -----------------------------------------------------------

    async def invoke(
        self,
        method: str,
        raw: bytes,
        model_id: str,
        info: CallInfo,
        local: Callable[[ModelRecord], Awaitable[bytes]],
    ) -> bytes:
        """Serve ``raw`` (a serialized request for ``model_id``) here or on the right peer."""
        record = await self.registry.require_model(model_id)
        entry = self.cache.get(model_id)
        here = entry is not None and entry.state is not EntryState.FAILED
        if here and entry is not None and info.hops < self.max_hops and not info.balanced:
            target = self._shed_target(record, entry)
            if target is not None:
                answer = await self._forward_or_none(target, method, raw, info, model_id)
                if answer is not None:
                    return answer  # else serve it here after all
        if here or info.load_here or info.hops >= self.max_hops:
            if not here and self.instance.draining:
                raise Rejected(f"instance {self.me} is shutting down and loads nothing new")
            if not here and info.hops < self.max_hops:
                return await self._load_here(method, raw, record, info, local)
            return await self._local(local, record)
        tried: set[str] = set()
        last: PeerError | None = None
        for _ in range(MAX_ATTEMPTS):
            target, load = self.choose(record, frozenset(tried), balanced=info.balanced)
            if target is None:
                break
            if target == self.me:
                if load:
                    return await self._load_here(method, raw, record, info, local)
                return await self._local(local, record)
            try:
                return await self._forward(target, method, raw, info, load, model_id)
            except PeerError as exc:
                if exc.reached and REJECT not in exc.trailing:
                    raise PeerStatus(exc.code, exc.details) from None
                last = exc
                tried.add(target)
                if not exc.reached:
                    self.suspect(target)
                log.info("forward of %s to %s failed (%s); trying elsewhere",
                         model_id, target, exc)
        if last is not None:
            raise Unavailable(f"model '{model_id}': no instance could serve it ({last})")
        return await self._no_placement(record, local)

    def _shed_target(self, record: ModelRecord, entry: CacheEntry) -> str | None:
        """Another copy to take a request that the busy copy here would have to queue.

        A model with a copy here is served here, except when every inference thread
        is taken by it and another instance holds a copy too: then placement's
        route decision (fewest in flight) picks the copy, so the copies that scaling
        added for a hot model share the traffic that reaches this one.
        """
        if entry.in_use < self.instance.concurrency or entry.state is not EntryState.LOADED:
            return None
        copies = self.registry.copies.get(record.model_id)
        if not copies or not any(iid != self.me and c.state is RecordCopyState.LOADED
                                 for iid, c in copies.items()):
            return None
        excluded = self._excluded()
        target = self.policy.route(self.model_snapshot(record, excluded),
                                   self.cluster_snapshot(excluded))
        return target if target is not None and target != self.me else None

    async def _no_placement(
        self, record: ModelRecord, local: Callable[[ModelRecord], Awaitable[bytes]]
    ) -> bytes:
        """Placement found nowhere to load the model: say why, or load here as a last resort."""
        model = self.model_snapshot(record)
        failures = [c.error for c in self.registry.copies.get(record.model_id, {}).values()
                    if c.state is RecordCopyState.FAILED and c.error]
        if failures:
            raise ModelLoadFailed(record.model_id, failures[0])
        cluster = self.cluster_snapshot()
        if self._known_size(record) and \
                all(model.size_bytes > i.cpu.capacity_bytes for i in cluster.instances):
            raise CapacityExceeded(
                f"model '{record.model_id}' needs about {model.size_bytes} bytes, more than "
                "any instance's capacity"
            )
        if self.instance.draining:
            raise Unavailable(f"model '{record.model_id}': no instance can load it now")
        return await self._local(local, record)

    async def _load_here(self, method: str, raw: bytes, record: ModelRecord, info: CallInfo,
                         local: Callable[[ModelRecord], Awaitable[bytes]]) -> bytes:
        """Load a model that has no copy here, unless another instance got to it first.

        The claim is one etcd transaction that creates this instance's LOADING
        copy record only if the model has no copy record anywhere; so when
        several instances decide at once to load the same cold model, one loads
        and the others forward to it. Without etcd the load goes ahead here.
        """
        model_id = record.model_id
        try:
            existing = await asyncio.wait_for(
                self.registry.claim_copy(model_id, self.me, self.instance.lease), 2.0)
        except (MeshError, TimeoutError):
            existing = None
        if existing:
            live = self.registry.instances
            holders = sorted(
                (c.state is not RecordCopyState.LOADED, iid) for iid, c in existing.items()
                if iid != self.me and c.state is not RecordCopyState.FAILED and iid in live
                and not live[iid].shutting_down and iid not in self._excluded()
            )
            if holders:
                answer = await self._forward_or_none(holders[0][1], method, raw, info, model_id)
                if answer is not None:
                    return answer
        try:
            return await self._local(local, record)
        except MeshError:
            if existing is None and self.cache.get(model_id) is None:
                self.instance.spawn(self._unclaim(model_id), name=f"unclaim:{model_id}")
            raise

    async def _unclaim(self, model_id: str) -> None:
        try:
            await self.registry.delete_copy(model_id, self.me)
        except MeshError as exc:
            log.debug("could not remove the copy claim of %s: %s", model_id, exc)

    def _known_size(self, record: ModelRecord) -> int:
        """Bytes of the model as measured or estimated (0: nobody knows yet)."""
        size = record.size_estimate
        for c in self.registry.copies.get(record.model_id, {}).values():
            size = max(size, c.size_bytes)
        entry = self.cache.get(record.model_id)
        if entry is not None:
            size = max(size, entry.size)
        return size

    async def _local(
        self, local: Callable[[ModelRecord], Awaitable[bytes]], record: ModelRecord
    ) -> bytes:
        self.outstanding[self.me] += 1
        try:
            return await local(record)
        finally:
            self.outstanding[self.me] -= 1

    async def _forward(self, target: str, method: str, raw: bytes, info: CallInfo,
                       load: bool, model_id: str) -> bytes:
        rec = self.registry.instances.get(target)
        if rec is None:
            raise PeerError(grpc.StatusCode.UNAVAILABLE, f"instance {target} left the mesh",
                            (), reached=False)
        # The concrete model travels as mm-model-id: the peer serves exactly what was
        # resolved here, even if a vmodel changes target in between.
        metadata = [*info.metadata, (MODEL_ID, model_id), (HOPS, str(info.hops + 1))]
        if load:
            metadata.append((LOAD_HERE, "1"))
        self.outstanding[target] += 1
        metrics = self.instance.metrics
        start = time.perf_counter()
        code = "OK"
        try:
            return await self.peers.call(rec.endpoint, method, raw, metadata, info.timeout)
        except PeerError as exc:
            code = exc.code.name
            raise
        finally:
            self.outstanding[target] -= 1
            metrics.forwarded.labels(code).inc()
            metrics.forward_ms.observe((time.perf_counter() - start) * 1000)

    async def _forward_or_none(self, target: str, method: str, raw: bytes, info: CallInfo,
                               model_id: str) -> bytes | None:
        """Forward to a copy that should serve; None when it could not take the request.

        A peer that answered with an error passes it on to the client; one that could
        not be reached is left out for a while, and one that refused (shutting down)
        is not: in both cases the caller falls back to serving the request itself.
        """
        try:
            return await self._forward(target, method, raw, info, False, model_id)
        except PeerError as exc:
            if exc.reached and REJECT not in exc.trailing:
                raise PeerStatus(exc.code, exc.details) from None
            if not exc.reached:
                self.suspect(target)
            return None

    def suspect(self, instance_id: str) -> None:
        """Leave an unreachable instance out of decisions for a while."""
        self._suspects[instance_id] = time.monotonic() + SUSPECT_S
        for model_id, (target, _, _) in list(self._pending.items()):
            if target == instance_id:
                del self._pending[model_id]

    def _excluded(self, extra: frozenset[str] = frozenset()) -> frozenset[str]:
        if not self._suspects:
            return extra
        now = time.monotonic()
        for iid, until in list(self._suspects.items()):
            if until <= now:
                del self._suspects[iid]
        return extra | frozenset(self._suspects)

    # -- decisions ------------------------------------------------------------------

    def choose(self, record: ModelRecord, tried: frozenset[str] = frozenset(), *,
               balanced: bool = False) -> tuple[str | None, bool]:
        """(instance to send to, whether it should load) for a request not served here yet."""
        excluded = self._excluded(tried)
        model_id = record.model_id
        if not balanced:
            only = self._only_copy(model_id, excluded)
            if only is not None:
                return only, False
        cluster = self.cluster_snapshot(excluded)
        model = self.model_snapshot(record, excluded)
        at_max = bool(record.max_copies) and len(model.holders) >= record.max_copies
        if balanced and not at_max and self.me not in excluded and not self.instance.draining:
            local = cluster.instance(self.me)
            if local is not None and model.size_bytes <= local.cpu.capacity_bytes:
                return self.me, True
        target = self.policy.route(model, cluster)
        if target is not None:
            return target, False
        pending = self._pending.get(model_id)
        if pending is not None:
            target, _, until = pending
            if until > time.monotonic() and target not in excluded \
                    and cluster.instance(target) is not None:
                return target, True
            del self._pending[model_id]
        # Placement's tie-breaks are salted with the time: a coarse time makes every
        # ingress that sees the same cluster pick the same instance for a cold model.
        coarse = ClusterSnapshot(cluster.instances, now=math.floor(cluster.now / 30) * 30)
        target = self.policy.place(model, coarse, excluded)
        if target is not None and target != self.me:
            self._pending[model_id] = (target, model.size_bytes, time.monotonic() + 10.0)
        return target, True

    def _only_copy(self, model_id: str, excluded: frozenset[str]) -> str | None:
        """The instance of a model's single usable copy, when that is all there is.

        Every route decision sends such a request to that copy; finding it without
        building the cluster and model snapshots keeps the most common forwarding
        case (one copy, elsewhere) cheap.
        """
        copies = self.registry.copies.get(model_id)
        if not copies or len(copies) != 1 or self.cache.get(model_id) is not None:
            return None
        ((iid, copy),) = copies.items()
        if copy.state is not RecordCopyState.LOADED or iid == self.me or iid in excluded:
            return None
        rec = self.registry.instances.get(iid)
        return iid if rec is not None and not rec.shutting_down else None

    def placed(self, model_id: str) -> None:
        """A copy of ``model_id`` appeared: its pending placement is no longer needed."""
        self._pending.pop(model_id, None)

    # -- snapshots --------------------------------------------------------------------

    def local_snapshot(self) -> InstanceSnapshot:
        s = self.instance.settings
        mem = self.cache.memory()
        return InstanceSnapshot(
            instance_id=self.me,
            cpu=Memory(self.cache.capacity_bytes, self.cache.used_bytes, mem.pinned_bytes,
                       mem.lru_time, mem.min_priority),
            model_count=self.cache.loaded_count,
            loading=self.cache.loading_count,
            loading_slots=s.max_concurrent_loads,
            in_flight=self.outstanding[self.me],
            concurrency=self.instance.concurrency,
            request_rate=self.instance.request_rate(),
            labels=frozenset(f"{k}={v}" for k, v in s.labels.items()),
            shutting_down=self.instance.draining,
        )

    def cluster_snapshot(self, excluded: frozenset[str] = frozenset()) -> ClusterSnapshot:
        pending: defaultdict[str, int] = defaultdict(int)
        for model_id, (target, size, _) in self._pending.items():
            if target not in self.registry.copies.get(model_id, {}):
                pending[target] += size
        instances = []
        have_me = False
        for rec in self.registry.instances.values():
            iid = rec.instance_id
            if iid in excluded:
                continue
            if iid == self.me:
                instances.append(self.local_snapshot())
                have_me = True
                continue
            instances.append(InstanceSnapshot(
                instance_id=iid,
                cpu=Memory(rec.capacity_bytes, rec.used_bytes + pending[iid],
                           rec.pinned_bytes,
                           rec.lru_time_ms / 1000 if rec.lru_time_ms else None,
                           rec.min_priority),
                model_count=rec.model_count,
                loading=rec.loading_count,
                loading_slots=max(rec.loading_slots, 1),
                in_flight=self.outstanding[iid],
                concurrency=max(rec.concurrency, 1),
                request_rate=rec.requests_per_minute / 60.0,
                labels=frozenset(f"{k}={v}" for k, v in rec.labels.items()),
                shutting_down=rec.shutting_down,
            ))
        if not have_me and self.me and self.me not in excluded:
            instances.append(self.local_snapshot())  # our record is not (yet) in etcd
        return ClusterSnapshot(tuple(instances), now=time.time())

    def model_snapshot(self, record: ModelRecord,
                       excluded: frozenset[str] = frozenset()) -> ModelSnapshot:
        model_id = record.model_id
        copies: list[CopySnapshot] = []
        failed: set[str] = set()
        size = 0
        for iid, c in self.registry.copies.get(model_id, {}).items():
            if iid == self.me:
                continue  # the live cache below is fresher
            if c.state is RecordCopyState.FAILED:
                failed.add(iid)
            size = max(size, c.size_bytes)
            if iid in excluded:
                continue
            copies.append(CopySnapshot(
                iid, _COPY_STATES[c.state], since=c.updated_ms / 1000,
                in_flight=self.outstanding[iid], request_rate=c.request_rate,
            ))
        entry = self.cache.get(model_id)
        if entry is not None:
            if entry.state is EntryState.FAILED:
                failed.add(self.me)
            else:
                copies.append(CopySnapshot(
                    self.me,
                    CopyState.LOADED if entry.state is EntryState.LOADED else CopyState.LOADING,
                    since=entry.loaded_at, in_flight=entry.in_use,
                    request_rate=self.copy_rates.get(model_id, 0.0),
                ))
                size = max(size, entry.size)
        usage = self.cache.usage.get(model_id)
        stats = self.instance.dataplane.stats.get(model_id)
        service = 0.01
        if stats is not None and stats.compute_infer.count:
            service = stats.compute_infer.ns / stats.compute_infer.count / 1e9
        if not size:
            size = record.size_estimate or min(
                DEFAULT_MODEL_BYTES, self.cache.capacity_bytes // 8 or 1)
        return ModelSnapshot(
            model_id=model_id,
            size_bytes=size,
            copies=tuple(copies),
            last_used=usage.last_used if usage else None,
            request_rate=usage.rate if usage else 0.0,
            failed_on=frozenset(failed),
            service_seconds=service,
            last_removed=self.last_removed.get(model_id),
        )

    # -- loading elsewhere ----------------------------------------------------------------

    async def load_on(self, target: str, model_id: str, sync: bool = False,
                      timeout: float | None = None) -> None:
        """Ask ``target`` (may be this instance) to load a copy of ``model_id``."""
        if target == self.me:
            record = await self.registry.require_model(model_id)
            if sync:
                entry = await self.instance.dataplane.acquire(record)
                self.cache.release(entry)
            else:
                self.cache.ensure_loading(record)
            return
        from modelmesh._proto.mmesh import model_mesh_pb2 as mm

        rec = self.registry.instances.get(target)
        if rec is None:
            raise Unavailable(f"instance {target} left the mesh")
        request = mm.EnsureLoadedRequest(modelId=model_id, sync=sync).SerializeToString()
        try:
            await self.peers.call(rec.endpoint, ENSURE_LOADED, request,
                                  [(LOAD_HERE, "1"), (HOPS, "1")], timeout)
        except PeerError as exc:
            if not exc.reached:
                self.suspect(target)
            raise PeerStatus(exc.code, exc.details) from None

    async def close(self) -> None:
        await self.peers.close()


def trailing_metadata(instance_id: str, reject: bool = False) -> Sequence[tuple[str, str]]:
    """Trailing metadata on every error an instance returns (tells a forwarder it was reached)."""
    md = [(INSTANCE, instance_id)]
    if reject:
        md.append((REJECT, "1"))
    return md
