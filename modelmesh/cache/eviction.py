"""Which loaded models the cache evicts to make room, and the cache as placement sees it.

Pure functions over the cache's entries (in LRU order, oldest first); the cache
itself does the evicting.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable

from modelmesh.cache.entries import CacheEntry
from modelmesh.registry.records import CopyState
from placement import CachedModel, InstanceCache, Memory, Policy


def victims(entries: Iterable[CacheEntry], needed: int, keep: CacheEntry | None,
            policy: Policy | None, snap: Callable[[], InstanceCache],
            clock: float) -> tuple[list[str], float]:
    """(the models to evict to free ``needed`` bytes, the pool's clock after that).

    Without a policy: idle loaded models, least recently used first, until
    ``needed`` is reached. With one: the policy's choice on ``snap()``; when it
    cannot free it all, every idle model, lowest retention priority first.
    """
    if policy is None:
        chosen, freed = [], 0
        for entry in entries:
            if freed >= needed:
                break
            if entry is not keep and entry.state is CopyState.LOADED and not entry.in_use:
                chosen.append(entry.model_id)
                freed += entry.size
        return chosen, clock
    if _plain_eviction(policy):
        return _lowest_priority_first(entries, needed, keep, clock)
    snapshot_ = snap()
    picked = policy.evict(snapshot_, snapshot_.free_bytes + needed)
    if picked is None:
        picked = [e.model_id for e in sorted(
            (e for e in snapshot_.entries if not e.in_use),
            key=lambda e: (e.priority, e.model_id))]
    return picked, policy.clock_after_evict(snapshot_, picked)


def _plain_eviction(policy: Policy) -> bool:
    """Whether ``policy`` evicts as ``Policy`` does: lowest retention priority first."""
    cls = type(policy)
    return cls.evict is Policy.evict and cls.clock_after_evict is Policy.clock_after_evict


def _lowest_priority_first(entries: Iterable[CacheEntry], needed: int,
                           keep: CacheEntry | None, clock: float) -> tuple[list[str], float]:
    """``Policy.evict`` and ``clock_after_evict`` worked out on the entries themselves.

    The same choice (idle loaded models by (priority, id) until ``needed`` is
    freed; every idle one when that is not enough) without building the
    snapshot, which under churn was most of the cost of making room.
    """
    idle = [(e.priority, e.model_id, e.size) for e in entries
            if e.size > 0 and e is not keep and e.state is CopyState.LOADED and not e.in_use]
    heapq.heapify(idle)
    chosen: list[str] = []
    freed = 0
    top = clock
    while idle and freed < needed:
        priority, model_id, size = heapq.heappop(idle)
        chosen.append(model_id)
        freed += size
        top = max(top, priority)
    return chosen, top


def snapshot(entries: Iterable[CacheEntry], capacity_bytes: int, clock: float,
             keep: CacheEntry | None = None) -> InstanceCache:
    """The cache as placement's ``InstanceCache`` (in use or loading count as pinned)."""
    mono, wall = time.monotonic(), time.time()
    return InstanceCache(
        instance_id="", capacity_bytes=capacity_bytes, clock=clock,
        entries=tuple(
            CachedModel(
                e.model_id, e.size, e.priority, wall - (mono - e.last_used),
                in_use=e is keep or e.state is not CopyState.LOADED or e.in_use > 0,
            )
            for e in entries if e.size > 0
        ),
    )


def memory_of(entries: Iterable[CacheEntry], capacity_bytes: int) -> Memory:
    """``snapshot(...).memory()`` in one pass, without building the snapshot.

    Asked for by routing and the instance record many times a second; with
    thousands of models the snapshot's objects were most of its cost.
    """
    used = pinned = 0
    lru: float | None = None
    lowest: float | None = None
    for e in entries:
        size = e.size
        if size <= 0:
            continue
        used += size
        if e.state is not CopyState.LOADED or e.in_use > 0:
            pinned += size
            continue
        if lru is None or e.last_used < lru:
            lru = e.last_used
        if lowest is None or e.priority < lowest:
            lowest = e.priority
    wall = None if lru is None else time.time() - (time.monotonic() - lru)
    return Memory(capacity_bytes, used, pinned, wall, lowest)
