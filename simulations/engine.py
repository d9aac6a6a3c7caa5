"""The discrete-event simulator: one placement policy, one trace, virtual time.

What is modelled
    N instances, each with CPU (and optionally GPU) memory, ``concurrency``
    request slots and ``loading_concurrency`` load slots. Requests arrive as
    the trace says. A request for a model with a loaded copy is a hit and is
    served by the copy the policy routes it to; one for a model whose only
    copies are still loading waits for the load (a cold start); one for a model
    with no copy makes the policy place it, evicts what the policy says, loads
    it and waits (a cold start, and a load). Loads take a fixed cost plus size
    over bandwidth, with log-normal jitter, and queue for the instance's load
    slots; requests queue first-come first-served for its request slots, so
    latency includes queueing, waiting for loads and inference. Loads can fail
    (the waiting requests then retry elsewhere); instances can crash and come
    back empty after a restart delay.

How placement is driven
    ``place``, ``route`` and ``rebalance`` are called with snapshots built from
    the simulated cluster. Instance snapshots are republished whenever an
    instance's cache changes and at every tick (``simulation.tick_s``), like
    the instance records of the live mesh, so between ticks their request
    rates and in-flight counts are as stale as the mesh's would be.
    Eviction uses the policy's retention priorities through one heap per
    memory pool, which yields the same victims as ``Policy.evict`` over a full
    snapshot (a test checks this) without rebuilding the snapshot per miss.

Events are ordered by time; the trace drives the clock, and load
completions, ticks and instance crashes/restarts are processed in between.
The run is deterministic for a config's seed.
"""

from __future__ import annotations

import heapq
import math
import random
import time as wallclock
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from placement import (
    RATE_HALF_LIFE_S,
    REUSE_GAP_S,
    AddCopy,
    CachedModel,
    ClusterSnapshot,
    CopySnapshot,
    CopyState,
    Device,
    InstanceCache,
    InstanceSnapshot,
    Memory,
    ModelSnapshot,
    Policy,
    RemoveCopy,
    decayed_rate,
)
from simulations.config import SimulationConfig
from simulations.traces import Trace
from simulations.workload import ModelTable

HIT, COLD, FAILED = 0, 1, 2
_LOADING, _LOADED = 0, 1
_EV_LOAD_DONE, _EV_DOWN, _EV_UP = 0, 1, 2
_DECAY = math.log(2.0) / RATE_HALF_LIFE_S
_RATE_PER_REQUEST = _DECAY  # see placement.usage.rate_after_request
_FAILURE_EXPIRY_S = 900.0  # ModelMesh's LOAD_FAILURE_EXPIRY_MS
_NO_MEMORY = Memory()


@dataclass
class RunResult:
    """One policy's run: summary figures plus the series the plots need."""

    label: str
    policy: str
    metrics: dict[str, Any]
    times: np.ndarray = field(repr=False)
    outcome: np.ndarray = field(repr=False)
    latency_s: np.ndarray = field(repr=False)
    memory_curve: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)


class _Copy:
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

    def __init__(self, inst: _Instance, m: int, now: float, priority: float, last_used: float):
        self.inst = inst
        self.m = m
        self.state = _LOADING
        self.since = now
        self.priority = priority
        self.last_used = last_used
        self.hits = 0
        self.busy_until = 0.0
        self.waiters: list[tuple[int, float, float]] = []
        self.window = 0
        self.rate = 0.0
        self.gone = False


class _Pool:
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


class _Instance:
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
        self.pools = (_Pool(Device.CPU, cpu), _Pool(Device.GPU, gpu))
        self.concurrency = conc
        self.loading_slots = lconc
        self.slots = [0.0] * conc
        self.lslots = [0.0] * lconc
        self.loading = 0
        self.window = 0
        self.rate = 0.0
        self.snap: InstanceSnapshot | None = None
        self.dirty = True
        self.copies: dict[int, _Copy] = {}

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


