"""The simulated cluster's books: instances, memory pools, model copies, snapshots.

``Cluster`` holds the state the event loop (``simulations.engine``) works on:
per instance its memory pools (CPU, GPU), request and load slots and copies;
per model its copies and usage (last use, decayed request rate, recent load
failures); and the queue of timed events (load completions here, crashes and
restarts in ``simulations.faults``). Its cache operations add a copy (and
queue its load), choose and evict victims and drop copies; its snapshot
builders give the placement policies the ``ClusterSnapshot`` and
``ModelSnapshot`` views of it. ``instance_cache``, ``victims`` and
``check_invariants`` are for tests and debugging.

Eviction uses the policy's retention priorities through one heap per memory
pool (entries go stale when a copy's priority changes or it goes, and are
skipped), which yields the same victims as ``Policy.evict`` over a full
snapshot without rebuilding the snapshot per miss.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from typing import Any

import numpy as np

from placement import (
    CachedModel,
    ClusterSnapshot,
    CopySnapshot,
    CopyState,
    Device,
    InstanceCache,
    InstanceSnapshot,
    Memory,
    ModelSnapshot,
)
from simulations.config import SimulationConfig
from simulations.workload import ModelTable

LOADING, LOADED = 0, 1  # Copy.state
EV_LOAD_DONE, EV_DOWN, EV_UP = 0, 1, 2  # event kinds
_FAILURE_EXPIRY_S = 900.0  # ModelMesh's LOAD_FAILURE_EXPIRY_MS
_NO_MEMORY = Memory()


class Copy:
    """A copy of model ``m`` on ``inst``: its load state, eviction priority, usage, waiters."""

    __slots__ = (
        "inst",
        "m",
        "state",
        "since",
        "priority",
        "last_used",
        "hits",
        "busy_until",
        "waiters",
        "window",
        "rate",
        "gone",
    )

    def __init__(self, inst: Instance, m: int, now: float, priority: float, last_used: float):
        self.inst = inst
        self.m = m
        self.state = LOADING
        self.since = now
        self.priority = priority
        self.last_used = last_used
        self.hits = 0
        self.busy_until = 0.0
        self.waiters: list[tuple[int, float, float]] = []
        self.window = 0
        self.rate = 0.0
        self.gone = False


class Pool:
    """A memory pool: bytes used and loading, eviction heap, models in LRU order."""

    __slots__ = ("device", "capacity", "used", "loading_bytes", "heap", "lru", "clock")

    def __init__(self, device: Device, capacity: int) -> None:
        self.device = device
        self.capacity = capacity
        self.used = 0
        self.loading_bytes = 0
        self.heap: list[tuple[float, str, int]] = []
        self.lru: OrderedDict[int, float] = OrderedDict()
        self.clock = 0.0

    def reset(self) -> None:
        self.used = 0
        self.loading_bytes = 0
        self.heap = []
        self.lru = OrderedDict()
        self.clock = 0.0


class Instance:
    """An instance: CPU and GPU pools, request and load slots, copies, published snapshot."""

    __slots__ = (
        "idx",
        "iid",
        "alive",
        "pools",
        "slots",
        "lslots",
        "loading",
        "window",
        "rate",
        "snap",
        "dirty",
        "copies",
        "concurrency",
        "loading_slots",
    )

    def __init__(self, idx: int, iid: str, cpu: int, gpu: int, conc: int, lconc: int) -> None:
        self.idx = idx
        self.iid = iid
        self.alive = True
        self.pools = (Pool(Device.CPU, cpu), Pool(Device.GPU, gpu))
        self.concurrency = conc
        self.loading_slots = lconc
        self.slots = [0.0] * conc
        self.lslots = [0.0] * lconc
        self.loading = 0
        self.window = 0
        self.rate = 0.0
        self.snap: InstanceSnapshot | None = None
        self.dirty = True
        self.copies: dict[int, Copy] = {}

    def restart(self) -> None:
        for p in self.pools:
            p.reset()
        self.slots = [0.0] * self.concurrency
        self.lslots = [0.0] * self.loading_slots
        self.loading = 0
        self.window = 0
        self.rate = 0.0
        self.copies = {}
        self.dirty = True


class Cluster:
    """The simulated cluster for ``cfg`` and ``models``, every instance up and empty."""

    def __init__(self, cfg: SimulationConfig, models: ModelTable) -> None:
        self.cfg = cfg
        n_models = len(models)
        cl = cfg.cluster
        self.instances = [
            Instance(
                i,
                f"i{i:03d}",
                cl.capacity_bytes,
                cl.gpu_capacity_bytes if i < cl.gpu_instances else 0,
                cl.concurrency,
                cl.loading_concurrency,
            )
            for i in range(cl.instances)
        ]
        self.by_id = {inst.iid: inst for inst in self.instances}
        self.alive = list(self.instances)
        self.ids = models.ids
        self.index = {mid: i for i, mid in enumerate(models.ids)}
        self.size = models.sizes.tolist()
        self.dev = [1 if g else 0 for g in models.gpu.tolist()]
        self.load_s = models.load_seconds.tolist()
        self.svc_mean = models.service_seconds.tolist()
        self.mean_service = float(np.mean(models.service_seconds)) or 1e-3
        self.last_used: list[float | None] = [None] * n_models
        self.earlier: list[float | None] = [None] * n_models
        self.rate = [0.0] * n_models
        self.last_removed: list[float | None] = [None] * n_models
        self.failed_on: list[dict[int, float] | None] = [None] * n_models
        self.copies_of: list[dict[int, Copy]] = [{} for _ in range(n_models)]
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        rng = np.random.default_rng(cfg.seed + 1)
        jit = cfg.models.load_jitter
        self.jitter = np.exp(jit * rng.standard_normal(65536) - jit * jit / 2).tolist()
        self.jitter_i = 0
        self.snapshots: dict[int, ModelSnapshot] = {}
        self.stale: set[int] = set()
        self.counters = {
            "loads": 0,
            "evictions": 0,
            "load_failures": 0,
            "copies_added": 0,
            "copies_removed": 0,
            "adds_dropped": 0,
            "instance_failures": 0,
        }

    # -- events (taken in time order by the loop in engine.py) ------------------------------

    def _push(self, at: float, kind: int, obj: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, obj))

    # -- cache ------------------------------------------------------------------------------

    def _add_copy(self, inst: Instance, m: int, now: float, prio: float, last_used: float) -> Copy:
        """A copy of ``m`` on ``inst``: its memory reserved, its load queued for a slot."""
        pool = inst.pools[self.dev[m]]
        c = Copy(inst, m, now, prio, last_used)
        self.copies_of[m][inst.idx] = c
        inst.copies[m] = c
        size = self.size[m]
        pool.used += size
        pool.loading_bytes += size
        heapq.heappush(pool.heap, (prio, self.ids[m], m))
        lru = pool.lru
        if lru and last_used < next(iter(lru.values())):
            lru[m] = last_used
            lru.move_to_end(m, last=False)
        else:
            lru[m] = last_used
        inst.loading += 1
        ls = inst.lslots
        f = ls[0]
        start = now if f <= now else f
        self.jitter_i = (self.jitter_i + 1) & 65535
        ready = start + self.load_s[m] * self.jitter[self.jitter_i]
        heapq.heapreplace(ls, ready)
        self._push(ready, EV_LOAD_DONE, c)
        self.counters["loads"] += 1
        inst.dirty = True
        self.stale.add(m)
        return c

    def _make_room(
        self, inst: Instance, pool: Pool, size: int, now: float, below: float | None
    ) -> bool:
        """Evict what ``_choose_victims`` picks; False (evicting nothing) if it cannot."""
        victims = self._choose_victims(inst, pool, size, now, below)
        if victims is None:
            return False
        for c in victims:
            if c.priority > pool.clock:
                pool.clock = c.priority
            self._drop_copy(c)
            self.counters["evictions"] += 1
        return True

    def _choose_victims(
        self, inst: Instance, pool: Pool, size: int, now: float, below: float | None
    ) -> list[Copy] | None:
        """The copies to evict so that ``size`` bytes are free, or None if impossible.

        The same choice as ``Policy.evict`` on a snapshot of the pool: copies in
        (priority, model id) order, skipping those in use, stopping at ``below``.
        The heap is left holding every live entry.
        """
        if size <= pool.capacity - pool.used:
            return []
        if size > pool.capacity:
            return None
        need = size - (pool.capacity - pool.used)
        heap = pool.heap
        copies = inst.copies
        popped: list[tuple[float, str, int]] = []
        victims: list[Copy] = []
        chosen: set[int] = set()
        freed = 0
        while heap:
            entry = heapq.heappop(heap)
            p, _, vm = entry
            c = copies.get(vm)
            if c is None or c.priority != p or vm in chosen:
                continue  # stale entry
            popped.append(entry)
            if below is not None and p >= below:
                break
            if c.state == LOADING or c.busy_until > now or c.waiters:
                continue  # in use
            victims.append(c)
            chosen.add(vm)
            freed += self.size[vm]
            if freed >= need:
                break
        for entry in popped:
            heapq.heappush(heap, entry)
        return victims if freed >= need else None

    def _drop_copy(self, c: Copy) -> None:
        inst, m = c.inst, c.m
        pool = inst.pools[self.dev[m]]
        del self.copies_of[m][inst.idx]
        del inst.copies[m]
        size = self.size[m]
        pool.used -= size
        pool.lru.pop(m, None)
        if c.state == LOADING:
            pool.loading_bytes -= size
            inst.loading -= 1
        c.gone = True
        inst.dirty = True
        self.stale.add(m)

    def _compact(self, inst: Instance, pool: Pool) -> None:
        ids = self.ids
        pool.heap = [(inst.copies[m].priority, ids[m], m) for m in pool.lru]
        heapq.heapify(pool.heap)

    # -- inspection (tests, debugging) --------------------------------------------------------

    def instance_cache(self, instance_id: str, device: Device, now: float) -> InstanceCache:
        """The pool of an instance as the ``InstanceCache`` snapshot ``Policy.evict`` takes."""
        inst = self.by_id[instance_id]
        pool = inst.pools[1 if device is Device.GPU else 0]
        entries = tuple(
            CachedModel(
                model_id=self.ids[m],
                size_bytes=self.size[m],
                priority=c.priority,
                last_used=c.last_used,
                in_use=c.state == LOADING or c.busy_until > now or bool(c.waiters),
            )
            for m, c in inst.copies.items()
            if self.dev[m] == (1 if device is Device.GPU else 0)
        )
        return InstanceCache(instance_id, pool.capacity, entries, device, pool.clock)

    def victims(self, instance_id: str, device: Device, size: int, now: float) -> list[str] | None:
        """The models the simulator would evict to free ``size`` bytes (nothing is evicted)."""
        inst = self.by_id[instance_id]
        pool = inst.pools[1 if device is Device.GPU else 0]
        chosen = self._choose_victims(inst, pool, size, now, None)
        return None if chosen is None else [self.ids[c.m] for c in chosen]

    def check_invariants(self) -> None:
        """Raise AssertionError if the simulated cluster's books do not balance."""
        for inst in self.instances:
            for d, pool in enumerate(inst.pools):
                mine = [c for m, c in inst.copies.items() if self.dev[m] == d]
                used = sum(self.size[c.m] for c in mine)
                loading = sum(self.size[c.m] for c in mine if c.state == LOADING)
                assert pool.used == used, f"{inst.iid}: used {pool.used} != {used}"
                assert pool.used <= pool.capacity, f"{inst.iid} over capacity"
                assert pool.loading_bytes == loading, f"{inst.iid}: loading bytes"
                assert set(pool.lru) == {c.m for c in mine}, f"{inst.iid}: lru set"
            assert inst.loading == sum(1 for c in inst.copies.values() if c.state == LOADING)
            if not inst.alive:
                assert not inst.copies, f"{inst.iid} is down but holds copies"
            for m, c in inst.copies.items():
                assert self.copies_of[m].get(inst.idx) is c, f"{inst.iid}: copy map"
        for m, cps in enumerate(self.copies_of):
            for i, c in cps.items():
                assert self.instances[i].copies.get(m) is c and not c.gone

    # -- snapshots --------------------------------------------------------------------------

    def _cluster(self, now: float) -> ClusterSnapshot:
        snaps = []
        for inst in self.alive:
            if inst.dirty or inst.snap is None:
                inst.snap = self._instance_snapshot(inst, now)
                inst.dirty = False
            snaps.append(inst.snap)
        return ClusterSnapshot(tuple(snaps), now)

    def _memory(self, inst: Instance, pool: Pool) -> Memory:
        if pool.capacity == 0:
            return _NO_MEMORY
        heap = pool.heap
        copies = inst.copies
        while heap:
            p, _, m = heap[0]
            c = copies.get(m)
            if c is not None and c.priority == p:
                break
            heapq.heappop(heap)
        lru = pool.lru
        return Memory(
            capacity_bytes=pool.capacity,
            used_bytes=pool.used,
            pinned_bytes=pool.loading_bytes,
            lru_time=next(iter(lru.values())) if lru else None,
            min_priority=heap[0][0] if heap else None,
        )

    def _in_flight(self, inst: Instance, now: float) -> int:
        work = 0.0
        for s in inst.slots:
            if s > now:
                work += s - now
        return math.ceil(work / self.mean_service) if work else 0

    def _instance_snapshot(self, inst: Instance, now: float) -> InstanceSnapshot:
        cpu, gpu = inst.pools
        return InstanceSnapshot(
            instance_id=inst.iid,
            cpu=self._memory(inst, cpu),
            gpu=self._memory(inst, gpu),
            model_count=len(inst.copies),
            loading=inst.loading,
            loading_slots=inst.loading_slots,
            in_flight=self._in_flight(inst, now),
            concurrency=inst.concurrency,
            request_rate=inst.rate,
        )

    def _model_snapshot(self, m: int, now: float) -> ModelSnapshot:
        copies = tuple(
            CopySnapshot(
                instance_id=c.inst.iid,
                state=CopyState.LOADED if c.state == LOADED else CopyState.LOADING,
                since=c.since,
                last_used=c.last_used,
                in_flight=self._in_flight(c.inst, now),
                request_rate=c.rate,
            )
            for c in self.copies_of[m].values()
        )
        failed = self.failed_on[m]
        failed_on: frozenset[str] = frozenset()
        if failed:
            for i, at in list(failed.items()):
                if now - at > _FAILURE_EXPIRY_S:
                    del failed[i]
            failed_on = frozenset(self.instances[i].iid for i in failed)
        return ModelSnapshot(
            model_id=self.ids[m],
            size_bytes=self.size[m],
            device=Device.GPU if self.dev[m] else Device.CPU,
            copies=copies,
            last_used=self.last_used[m],
            earlier_use=self.earlier[m],
            request_rate=self.rate[m],
            failed_on=failed_on,
            load_seconds=self.load_s[m],
            service_seconds=self.svc_mean[m],
            last_removed=self.last_removed[m],
        )

    def _model_snapshots(self, now: float) -> list[ModelSnapshot]:
        snaps = self.snapshots
        for m in self.stale:
            snaps[m] = self._model_snapshot(m, now)
        self.stale = set()
        return list(snaps.values())
