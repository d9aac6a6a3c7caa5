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
from collections.abc import Awaitable, Callable

from modelmesh._proto.mmesh import model_mesh_pb2 as mm
from modelmesh.cache.local import CacheEntry, ModelCache
from modelmesh.dataplane import DataPlane
from modelmesh.errors import (
    CapacityExceeded,
    Code,
    MeshError,
    ModelLoadFailed,
    Rejected,
    Unavailable,
    UpstreamError,
)
from modelmesh.headers import (
    ENSURE_LOADED,
    HOPS,
    LOAD_HERE,
    MODEL_ID,
    REJECT,
    CallInfo,
    id_header,
)
from modelmesh.metrics import Metrics
from modelmesh.node import Node, Spawn
from modelmesh.registry.records import CopyState, ModelRecord
from modelmesh.registry.store import INSTANCES, Change, Registry
from modelmesh.routing.peers import PeerError, PeerPool
from modelmesh.view import MeshView
from placement import ClusterSnapshot, Policy

log = logging.getLogger(__name__)

#: How long an unreachable peer is left out of routing decisions (seconds).
SUSPECT_S = 5.0
#: Attempts (copies or placements) per request before giving up.
MAX_ATTEMPTS = 4

Local = Callable[[ModelRecord], Awaitable[bytes]]


def _passed_on(exc: PeerError) -> UpstreamError:
    """A peer's own error answer, for the client."""
    return UpstreamError(exc.code, exc.details)