class Simulator:
    """Runs one policy over one workload. Use ``run()`` once."""

    def __init__(
        self,
        cfg: SimulationConfig,
        models: ModelTable,
        trace: Trace,
        policy: Policy,
        *,
        label: str | None = None,
        progress: Callable[[int], None] | None = None,
        progress_every: int = 16384,
    ) -> None:
        self.cfg = cfg
        self.progress_every = max(1, progress_every)
        self.models = models
        self.trace = trace
        self.policy = policy
        self.label = label or policy.name
        self.progress = progress
        n_models = len(models)
        cl = cfg.cluster
        self.instances = [
            _Instance(
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
        self.copies_of: list[dict[int, _Copy]] = [{} for _ in range(n_models)]
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.random = random.Random(cfg.seed)
        rng = np.random.default_rng(cfg.seed + 1)
        jit = cfg.models.load_jitter
        self.jitter = np.exp(jit * rng.standard_normal(65536) - jit * jit / 2).tolist()
        self.jitter_i = 0
        self.snapshots: dict[int, ModelSnapshot] = {}
        self.stale: set[int] = set()
        n = len(trace)
        self.outcome = np.zeros(n, dtype=np.int8)
        self.latency = np.full(n, np.nan)
        self.counters = {
            "loads": 0,
            "evictions": 0,
            "load_failures": 0,
            "copies_added": 0,
            "copies_removed": 0,
            "adds_dropped": 0,
            "instance_failures": 0,
        }
        self.at_warmup: dict[str, int] | None = None
        self.samples: list[tuple[float, float, float, int]] = []  # t, mem use, copies/model, max

    # -- main loop --------------------------------------------------------------------------

    def run(self) -> RunResult:
        started = wallclock.perf_counter()
        cfg = self.cfg
        times = self.trace.times.tolist()
        mids = self.trace.models.tolist()
        n = len(times)
        sigma = cfg.models.inference_sigma
        rng = np.random.default_rng(cfg.seed + 2)
        svc_mult = np.exp(sigma * rng.standard_normal(n) - sigma * sigma / 2).tolist()
        tick = cfg.tick_s
        t0 = times[0] if n else 0.0
        # Ticks and rebalances fall on multiples of their periods from time 0.
        next_tick = (math.floor(t0 / tick) + 1) * tick
        self.last_tick = t0
        interval = self.policy.rebalance_interval_s
        self.next_rebalance = (math.floor(t0 / interval) + 1) * interval if interval else math.inf
        if cfg.warmup_s <= 0:
            self.at_warmup = dict(self.counters)
        if cfg.cluster.failures is not None:
            for inst in self.instances:
                self._push(
                    t0 + self.random.expovariate(1 / cfg.cluster.failures.mtbf_s), _EV_DOWN, inst
                )

        # Locals for the hot path.
        events = self.events
        copies_of = self.copies_of
        last_used = self.last_used
        earlier = self.earlier
        rate = self.rate
        stale = self.stale
        size = self.size
        dev = self.dev
        ids = self.ids
        load_s = self.load_s
        svc_mean = self.svc_mean
        outcome = self.outcome
        latency = self.latency
        priority = self.policy.priority
        heappush = heapq.heappush
        heapreplace = heapq.heapreplace
        exp = math.exp
        gap = REUSE_GAP_S
        progress = self.progress
        report_every = self.progress_every

        for k in range(n):
            t = times[k]
            if t >= next_tick:
                while next_tick <= t:
                    self._events_until(next_tick)
                    self._tick(next_tick)
                    next_tick += tick
            if events and events[0][0] <= t:
                self._events_until(t)
            m = mids[k]
            lu = last_used[m]
            if lu is None:
                r = _RATE_PER_REQUEST
            else:
                d = t - lu
                if d >= gap:
                    earlier[m] = lu
                r = (
                    rate[m] * exp(-d * _DECAY) + _RATE_PER_REQUEST
                    if d > 0
                    else rate[m] + _RATE_PER_REQUEST
                )
            rate[m] = r
            last_used[m] = t
            stale.add(m)
            svc = svc_mean[m] * svc_mult[k]
            cps = copies_of[m]
            if not cps:
                self._miss(k, t, m, svc, t, ())
            else:
                if len(cps) == 1:
                    (c,) = cps.values()
                else:
                    c = self._route(m, t)
                inst = c.inst
                if c.state == _LOADED:
                    slots = inst.slots
                    f = slots[0]
                    end = (t if f <= t else f) + svc
                    heapreplace(slots, end)
                    latency[k] = end - t
                    if end > c.busy_until:
                        c.busy_until = end
                else:
                    outcome[k] = COLD
                    c.waiters.append((k, t, svc))
                inst.window += 1
                c.window += 1
                c.hits += 1
                c.last_used = t
                pool = inst.pools[dev[m]]
                p = priority(
                    now=t,
                    size_bytes=size[m],
                    request_rate=r,
                    hits_here=c.hits,
                    load_seconds=load_s[m],
                    clock=pool.clock,
                )
                if p != c.priority:
                    c.priority = p
                    heap = pool.heap
                    heappush(heap, (p, ids[m], m))
                    if len(heap) > 4 * len(pool.lru) + 256:
                        self._compact(inst, pool)
                lru = pool.lru
                lru[m] = t
                lru.move_to_end(m)
            if progress is not None and k % report_every == report_every - 1:
                progress(report_every)

        end_t = times[-1] if n else 0.0
        self._events_until(end_t)
        self._drain_loads()
        if progress is not None and n % report_every:
            progress(n % report_every)
        if self.at_warmup is None:
            self.at_warmup = dict(self.counters)
        wall = wallclock.perf_counter() - started
        return self._result(end_t, wall)

    # -- requests ---------------------------------------------------------------------------

    def _route(self, m: int, now: float) -> _Copy:
        cps = self.copies_of[m]
        chosen = self.policy.route(self._model_snapshot(m, now), self._cluster(now))
        inst = self.by_id.get(chosen) if chosen is not None else None
        if inst is not None and inst.idx in cps:
            return cps[inst.idx]
        return next(iter(cps.values()))

    def _miss(
        self, k: int, arrival: float, m: int, svc: float, now: float, exclude: Iterable[str]
    ) -> None:
        """A request for a model with no copy: place, make room, load, wait."""
        model = self._model_snapshot(m, now)
        cluster = self._cluster(now)
        tried = set(exclude)
        size = self.size[m]
        while True:
            iid = self.policy.place(model, cluster, frozenset(tried))
            if iid is None or iid in tried or iid not in self.by_id or not self.by_id[iid].alive:
                self.outcome[k] = FAILED
                return
            inst = self.by_id[iid]
            pool = inst.pools[self.dev[m]]
            prio = self.policy.priority(
                now=now,
                size_bytes=size,
                request_rate=self.rate[m],
                hits_here=1,
                load_seconds=self.load_s[m],
                clock=pool.clock,
            )
            if self._make_room(inst, pool, size, now, None):
                break
            tried.add(iid)  # cannot free enough there right now (models in use)
        c = self._add_copy(inst, m, now, prio, now)
        c.hits = 1
        c.window += 1
        inst.window += 1
        self.outcome[k] = COLD
        c.waiters.append((k, arrival, svc))

    def _retry(self, k: int, arrival: float, m: int, svc: float, now: float) -> None:
        """A waiting request lost its load (failure, crash): join another copy or place anew."""
        cps = self.copies_of[m]
        if not cps:
            self._miss(k, arrival, m, svc, now, ())
            return
        c = next(iter(cps.values())) if len(cps) == 1 else self._route(m, now)
        if c.state == _LOADED:
            self._serve(c, k, arrival, now, svc)
        else:
            c.waiters.append((k, arrival, svc))

    def _serve(self, c: _Copy, k: int, arrival: float, now: float, svc: float) -> None:
        slots = c.inst.slots
        f = slots[0]
        end = (now if f <= now else f) + svc
        heapq.heapreplace(slots, end)
        self.latency[k] = end - arrival
        if end > c.busy_until:
            c.busy_until = end

    # -- cache ------------------------------------------------------------------------------

    def _add_copy(
        self, inst: _Instance, m: int, now: float, prio: float, last_used: float
    ) -> _Copy:
        pool = inst.pools[self.dev[m]]
        c = _Copy(inst, m, now, prio, last_used)
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
        self._push(ready, _EV_LOAD_DONE, c)
        self.counters["loads"] += 1
        inst.dirty = True
        self.stale.add(m)
        return c

    def _make_room(
        self, inst: _Instance, pool: _Pool, size: int, now: float, below: float | None
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
        self, inst: _Instance, pool: _Pool, size: int, now: float, below: float | None
    ) -> list[_Copy] | None:
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
        victims: list[_Copy] = []
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
            if c.state == _LOADING or c.busy_until > now or c.waiters:
                continue  # in use
            victims.append(c)
            chosen.add(vm)
            freed += self.size[vm]
            if freed >= need:
                break
        for entry in popped:
            heapq.heappush(heap, entry)
        return victims if freed >= need else None

    def _drop_copy(self, c: _Copy) -> None:
        inst, m = c.inst, c.m
        pool = inst.pools[self.dev[m]]
        del self.copies_of[m][inst.idx]
        del inst.copies[m]
        size = self.size[m]
        pool.used -= size
        pool.lru.pop(m, None)
        if c.state == _LOADING:
            pool.loading_bytes -= size
            inst.loading -= 1
        c.gone = True
        inst.dirty = True
        self.stale.add(m)

    def _compact(self, inst: _Instance, pool: _Pool) -> None:
        ids = self.ids
        pool.heap = [(inst.copies[m].priority, ids[m], m) for m in pool.lru]
        heapq.heapify(pool.heap)

    # -- events -----------------------------------------------------------------------------

    def _push(self, at: float, kind: int, obj: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, obj))

    def _events_until(self, t: float) -> None:
        events = self.events
        while events and events[0][0] <= t:
            at, _, kind, obj = heapq.heappop(events)
            if kind == _EV_LOAD_DONE:
                self._load_done(obj, at)
            elif kind == _EV_DOWN:
                self._instance_down(obj, at)
            else:
                self._instance_up(obj, at)

    def _drain_loads(self) -> None:
        """After the last request: finish the loads still running (crashes stop)."""
        events = self.events
        while events:
            at, _, kind, obj = heapq.heappop(events)
            if kind == _EV_LOAD_DONE:
                self._load_done(obj, at)

    def _load_done(self, c: _Copy, now: float) -> None:
        if c.gone:
            return
        inst, m = c.inst, c.m
        pool = inst.pools[self.dev[m]]
        rate = self.cfg.models.load_failure_rate
        if rate > 0 and self.random.random() < rate:
            self.counters["load_failures"] += 1
            waiters = c.waiters
            c.waiters = []
            self._drop_copy(c)
            failed = self.failed_on[m]
            if failed is None:
                failed = self.failed_on[m] = {}
            failed[inst.idx] = now
            for k, arrival, svc in waiters:
                self._retry(k, arrival, m, svc, now)
            return
        pool.loading_bytes -= self.size[m]
        inst.loading -= 1
        c.state = _LOADED
        inst.dirty = True
        self.stale.add(m)
        if c.waiters:
            waiters = c.waiters
            c.waiters = []
            for k, arrival, svc in waiters:
                self._serve(c, k, arrival, now, svc)

    def _instance_down(self, inst: _Instance, now: float) -> None:
        if not inst.alive:
            return
        self.counters["instance_failures"] += 1
        inst.alive = False
        self.alive = [i for i in self.instances if i.alive]
        stranded: list[tuple[int, float, float, int]] = []
        for c in list(inst.copies.values()):
            stranded += [(k, a, s, c.m) for k, a, s in c.waiters]
            c.waiters = []
            self._drop_copy(c)
        inst.restart()
        inst.alive = False
        assert self.cfg.cluster.failures is not None
        self._push(now + self.cfg.cluster.failures.restart_s, _EV_UP, inst)
        for k, arrival, svc, m in stranded:
            self._retry(k, arrival, m, svc, now)

    def _instance_up(self, inst: _Instance, now: float) -> None:
        inst.restart()
        inst.alive = True
        self.alive = [i for i in self.instances if i.alive]
        assert self.cfg.cluster.failures is not None
        self._push(
            now + self.random.expovariate(1 / self.cfg.cluster.failures.mtbf_s), _EV_DOWN, inst
        )

    # -- ticks: publishing, sampling, rebalancing --------------------------------------------

    def _tick(self, now: float) -> None:
        dt = max(1e-9, now - self.last_tick)
        self.last_tick = now
        used = cap = 0
        copies = 0
        for inst in self.instances:
            inst.rate = inst.window / dt
            inst.window = 0
            inst.dirty = True
            for c in inst.copies.values():
                if c.window or c.rate:
                    c.rate = c.window / dt
                    c.window = 0
                    self.stale.add(c.m)
            if inst.alive:
                for p in inst.pools:
                    used += p.used
                    cap += p.capacity
                copies += len(inst.copies)
        holding = sum(1 for cps in self.copies_of if cps) if copies else 0
        max_copies = max((len(cps) for cps in self.copies_of), default=0) if copies else 0
        self.samples.append(
            (now, used / cap if cap else 0.0, copies / holding if holding else 0.0, max_copies)
        )
        if self.at_warmup is None and now >= self.cfg.warmup_s:
            self.at_warmup = dict(self.counters)
        if now >= self.next_rebalance:
            interval = self.policy.rebalance_interval_s or math.inf
            while self.next_rebalance <= now:
                self.next_rebalance += interval
            self._rebalance(now)

    def _rebalance(self, now: float) -> None:
        cluster = self._cluster(now)
        actions = self.policy.rebalance(cluster, self._model_snapshots(now), now)
        for action in actions:
            m = self.index.get(action.model_id)
            inst = self.by_id.get(action.instance_id)
            if m is None or inst is None or not inst.alive:
                continue
            if isinstance(action, AddCopy):
                self._apply_add(action, m, inst, now)
            elif isinstance(action, RemoveCopy):
                self._apply_remove(m, inst, now)

    def _apply_add(self, action: AddCopy, m: int, inst: _Instance, now: float) -> None:
        if m in inst.copies:
            return
        pool = inst.pools[self.dev[m]]
        lu = self.last_used[m]
        as_of = action.as_of if action.as_of is not None else (lu if lu is not None else now)
        rate = decayed_rate(self.rate[m], lu, as_of) if lu is not None else 0.0
        prio = self.policy.priority(
            now=as_of,
            size_bytes=self.size[m],
            request_rate=rate,
            hits_here=1,
            load_seconds=self.load_s[m],
            clock=pool.clock,
        )
        if not self._make_room(inst, pool, self.size[m], now, prio):
            self.counters["adds_dropped"] += 1
            return
        self._add_copy(inst, m, now, prio, as_of)
        self.counters["copies_added"] += 1

    def _apply_remove(self, m: int, inst: _Instance, now: float) -> None:
        c = inst.copies.get(m)
        if c is None or c.state != _LOADED or c.busy_until > now or c.waiters:
            return
        loaded = sum(1 for x in self.copies_of[m].values() if x.state == _LOADED)
        if loaded < 2:
            return
        self._drop_copy(c)
        self.last_removed[m] = now
        self.counters["copies_removed"] += 1

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
                in_use=c.state == _LOADING or c.busy_until > now or bool(c.waiters),
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
                loading = sum(self.size[c.m] for c in mine if c.state == _LOADING)
                assert pool.used == used, f"{inst.iid}: used {pool.used} != {used}"
                assert pool.used <= pool.capacity, f"{inst.iid} over capacity"
                assert pool.loading_bytes == loading, f"{inst.iid}: loading bytes"
                assert set(pool.lru) == {c.m for c in mine}, f"{inst.iid}: lru set"
            assert inst.loading == sum(1 for c in inst.copies.values() if c.state == _LOADING)
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

    def _memory(self, inst: _Instance, pool: _Pool) -> Memory:
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

    def _in_flight(self, inst: _Instance, now: float) -> int:
        work = 0.0
        for s in inst.slots:
            if s > now:
                work += s - now
        return math.ceil(work / self.mean_service) if work else 0

    def _instance_snapshot(self, inst: _Instance, now: float) -> InstanceSnapshot:
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
                state=CopyState.LOADED if c.state == _LOADED else CopyState.LOADING,
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

    # -- results ----------------------------------------------------------------------------

    def _result(self, end_t: float, wall_s: float) -> RunResult:
        from simulations.metrics import summarize

        times = self.trace.times
        start = self.cfg.warmup_s
        base = self.at_warmup or {}
        counts = {k: v - base.get(k, 0) for k, v in self.counters.items()}
        samples = [s for s in self.samples if s[0] >= start] or self.samples
        mem = float(np.mean([s[1] for s in samples])) if samples else 0.0
        cpm = [s[2] for s in samples if s[2] > 0]
        extra = {
            "mean_memory_utilization": mem,
            "mean_copies_per_model": float(np.mean(cpm)) if cpm else 0.0,
            "max_copies_per_model": max((s[3] for s in samples), default=0),
            **counts,
            "wall_s": wall_s,
        }
        metrics = summarize(times, self.outcome, self.latency, start=start, end=end_t, counts=extra)
        curve = (
            np.array([s[0] for s in self.samples]),
            np.array([s[1] for s in self.samples]),
        )
        return RunResult(
            label=self.label,
            policy=self.policy.name,
            metrics=metrics,
            times=times,
            outcome=self.outcome,
            latency_s=self.latency,
            memory_curve=curve,
        )
