"""What this instance knows of the mesh, read-only: the etcd mirror plus its own cache.

Everything that asks "where are the copies of this model, and in what state?"
or needs placement's snapshots asks here, so each answer is written once:

- ``copy_states`` / ``live_copies``: copies on live instances that are not
  shutting down (this instance's own from its cache, which is fresher than its
  records in etcd);
- ``model_status``: ModelMesh's status of a model across the mesh;
- ``local_snapshot`` / ``cluster_snapshot`` / ``model_snapshot``: placement's
  inputs.

It writes nothing to etcd or the cache. Two small tables of local knowledge
live here because the snapshots read them: ``pending`` (cold models this
instance sent to be loaded elsewhere, written by the router) and
``copy_rates`` / ``last_removed`` (written by scaling).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum

from modelmesh.cache.local import ModelCache
from modelmesh.dataplane import DataPlane
from modelmesh.node import Node
from modelmesh.registry.records import CopyRecord, CopyState, InstanceRecord, ModelRecord
from modelmesh.registry.store import Registry, now_ms
from placement import ClusterSnapshot, CopySnapshot, InstanceSnapshot, Memory, ModelSnapshot

#: Size assumed for a model nobody has loaded yet and that has no estimate.
DEFAULT_MODEL_BYTES = 1 << 20

#: Copies that exist or are on their way (not failed).
USABLE = (CopyState.LOADING, CopyState.LOADED)


class Status(StrEnum):
    """A model's (or one copy's) status, named as ModelMesh's ModelStatusInfo names them."""

    NOT_FOUND = "NOT_FOUND"
    NOT_LOADED = "NOT_LOADED"
    LOADING = "LOADING"
    LOADED = "LOADED"
    LOADING_FAILED = "LOADING_FAILED"


#: A copy's state as a status: the one place the two vocabularies meet.
COPY_STATUS = {CopyState.LOADING: Status.LOADING, CopyState.LOADED: Status.LOADED,
               CopyState.FAILED: Status.LOADING_FAILED}


@dataclass(frozen=True, slots=True)
class CopyStatus:
    instance_id: str
    state: Status
    time_ms: int


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """ModelMesh's ModelStatusInfo in domain terms."""

    status: Status
    errors: tuple[str, ...] = ()
    copies: tuple[CopyStatus, ...] = ()


class PendingLoads:
    """Cold models this instance asked another instance to load, until the target's
    instance record counts them.

    Concurrent requests for the same cold model go to the same target, and the
    model promised to a target counts there (its bytes as used, one more model)
    in the cluster snapshot. A copy record alone is not enough to stop counting:
    the target writes its copy and instance records separately, and placement
    reads used bytes and model counts from the instance record. So a promise
    stands until the target's instance record reflects the copy's load (its
    ``cache_seq`` has reached the copy record's), the load failed, or its
    deadline passed.
    """

    def __init__(self) -> None:
        self._by_model: dict[str, tuple[str, int, float]] = {}  # target, bytes, monotonic deadline

    def add(self, model_id: str, target: str, size: int, until: float) -> None:
        self._by_model[model_id] = (target, size, until)

    def get(self, model_id: str) -> tuple[str, int, float] | None:
        return self._by_model.get(model_id)

    def drop(self, model_id: str) -> None:
        self._by_model.pop(model_id, None)

    def drop_target(self, instance_id: str) -> None:
        for model_id, (target, _, _) in list(self._by_model.items()):
            if target == instance_id:
                del self._by_model[model_id]

    def by_target(self, copies: Mapping[str, Mapping[str, CopyRecord]],
                  instances: Mapping[str, InstanceRecord],
                  now: float) -> dict[str, tuple[int, int]]:
        """Bytes and models promised to each target that its instance record does not
        count yet (``now``: monotonic time). Promises settled on the way are forgotten."""
        out: dict[str, tuple[int, int]] = {}
        settled = []
        for model_id, (target, size, until) in self._by_model.items():
            copy = copies.get(model_id, {}).get(target)
            if copy is not None and copy.state is not CopyState.LOADING:
                rec = instances.get(target)
                if copy.state is CopyState.FAILED or (
                        rec is not None and rec.cache_seq >= copy.cache_seq):
                    settled.append(model_id)  # the target's own figures are right
                    continue
            if until <= now:
                settled.append(model_id)
                continue
            used, count = out.get(target, (0, 0))
            out[target] = (used + size, count + 1)
        for model_id in settled:
            del self._by_model[model_id]
        return out


