"""Eviction through the placement policy, in a real ModelCache with a stand-in loader.

``_Loader`` is a test double for the file loader: it fabricates models of chosen sizes.
"""

from __future__ import annotations

import asyncio

import pytest

from modelmesh.cache.local import ModelCache
from modelmesh.registry.records import ModelRecord
from modelmesh.runtimes.base import LoadedModel
from modelmesh.tensor import ModelSignature
from placement import get_policy


class _Model(LoadedModel):
    def __init__(self, size: int) -> None:
        self.size_bytes = size
        self.signature = ModelSignature((), ())

    def predict(self, inputs, parameters):
        return []


class _Loader:
    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes

    def predict_size(self, record: ModelRecord) -> int:
        return self.sizes[record.model_id]

    def load(self, record: ModelRecord) -> LoadedModel:
        return _Model(self.sizes[record.model_id])


def _rec(model_id: str) -> ModelRecord:
    return ModelRecord(model_id, "identity", f"{model_id}.json")


async def _use(cache: ModelCache, model_id: str, times: int = 1) -> None:
    for _ in range(times):
        entry = await cache.acquire(_rec(model_id))
        cache.release(entry)


async def test_density_keeps_the_busy_small_model_over_the_recent_big_one() -> None:
    sizes = {"small-hot": 100, "big": 600, "new": 400}
    cache = ModelCache(1000, _Loader(sizes), policy=get_policy("density"))
    try:
        await _use(cache, "small-hot", 20)
        await _use(cache, "big")
        await _use(cache, "new")  # needs 400: evicting "big" (used once, large) frees enough
        assert cache.get("small-hot") is not None
        assert cache.get("big") is None
        assert cache.get("new") is not None
    finally:
        await cache.close()


async def test_lru_policy_evicts_least_recently_used() -> None:
    sizes = {"a": 400, "b": 400, "c": 400}
    cache = ModelCache(1000, _Loader(sizes), policy=get_policy("lru"))
    try:
        await _use(cache, "a", 5)
        await asyncio.sleep(0.01)
        await _use(cache, "b")
        await asyncio.sleep(0.01)
        await _use(cache, "c")
        assert cache.get("a") is None and cache.get("b") is not None
    finally:
        await cache.close()


async def test_models_in_use_are_never_evicted() -> None:
    sizes = {"held": 600, "other": 600}
    cache = ModelCache(1000, _Loader(sizes), policy=get_policy("density"), space_wait=0.2)
    try:
        held = await cache.acquire(_rec("held"))
        with pytest.raises(Exception, match="no room"):
            await _use(cache, "other")
        assert cache.get("held") is not None
        cache.release(held)
        await _use(cache, "other")
        assert cache.get("held") is None
    finally:
        await cache.close()


async def test_memory_summary_matches_the_snapshots() -> None:
    """The one-pass summary equals placement's own summary of the full snapshot."""
    sizes = {f"m{i}": 100 + i for i in range(6)}
    cache = ModelCache(10_000, _Loader(sizes), policy=get_policy("density"))
    try:
        for i in range(6):
            await _use(cache, f"m{i}", i + 1)
        held = await cache.acquire(_rec("m2"))  # pinned while in use
        fresh, expected = cache.memory(max_age=0), cache.snapshot().memory()
        assert fresh.pinned_bytes == 102 and fresh.used_bytes == sum(sizes.values())
        assert (fresh.capacity_bytes, fresh.used_bytes, fresh.pinned_bytes,
                fresh.min_priority) == (expected.capacity_bytes, expected.used_bytes,
                                        expected.pinned_bytes, expected.min_priority)
        assert fresh.lru_time == pytest.approx(expected.lru_time, abs=0.01)
        cache.release(held)
        for i in range(6):
            await cache.acquire(_rec(f"m{i}"))
        pinned = cache.memory(max_age=0)  # nothing evictable
        assert (pinned.pinned_bytes, pinned.lru_time, pinned.min_priority) == (615, None, None)
    finally:
        await cache.close()


def test_lowest_priority_first_chooses_as_the_policy_would() -> None:
    """The cache's own walk picks the same victims and clock as ``Policy.evict`` does."""
    import random

    from modelmesh.cache.entries import CacheEntry
    from modelmesh.cache.eviction import snapshot, victims
    from modelmesh.registry.records import CopyState

    base = get_policy("density")

    class Generic(type(base)):  # type: ignore[misc]
        def evict(self, cache, bytes_needed, *, below=None):  # goes through the snapshot
            return super().evict(cache, bytes_needed, below=below)

    generic = Generic()
    rng = random.Random(7)
    loop = asyncio.new_event_loop()
    try:
        for trial in range(200):
            entries = []
            for i in range(rng.randint(0, 30)):
                e = CacheEntry(f"m{i:02d}", loop.create_future())
                e.state = rng.choice([CopyState.LOADED] * 4 + [CopyState.LOADING])
                e.size = rng.choice([0, 50, 100, 300])
                e.in_use = rng.choice([0, 0, 0, 1])
                e.priority = rng.choice([0.5, 1.0, 2.0, rng.random()])
                entries.append(e)
            keep = rng.choice(entries) if entries and trial % 3 == 0 else None
            needed = rng.choice([0, 1, 100, 400, 2000])
            clock = rng.random()

            def snap(keep=keep, entries=entries, clock=clock):
                return snapshot(entries, 5000, clock, keep)

            assert victims(entries, needed, keep, base, snap, clock) == \
                victims(entries, needed, keep, generic, snap, clock), trial
    finally:
        loop.close()
