"""The offline optimum to compare policies against.

Equal sizes: Belady's MIN
    With every model the same size, the cluster holds at most
    sum over instances of floor(capacity / size) models. On a miss, MIN evicts
    the cached model whose next request is furthest in the future. It is
    optimal among demand-loading caches (a model must be loaded to be served),
    which is what a mesh is; splitting memory into instances and keeping more
    than one copy can only lose hits, so no placement policy can beat it.

Unequal sizes: an interval-knapsack upper bound
    With sizes, exact offline optimal caching is NP-hard. Instead, each pair of
    consecutive requests for a model (positions i < j in the trace) is an
    interval that yields a hit at j if the model stays cached from i to j,
    at a cost of size x (j - i) byte-requests. At every point of the trace the
    cached bytes are at most the cluster's capacity C, so any caching
    strategy's hit intervals cost at most C x n in total (n requests). Taking
    the cheapest intervals until that budget is spent therefore gives at least
    as many hits as any real strategy: an *upper bound*, not an achievable
    schedule. It is the "PFOO-U" bound of Berger, Beckmann and Harchol-Balter,
    "Practical Bounds on Optimal Caching with Variable Object Sizes" (2018).
    Its latencies assume no queueing; it reports no evictions.

CPU and GPU models are bounded separately, each against its own memory.
"""

from __future__ import annotations

import heapq
import time as wallclock
from typing import Any

import numpy as np

from simulations.config import SimulationConfig
from simulations.engine import COLD, HIT, RunResult
from simulations.metrics import summarize
from simulations.traces import Trace
from simulations.workload import ModelTable


def next_use(models: np.ndarray) -> np.ndarray:
    """For each request, the position of the next request for the same model (n if none)."""
    n = len(models)
    order = np.lexsort((np.arange(n), models))
    nxt = np.full(n, n, dtype=np.int64)
    if n > 1:
        same = models[order[1:]] == models[order[:-1]]
        nxt[order[:-1][same]] = order[1:][same]
    return nxt


def belady(models: np.ndarray, slots: int) -> tuple[np.ndarray, int, float]:
    """MIN over a cache of ``slots`` equal-size models: (hit mask, evictions, mean fill)."""
    n = len(models)
    hits = np.zeros(n, dtype=bool)
    if slots <= 0:
        return hits, 0, 0.0
    nxt = next_use(models).tolist()
    seq = models.tolist()
    cache: dict[int, int] = {}
    heap: list[tuple[int, int]] = []
    evictions = 0
    filled = 0
    for k in range(n):
        m = seq[k]
        nu = nxt[k]
        if m in cache:
            hits[k] = True
        elif len(cache) >= slots:
            while True:
                neg, victim = heapq.heappop(heap)
                if cache.get(victim) == -neg:
                    del cache[victim]
                    evictions += 1
                    break
        cache[m] = nu
        heapq.heappush(heap, (-nu, m))
        filled += len(cache)
    return hits, evictions, filled / (n * slots)


def interval_bound(models: np.ndarray, sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Hit mask of the interval-knapsack upper bound for a cache of ``capacity`` bytes."""
    n = len(models)
    hits = np.zeros(n, dtype=bool)
    if n == 0 or capacity <= 0:
        return hits
    nxt = next_use(models)
    start = np.nonzero(nxt < n)[0]
    end = nxt[start]
    cost = sizes[models[start]].astype(np.float64) * (end - start)
    order = np.argsort(cost, kind="stable")
    spent = np.cumsum(cost[order])
    taken = order[spent <= float(capacity) * n]
    hits[end[taken]] = True
    return hits


def run_optimal(cfg: SimulationConfig, models: ModelTable, trace: Trace) -> RunResult:
    """The optimum (or bound) for this workload, summarised like a policy run."""
    started = wallclock.perf_counter()
    n = len(trace)
    seq = trace.models
    hits = np.zeros(n, dtype=bool)
    evictions: int | None = 0
    fills: list[float] = []
    equal = bool(np.all(models.sizes == models.sizes[0]))
    cl = cfg.cluster
    pools = [(False, cl.capacity_bytes, cl.instances)]
    if cl.gpu_instances and cl.gpu_capacity_bytes:
        pools.append((True, cl.gpu_capacity_bytes, cl.gpu_instances))
    for gpu, cap, count in pools:
        on_device = np.nonzero(models.gpu[seq] == gpu)[0]
        if not len(on_device):
            continue
        sub = seq[on_device]
        if equal:
            slots = count * (cap // int(models.sizes[0]))
            h, ev, fill = belady(sub, slots)
            assert evictions is not None
            evictions += ev
            fills.append(fill)
        else:
            h = interval_bound(sub, models.sizes, cap * count)
            evictions = None
        hits[on_device] = h
    method = "belady" if equal else "interval-knapsack upper bound"

    sigma = cfg.models.inference_sigma
    rng = np.random.default_rng(cfg.seed + 2)  # the same draws as the simulator's
    svc = models.service_seconds[seq] * np.exp(sigma * rng.standard_normal(n) - sigma**2 / 2)
    latency = svc + np.where(hits, 0.0, models.load_seconds[seq])
    outcome = np.where(hits, HIT, COLD).astype(np.int8)
    start = cfg.warmup_s
    end = float(trace.times[-1]) if n else 0.0
    in_window = trace.times >= start
    counts: dict[str, Any] = {
        "loads": int(np.count_nonzero(~hits & in_window)),
        "evictions": evictions,
        "mean_memory_utilization": float(np.mean(fills)) if fills else None,
        "mean_copies_per_model": 1.0,
        "method": method,
        "wall_s": wallclock.perf_counter() - started,
    }
    metrics = summarize(trace.times, outcome, latency, start=start, end=end, counts=counts)
    return RunResult(
        label="optimal",
        policy="optimal",
        metrics=metrics,
        times=trace.times,
        outcome=outcome,
        latency_s=latency,
        memory_curve=None,
    )