class MeshView:
    """Read-only answers about models, copies and instances, as this instance sees them."""

    def __init__(self, registry: Registry, cache: ModelCache, dataplane: DataPlane, node: Node,
                 *, loading_slots: int, labels: Mapping[str, str]) -> None:
        self.registry = registry
        self.cache = cache
        self.dataplane = dataplane
        self.node = node
        self.loading_slots = loading_slots
        self.labels = frozenset(f"{k}={v}" for k, v in labels.items())
        self.pending = PendingLoads()
        #: model -> requests/s of the copy here over the last scaling window
        self.copy_rates: dict[str, float] = {}
        #: model -> wall time a copy here was last scaled down
        self.last_removed: dict[str, float] = {}

    def forget(self, model_id: str) -> None:
        """Drop what this view keeps about a model that was unregistered."""
        self.pending.drop(model_id)
        self.copy_rates.pop(model_id, None)
        self.last_removed.pop(model_id, None)

    # -- copies ---------------------------------------------------------------------

    def copy_states(self, model_id: str,
                    records: Mapping[str, CopyRecord] | None = None) -> dict[str, CopyState]:
        """State of each copy of ``model_id`` on a live instance that is not shutting down.

        ``records`` replaces the mirror's copy records (e.g. a transaction's
        fresh answer). This instance's copy comes from its cache, unless it is
        draining.
        """
        if records is None:
            records = self.registry.copies.get(model_id, {})
        live = self.registry.instances
        me = self.node.instance_id
        out = {iid: c.state for iid, c in records.items()
               if iid != me and iid in live and not live[iid].shutting_down}
        entry = self.cache.get(model_id)
        if entry is not None and not self.node.draining:
            out[me] = entry.state
        return out

    def live_copies(self, model_id: str, states: Collection[CopyState] = USABLE, *,
                    include_self: bool = True) -> list[str]:
        """Instances (sorted) with a live copy of ``model_id`` in one of ``states``."""
        me = self.node.instance_id
        return sorted(iid for iid, state in self.copy_states(model_id).items()
                      if state in states and (include_self or iid != me))

    def only_copy(self, model_id: str, excluded: Collection[str]) -> str | None:
        """The instance of a model's single usable copy elsewhere, when that is all there is.

        Every route decision sends such a request to that copy; finding it
        without building snapshots keeps the commonest forwarding case cheap.
        """
        copies = self.registry.copies.get(model_id)
        if not copies or len(copies) != 1 or self.cache.get(model_id) is not None:
            return None
        ((iid, copy),) = copies.items()
        if copy.state is not CopyState.LOADED or iid == self.node.instance_id or iid in excluded:
            return None
        rec = self.registry.instances.get(iid)
        return iid if rec is not None and not rec.shutting_down else None

    def failures(self, model_id: str) -> list[str]:
        """Errors of the failed copies of ``model_id`` in its records."""
        return [c.error for c in self.registry.copies.get(model_id, {}).values()
                if c.state is CopyState.FAILED and c.error]

    def known_size(self, record: ModelRecord) -> int:
        """Bytes of the model as measured or estimated (0: nobody knows yet)."""
        size = record.size_estimate
        for c in self.registry.copies.get(record.model_id, {}).values():
            size = max(size, c.size_bytes)
        entry = self.cache.get(record.model_id)
        if entry is not None:
            size = max(size, entry.size)
        return size

    def model_status(self, model_id: str) -> ModelStatus:
        """The model's status across the mesh (this instance's cache is the freshest)."""
        if model_id not in self.registry.models:
            return ModelStatus(Status.NOT_FOUND)
        copies: dict[str, CopyStatus] = {}
        errors: list[str] = []
        for inst, c in self.registry.copies.get(model_id, {}).items():
            copies[inst] = CopyStatus(inst, COPY_STATUS[c.state], c.updated_ms)
            if c.state is CopyState.FAILED and c.error:
                errors.append(c.error)
        me = self.node.instance_id
        entry = self.cache.get(model_id)
        if entry is not None:
            state = COPY_STATUS[entry.state]
            copies[me] = CopyStatus(me, state, now_ms())
            if state is Status.LOADING_FAILED and entry.error not in errors:
                errors.insert(0, entry.error)
        else:
            copies.pop(me, None)
        states = {c.state for c in copies.values()}
        status: Status
        for candidate in (Status.LOADED, Status.LOADING, Status.LOADING_FAILED):
            if candidate in states:
                status = candidate
                break
        else:
            status = Status.NOT_LOADED
        return ModelStatus(status, tuple(errors), tuple(copies.values()))

    # -- placement's snapshots ----------------------------------------------------------

    def local_snapshot(self) -> InstanceSnapshot:
        mem = self.cache.memory()
        node = self.node
        return InstanceSnapshot(
            instance_id=node.instance_id,
            cpu=Memory(self.cache.capacity_bytes, self.cache.used_bytes, mem.pinned_bytes,
                       mem.lru_time, mem.min_priority),
            model_count=self.cache.loaded_count,
            loading=self.cache.loading_count,
            loading_slots=self.loading_slots,
            in_flight=node.in_flight[node.instance_id],
            concurrency=node.concurrency,
            request_rate=self.dataplane.request_rate(),
            labels=self.labels,
            shutting_down=node.draining,
        )

    def cluster_snapshot(self, excluded: Collection[str] = frozenset()) -> ClusterSnapshot:
        """Every live instance, this one from its cache; bytes already promised to a
        target by ``pending`` count there until its instance record counts them."""
        pending = self.pending.by_target(self.registry.copies, self.registry.instances,
                                         time.monotonic())
        in_flight = self.node.in_flight
        me = self.node.instance_id
        instances = []
        have_me = False
        for rec in self.registry.instances.values():
            iid = rec.instance_id
            if iid in excluded:
                continue
            if iid == me:
                instances.append(self.local_snapshot())
                have_me = True
                continue
            promised, promised_models = pending.get(iid, (0, 0))
            instances.append(InstanceSnapshot(
                instance_id=iid,
                cpu=Memory(rec.capacity_bytes, rec.used_bytes + promised,
                           rec.pinned_bytes,
                           rec.lru_time_ms / 1000 if rec.lru_time_ms else None,
                           rec.min_priority),
                model_count=rec.model_count + promised_models,
                loading=rec.loading_count,
                loading_slots=max(rec.loading_slots, 1),
                in_flight=in_flight[iid],
                concurrency=max(rec.concurrency, 1),
                request_rate=rec.requests_per_minute / 60.0,
                labels=frozenset(f"{k}={v}" for k, v in rec.labels.items()),
                shutting_down=rec.shutting_down,
            ))
        if not have_me and me and me not in excluded:
            instances.append(self.local_snapshot())  # our record is not (yet) in etcd
        return ClusterSnapshot(tuple(instances), now=time.time())

    def model_snapshot(self, record: ModelRecord,
                       excluded: Collection[str] = frozenset()) -> ModelSnapshot:
        model_id = record.model_id
        me = self.node.instance_id
        in_flight = self.node.in_flight
        copies: list[CopySnapshot] = []
        failed: set[str] = set()
        size = 0
        for iid, c in self.registry.copies.get(model_id, {}).items():
            if iid == me:
                continue  # the live cache below is fresher
            if c.state is CopyState.FAILED:
                failed.add(iid)
            size = max(size, c.size_bytes)
            if iid in excluded:
                continue
            copies.append(CopySnapshot(iid, c.state, since=c.updated_ms / 1000,
                                       in_flight=in_flight[iid], request_rate=c.request_rate))
        entry = self.cache.get(model_id)
        if entry is not None:
            if entry.state is CopyState.FAILED:
                failed.add(me)
            else:
                copies.append(CopySnapshot(
                    me, entry.state, since=entry.loaded_at, in_flight=entry.in_use,
                    request_rate=self.copy_rates.get(model_id, 0.0),
                ))
                size = max(size, entry.size)
        usage = self.cache.usage.get(model_id)
        stats = self.dataplane.stats.get(model_id)
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
