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
