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

Where it lives
    This module is the event loop: ``Simulator.run`` and the request path
    (route, miss, retry, serve), load completions, ticks and rebalancing, and
    the result. The cluster's books (instances, pools, copies, eviction,
    snapshots for placement, invariants) are ``simulations.cluster.Cluster``;
    crashes, restarts and load failures are ``simulations.faults``.
    ``Simulator`` extends both, so the loop reaches the state as plain
    attributes of ``self``.
"""

from __future__ import annotations

import heapq
import math
import time as wallclock
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from placement import (
    RATE_HALF_LIFE_S,
    REUSE_GAP_S,
    AddCopy,
    Policy,
    RemoveCopy,
    decayed_rate,
)
from simulations.cluster import EV_DOWN, EV_LOAD_DONE, LOADED, Copy, Instance
from simulations.config import SimulationConfig
from simulations.faults import FaultyCluster
from simulations.traces import Trace
from simulations.workload import ModelTable

HIT, COLD, FAILED = 0, 1, 2
_DECAY = math.log(2.0) / RATE_HALF_LIFE_S
_RATE_PER_REQUEST = _DECAY  # see placement.usage.rate_after_request


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


class Simulator(FaultyCluster):
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
        super().__init__(cfg, models)
        self.progress_every = max(1, progress_every)
        self.models = models
        self.trace = trace
        self.policy = policy
        self.label = label or policy.name
        self.progress = progress
        n = len(trace)
        self.outcome = np.zeros(n, dtype=np.int8)
        self.latency = np.full(n, np.nan)
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
        self._schedule_crashes(t0)

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
                if c.state == LOADED:
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

    def _route(self, m: int, now: float) -> Copy:
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
        if c.state == LOADED:
            self._serve(c, k, arrival, now, svc)
        else:
            c.waiters.append((k, arrival, svc))

    def _serve(self, c: Copy, k: int, arrival: float, now: float, svc: float) -> None:
        slots = c.inst.slots
        f = slots[0]
        end = (now if f <= now else f) + svc
        heapq.heapreplace(slots, end)
        self.latency[k] = end - arrival
        if end > c.busy_until:
            c.busy_until = end

    # -- events -----------------------------------------------------------------------------

    def _events_until(self, t: float) -> None:
        events = self.events
        while events and events[0][0] <= t:
            at, _, kind, obj = heapq.heappop(events)
            if kind == EV_LOAD_DONE:
                self._load_done(obj, at)
            elif kind == EV_DOWN:
                self._instance_down(obj, at)
            else:
                self._instance_up(obj, at)

    def _drain_loads(self) -> None:
        """After the last request: finish the loads still running (crashes stop)."""
        events = self.events
        while events:
            at, _, kind, obj = heapq.heappop(events)
            if kind == EV_LOAD_DONE:
                self._load_done(obj, at)

    def _load_done(self, c: Copy, now: float) -> None:
        if c.gone:
            return
        inst, m = c.inst, c.m
        pool = inst.pools[self.dev[m]]
        rate = self.cfg.models.load_failure_rate
        if rate > 0 and self.random.random() < rate:
            self._load_failed(c, now)
            return
        pool.loading_bytes -= self.size[m]
        inst.loading -= 1
        c.state = LOADED
        inst.dirty = True
        self.stale.add(m)
        if c.waiters:
            waiters = c.waiters
            c.waiters = []
            for k, arrival, svc in waiters:
                self._serve(c, k, arrival, now, svc)

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

    def _apply_add(self, action: AddCopy, m: int, inst: Instance, now: float) -> None:
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

    def _apply_remove(self, m: int, inst: Instance, now: float) -> None:
        c = inst.copies.get(m)
        if c is None or c.state != LOADED or c.busy_until > now or c.waiters:
            return
        loaded = sum(1 for x in self.copies_of[m].values() if x.state == LOADED)
        if loaded < 2:
            return
        self._drop_copy(c)
        self.last_removed[m] = now
        self.counters["copies_removed"] += 1

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