class Router:
    """The request path of one instance (see the module docstring)."""

    def __init__(self, node: Node, registry: Registry, cache: ModelCache, dataplane: DataPlane,
                 view: MeshView, policy: Policy, peers: PeerPool, metrics: Metrics,
                 spawn: Spawn, *, max_hops: int) -> None:
        self.node = node
        self.registry = registry
        self.cache = cache
        self.dataplane = dataplane
        self.view = view
        self.policy = policy
        self.peers = peers
        self.metrics = metrics
        self.spawn = spawn
        self.max_hops = max_hops
        self._suspects: dict[str, float] = {}  # instance id -> monotonic time it is trusted again

    @property
    def me(self) -> str:
        return self.node.instance_id

    def on_registry_change(self, change: Change) -> None:
        """Registry listener: close the channel to an instance that left the mesh."""
        if change.table == INSTANCES and change.new is None and change.old is not None \
                and change.key != self.me:
            self.spawn(self.peers.forget(change.old.endpoint), "peer-forget")

    # -- the request path -----------------------------------------------------------

    async def invoke(
        self,
        method: str,
        raw: bytes,
        model_id: str,
        info: CallInfo,
        local: Local,
    ) -> bytes:
        """Serve ``raw`` (a serialized request for ``model_id``) here or on the right peer."""
        # The mirror first, as require_model does, without a coroutine per request.
        record = self.registry.models.get(model_id) or await self.registry.require_model(model_id)
        entry = self.cache.get(model_id)
        here = entry is not None and entry.state is not CopyState.FAILED
        if here and entry is not None and info.hops < self.max_hops and not info.balanced:
            target = self._shed_target(record, entry)
            if target is not None:
                answer = await self._forward_or_none(target, method, raw, info, model_id)
                if answer is not None:
                    return answer  # else serve it here after all
        if here or info.load_here or info.hops >= self.max_hops:
            if not here and self.node.draining:
                raise Rejected(f"instance {self.me} is shutting down and loads nothing new")
            if not here and info.hops < self.max_hops:
                return await self._load_here(method, raw, record, info, local)
            return await self._local(local, record)
        if not self.node.draining and self._alone():  # nowhere else to put it: no choice
            return await self._load_here(method, raw, record, info, local)
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
                    raise _passed_on(exc) from None
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
        if entry.in_use < self.node.concurrency or entry.state is not CopyState.LOADED:
            return None
        copies = self.registry.copies.get(record.model_id)
        if not copies or not any(iid != self.me and c.state is CopyState.LOADED
                                 for iid, c in copies.items()):
            return None
        excluded = self._excluded()
        target = self.policy.route(self.view.model_snapshot(record, excluded),
                                   self.view.cluster_snapshot(excluded))
        return target if target is not None and target != self.me else None

    async def _no_placement(self, record: ModelRecord, local: Local) -> bytes:
        """Placement found nowhere to load the model: say why, or load here as a last resort."""
        model = self.view.model_snapshot(record)
        cluster = self.view.cluster_snapshot()
        if self.view.known_size(record) and \
                all(model.size_bytes > i.cpu.capacity_bytes for i in cluster.instances):
            # Before the load failures: "too big" is the reason those loads failed.
            raise CapacityExceeded(
                f"model '{record.model_id}' needs about {model.size_bytes} bytes, more than "
                "any instance's capacity"
            )
        failures = self.view.failures(record.model_id)
        if failures:
            raise ModelLoadFailed(record.model_id, failures[0])
        if self.node.draining:
            raise Unavailable(f"model '{record.model_id}': no instance can load it now")
        return await self._local(local, record)

    async def _load_here(self, method: str, raw: bytes, record: ModelRecord, info: CallInfo,
                         local: Local) -> bytes:
        """Load a model that has no copy here, unless another instance got to it first.

        The claim is one etcd transaction that creates this instance's LOADING
        copy record only if the model has no copy record anywhere; so when
        several instances decide at once to load the same cold model, one loads
        and the others forward to it. Without etcd the load goes ahead here.
        """
        model_id = record.model_id
        claimed = not self._alone()
        existing = None
        if claimed:
            try:
                existing = await asyncio.wait_for(
                    self.registry.claim_copy(model_id, self.me, self.node.lease), 2.0)
            except (MeshError, TimeoutError):
                existing = None
        if existing:
            excluded = self._excluded()
            holders = sorted(
                (state is not CopyState.LOADED, iid)
                for iid, state in self.view.copy_states(model_id, existing).items()
                if iid != self.me and state is not CopyState.FAILED and iid not in excluded
            )
            if holders:
                answer = await self._forward_or_none(holders[0][1], method, raw, info, model_id)
                if answer is not None:
                    return answer
        try:
            return await self._local(local, record)
        except MeshError:
            if claimed and existing is None and self.cache.get(model_id) is None:
                self.spawn(self._unclaim(model_id), f"unclaim:{model_id}")
            raise

    def _alone(self) -> bool:
        """Whether no other instance is in the mesh: then no claim can be contested.

        The claim is an etcd write on the cold request's path; an instance on its
        own skips it (its copy record is published by the load's events instead).
        One that joins meanwhile at worst loads the same model once more.
        """
        me = self.me
        return all(iid == me for iid in self.registry.instances)

    async def _unclaim(self, model_id: str) -> None:
        try:
            await self.registry.delete_copy(model_id, self.me)
        except MeshError as exc:
            log.debug("could not remove the copy claim of %s: %s", model_id, exc)

    async def _local(self, local: Local, record: ModelRecord) -> bytes:
        in_flight = self.node.in_flight
        me = self.me
        in_flight[me] += 1
        try:
            return await local(record)
        finally:
            in_flight[me] -= 1

    async def _forward(self, target: str, method: str, raw: bytes, info: CallInfo,
                       load: bool, model_id: str) -> bytes:
        rec = self.registry.instances.get(target)
        if rec is None:
            raise PeerError(Code.UNAVAILABLE, f"instance {target} left the mesh",
                            (), reached=False)
        # The concrete model travels as mm-model-id: the peer serves exactly what was
        # resolved here, even if a vmodel changes target in between.
        metadata = [*info.metadata, id_header(MODEL_ID, model_id), (HOPS, str(info.hops + 1))]
        if load:
            metadata.append((LOAD_HERE, "1"))
        in_flight = self.node.in_flight
        in_flight[target] += 1
        metrics = self.metrics
        start = time.perf_counter()
        code = "OK"
        try:
            return await self.peers.call(rec.endpoint, method, raw, metadata, info.timeout,
                                         model_id)
        except PeerError as exc:
            code = exc.code.name
            raise
        finally:
            in_flight[target] -= 1
            metrics.labelled("forwarded", code).inc()
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
                raise _passed_on(exc) from None
            if not exc.reached:
                self.suspect(target)
            return None

    def suspect(self, instance_id: str) -> None:
        """Leave an unreachable instance out of decisions for a while."""
        self._suspects[instance_id] = time.monotonic() + SUSPECT_S
        self.view.pending.drop_target(instance_id)

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
            only = self.view.only_copy(model_id, excluded)
            if only is not None:
                return only, False
        cluster = self.view.cluster_snapshot(excluded)
        model = self.view.model_snapshot(record, excluded)
        at_max = bool(record.max_copies) and len(model.holders) >= record.max_copies
        if balanced and not at_max and self.me not in excluded and not self.node.draining:
            local = cluster.instance(self.me)
            if local is not None and model.size_bytes <= local.cpu.capacity_bytes:
                return self.me, True
        target = self.policy.route(model, cluster)
        if target is not None:
            return target, False
        pending = self.view.pending.get(model_id)
        if pending is not None:
            target, _, until = pending
            if until > time.monotonic() and target not in excluded \
                    and cluster.instance(target) is not None:
                return target, True
            self.view.pending.drop(model_id)
        # Placement's tie-breaks are salted with the time: a coarse time makes every
        # ingress that sees the same cluster pick the same instance for a cold model.
        coarse = ClusterSnapshot(cluster.instances, now=math.floor(cluster.now / 30) * 30)
        target = self.policy.place(model, coarse, excluded)
        if target is not None and target != self.me:
            self.view.pending.add(model_id, target, model.size_bytes, time.monotonic() + 10.0)
        return target, True

    # -- loading elsewhere ----------------------------------------------------------------

    async def load_on(self, target: str, model_id: str, sync: bool = False,
                      timeout: float | None = None) -> None:
        """Ask ``target`` (may be this instance) to load a copy of ``model_id``."""
        if target == self.me:
            record = await self.registry.require_model(model_id)
            if sync:
                entry = await self.dataplane.acquire(record)
                self.cache.release(entry)
            else:
                self.cache.ensure_loading(record)
            return
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
            raise _passed_on(exc) from None

    async def close(self) -> None:
        await self.peers.close()

