"""The cache under churn: loads serve their waiters, sizes stay within the capacity,
and models that come and go leave no per-model state (cache and prediction runner).

``SizedLoader`` is a test double for the file loader: it fabricates models whose
predicted size and measured size (``size_bytes`` once loaded) can differ, as a
compressed model file's do.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelmesh.batching import PredictionRunner
from modelmesh.cache.local import CacheEntry, CacheEvent, EventKind, ModelCache
from modelmesh.errors import CapacityExceeded, ModelLoadFailed
from modelmesh.registry.records import CopyState, ModelRecord
from modelmesh.runtimes.base import LoadedModel
from modelmesh.tensor import ModelSignature, Tensor
from placement import POLICIES, get_policy

MiB = 1 << 20


class SizedModel(LoadedModel):
    batchable = True

    def __init__(self, size: int) -> None:
        self.size_bytes = size
        self.signature = ModelSignature((), ())
        self.unloaded = False

    def predict(self, inputs: list[Tensor], parameters: Any) -> list[Tensor]:
        return inputs

    def unload(self) -> None:
        self.unloaded = True


class SizedLoader:
    """Predicts ``predicted[id]`` (or ``default``); the model measures ``measured[id]``."""

    def __init__(self, default: int = 100, *, predicted: dict[str, int] | None = None,
                 measured: dict[str, int] | None = None, delay: float = 0.0,
                 fail: frozenset[str] = frozenset()) -> None:
        self.default = default
        self.predicted = predicted or {}
        self.measured = measured or {}
        self.delay = delay
        self.fail = set(fail)
        self.loads: dict[str, int] = {}
        self.built: list[SizedModel] = []
        self._lock = threading.Lock()

    @property
    def total_loads(self) -> int:
        return sum(self.loads.values())

    def predict_size(self, record: ModelRecord) -> int:
        return self.predicted.get(record.model_id, self.default)

    def load(self, record: ModelRecord) -> LoadedModel:
        with self._lock:
            self.loads[record.model_id] = self.loads.get(record.model_id, 0) + 1
        if self.delay:
            time.sleep(self.delay)
        if record.model_id in self.fail:
            raise ValueError("corrupt model file")
        model = SizedModel(self.measured.get(record.model_id, self.predict_size(record)))
        with self._lock:
            self.built.append(model)
        return model


def rec(model_id: str) -> ModelRecord:
    return ModelRecord(model_id, "sklearn", f"{model_id}.joblib")


async def use(cache: ModelCache, model_id: str) -> CacheEntry:
    entry = await cache.acquire(rec(model_id))
    cache.release(entry)
    return entry


class UsedBytesWatch:
    """Samples ``used_bytes`` at every turn of the event loop (every await point)."""

    def __init__(self, cache: ModelCache) -> None:
        self.cache = cache
        self.max_used = 0
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            self.max_used = max(self.max_used, self.cache.used_bytes)
            await asyncio.sleep(0)

    async def stop(self) -> int:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return max(self.max_used, self.cache.used_bytes)


# -- item 2: a load's waiters are served by that load ------------------------------------

POLICY_NAMES = [None, *POLICIES]


@pytest.mark.parametrize("policy", POLICY_NAMES)
async def test_every_waiter_is_served_by_the_load_it_waited_for(policy: str | None) -> None:
    # 240 clients over 40 models of 10 MiB in 64 MiB: six fit, so loads evict all the time.
    loader = SizedLoader(10 * MiB)
    cache = ModelCache(64 * MiB, loader, policy=get_policy(policy) if policy else None)
    watch = UsedBytesWatch(cache)
    rng = random.Random(7)
    absent = 0
    wrong_copy: list[str] = []

    async def client() -> None:
        nonlocal absent
        for _ in range(5):
            model_id = f"m{rng.randrange(40)}"
            before = cache.get(model_id)  # what acquire sees: nothing runs in between
            if before is None:
                absent += 1
            entry = await cache.acquire(rec(model_id))
            try:
                if before is not None and entry is not before:
                    wrong_copy.append(model_id)
                assert entry.state is CopyState.LOADED and entry.model is not None
                await asyncio.sleep(0.005)  # the request runs
            finally:
                cache.release(entry)

    try:
        await asyncio.gather(*(client() for _ in range(240)))
        assert loader.total_loads <= absent, f"{loader.total_loads} loads for {absent} misses"
        assert wrong_copy == [], f"{len(wrong_copy)} waiters served by another copy"
        assert await watch.stop() <= cache.capacity_bytes
        assert all(e.in_use == 0 for e in cache.entries())
    finally:
        await cache.close()


@pytest.mark.parametrize("policy", POLICY_NAMES)
async def test_a_load_that_ends_while_another_makes_room_keeps_its_copy(
        policy: str | None) -> None:
    # Room for one model. When "a" finishes loading, a load of "b" starts at once and
    # wants a's bytes; a's waiters must still get a's copy (the one load of it).
    loader = SizedLoader(10)
    cache: ModelCache

    def on_event(ev: CacheEvent) -> None:
        if ev.kind is EventKind.LOADED and ev.model_id == "a":
            cache.ensure_loading(ModelRecord("b", "sklearn", "b.joblib", size_estimate=10))

    cache = ModelCache(10, loader, on_event=on_event, space_wait=5,
                       policy=get_policy(policy) if policy else None)
    try:
        first = cache.ensure_loading(rec("a"))
        got = await asyncio.gather(*(use(cache, "a") for _ in range(3)))
        assert all(e is first for e in got)
        assert loader.loads["a"] == 1
        b = cache.get("b")
        assert b is not None
        await asyncio.wait_for(asyncio.shield(b.ready), 5)  # b got a's room once they left
        assert cache.is_loaded("b") and not cache.is_loaded("a")
        assert cache.used_bytes == 10
    finally:
        await cache.close()


async def test_a_waiter_that_gives_up_leaves_no_pin() -> None:
    loader = SizedLoader(600, delay=0.2)
    cache = ModelCache(1000, loader, space_wait=2)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(cache.acquire(rec("a")), 0.05)  # as DataPlane.acquire
        entry = cache.get("a")
        assert entry is not None and entry.in_use == 0
        await asyncio.shield(entry.ready)
        assert cache.is_loaded("a") and entry.in_use == 0
        await use(cache, "b")  # a is idle: evicted to make room
        assert not cache.is_loaded("a") and cache.is_loaded("b")
    finally:
        await cache.close()


async def test_a_waiter_cancelled_as_its_load_ends_leaves_no_pin() -> None:
    waiter: asyncio.Task[CacheEntry] | None = None

    def on_event(ev: CacheEvent) -> None:
        if ev.kind is EventKind.LOADED and waiter is not None:
            waiter.cancel()  # the copy is LOADED, the waiter has not run yet

    cache = ModelCache(1000, SizedLoader(600, delay=0.05), on_event=on_event)
    try:
        waiter = asyncio.create_task(cache.acquire(rec("a")))
        with pytest.raises(asyncio.CancelledError):
            await waiter
        entry = cache.get("a")
        assert entry is not None and entry.state is CopyState.LOADED and entry.in_use == 0
    finally:
        await cache.close()


async def test_unloaded_while_loading_serves_its_waiters_then_leaves() -> None:
    loader = SizedLoader(100, delay=0.1)
    events: list[CacheEvent] = []
    cache = ModelCache(1000, loader, on_event=events.append)
    try:
        waiters = [asyncio.create_task(cache.acquire(rec("a"))) for _ in range(3)]
        await asyncio.sleep(0.02)  # the load is running
        first = cache.get("a")
        assert first is not None and first.state is CopyState.LOADING
        assert cache.unload("a")
        got = await asyncio.gather(*waiters)
        assert all(e is first for e in got) and cache.is_loaded("a")
        for entry in got:
            cache.release(entry)
        assert cache.get("a") is None and cache.used_bytes == 0
        assert loader.loads == {"a": 1}  # not loaded again by its waiters
        assert [e.kind for e in events] == ["loading", "loaded", "unloaded"]
    finally:
        await cache.close()


async def test_a_failed_load_fails_all_its_waiters_and_leaves_no_pin() -> None:
    loader = SizedLoader(100, delay=0.05, fail=frozenset({"bad"}))
    cache = ModelCache(1000, loader)
    try:
        results = await asyncio.gather(*(use(cache, "bad") for _ in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(r, ModelLoadFailed) for r in results)
        entry = cache.get("bad")
        assert entry is not None and entry.in_use == 0 and loader.loads == {"bad": 1}
    finally:
        await cache.close()


# -- item 3: a model larger than the capacity is not kept -------------------------------

async def test_a_model_measured_larger_than_the_capacity_is_unloaded_and_refused() -> None:
    # Predicted 100 bytes (a small compressed file), 5000 once loaded; capacity 1000.
    loader = SizedLoader(100, measured={"huge": 5000})
    events: list[CacheEvent] = []
    cache = ModelCache(1000, loader, failure_ttl=0.2, on_event=events.append)
    watch = UsedBytesWatch(cache)
    try:
        results = await asyncio.gather(*(use(cache, "huge") for _ in range(3)),
                                       return_exceptions=True)
        for r in results:
            assert isinstance(r, CapacityExceeded) and not r.transient, r
            assert "5000" in r.message and "1000" in r.message
        assert loader.built[0].unloaded and cache.used_bytes == 0
        assert await watch.stop() <= cache.capacity_bytes
        failed = [e for e in events if e.kind is EventKind.FAILED]
        assert len(failed) == 1 and failed[0].size_bytes == 5000
        with pytest.raises(CapacityExceeded):  # the same class in the failure window
            await use(cache, "huge")
        await asyncio.sleep(0.25)  # the window ends: refused before loading, by its size
        with pytest.raises(CapacityExceeded, match="5000"):
            await use(cache, "huge")
        assert loader.loads == {"huge": 1}
    finally:
        await cache.close()


async def test_a_model_predicted_larger_than_the_capacity_is_capacity_exceeded() -> None:
    cache = ModelCache(1000, SizedLoader(5000))
    try:
        with pytest.raises(CapacityExceeded, match="capacity"):
            await use(cache, "huge")
        with pytest.raises(CapacityExceeded):
            await use(cache, "huge")
    finally:
        await cache.close()


async def test_larger_than_predicted_next_to_models_in_use_fails_transiently() -> None:
    # "held" (600) is in use; "b" is predicted 100 but weighs 700: 1300 > 1000.
    loader = SizedLoader(100, predicted={"held": 600}, measured={"b": 700})
    cache = ModelCache(1000, loader, space_wait=5)
    watch = UsedBytesWatch(cache)
    try:
        held = await cache.acquire(rec("held"))
        with pytest.raises(CapacityExceeded, match="no room") as info:
            await use(cache, "b")
        assert info.value.transient
        assert loader.built[-1].unloaded and cache.used_bytes == 600
        # The retry reserves the measured 700 before loading: it waits for "held".
        retry = asyncio.create_task(use(cache, "b"))
        await asyncio.sleep(0.1)
        assert not retry.done() and loader.loads["b"] == 1
        cache.release(held)
        entry = await asyncio.wait_for(retry, 5)
        assert entry.size == 700 and cache.used_bytes == 700 and not cache.is_loaded("held")
        assert await watch.stop() <= cache.capacity_bytes
    finally:
        await cache.close()


async def test_larger_than_predicted_evicts_idle_models_within_the_capacity() -> None:
    loader = SizedLoader(100, predicted={"a": 500}, measured={"b": 700})
    cache = ModelCache(1000, loader)
    watch = UsedBytesWatch(cache)
    try:
        await use(cache, "a")
        await use(cache, "b")
        assert cache.is_loaded("b") and not cache.is_loaded("a") and cache.used_bytes == 700
        assert await watch.stop() <= cache.capacity_bytes
    finally:
        await cache.close()


async def test_a_compressed_joblib_that_unpacks_past_the_capacity(tmp_path: Path) -> None:
    # The real sklearn runtime: a small compressed file, a large estimator once loaded.
    joblib = pytest.importorskip("joblib")
    dummy = pytest.importorskip("sklearn.dummy")
    from modelmesh.runtimes import get_runtime

    estimator = dummy.DummyClassifier().fit(np.zeros((2, 1)), [0, 1])
    estimator.ballast_ = np.zeros(2 * MiB)  # 16 MiB of float64, compresses to almost nothing
    path = tmp_path / "model.joblib"
    joblib.dump(estimator, path, compress=3)
    runtime = get_runtime("sklearn")

    class FileLoader:
        def predict_size(self, record: ModelRecord) -> int:
            return runtime.predict_size(path)

        def load(self, record: ModelRecord) -> LoadedModel:
            return runtime.load(path, record.model_id)

    capacity = 4 * MiB
    assert FileLoader().predict_size(rec("zip")) < capacity  # the prediction lets it in
    cache = ModelCache(capacity, FileLoader())
    try:
        with pytest.raises(CapacityExceeded, match="once loaded"):
            await use(cache, "zip")
        assert cache.used_bytes == 0 and cache.loaded_count == 0
    finally:
        await cache.close()


# -- item 4: per-model state is forgotten -----------------------------------------------

async def test_forgotten_models_leave_no_cache_records() -> None:
    loader = SizedLoader(10, fail=frozenset({f"m{i}" for i in range(0, 3000, 7)}))
    cache = ModelCache(1000, loader)
    try:
        for i in range(3000):
            model_id = f"m{i}"
            try:
                await use(cache, model_id)
            except ModelLoadFailed:
                pass
            cache.forget(model_id)
        await cache.settle()
        assert cache.entries() == [] and cache.usage == {} and cache.used_bytes == 0
    finally:
        await cache.close()


async def test_forget_waits_for_requests_in_flight() -> None:
    loader = SizedLoader(10)
    events: list[CacheEvent] = []
    cache = ModelCache(1000, loader, on_event=events.append)
    try:
        held = await cache.acquire(rec("a"))
        cache.forget("a")
        assert cache.is_loaded("a")  # still serving the request in flight
        again = await cache.acquire(rec("a"))  # one that was already routed here
        cache.release(held)
        assert cache.is_loaded("a")
        cache.release(again)
        assert cache.get("a") is None and "a" not in cache.usage
        assert events[-1].kind is EventKind.UNLOADED and events[-1].reason == "unregistered"
    finally:
        await cache.close()


async def test_forget_while_loading_serves_the_waiters_then_forgets() -> None:
    cache = ModelCache(1000, SizedLoader(10, delay=0.05))
    try:
        waiters = [asyncio.create_task(cache.acquire(rec("a"))) for _ in range(2)]
        await asyncio.sleep(0.01)
        cache.forget("a")
        for entry in await asyncio.gather(*waiters):
            cache.release(entry)
        assert cache.get("a") is None and cache.usage == {}
        cache.ensure_loading(rec("b"))
        cache.forget("b")  # queued or loading, no waiter
        await cache.settle()
        assert cache.entries() == [] and cache.usage == {}
    finally:
        await cache.close()


def rows(n: int, value: float = 1.0) -> list[Tensor]:
    return [Tensor("x", "FP32", np.full((n, 2), value, np.float32))]


async def test_forgotten_models_leave_no_runner_state() -> None:
    with ThreadPoolExecutor(2) as executor:
        runner = PredictionRunner(executor)
        model = SizedModel(10)
        for i in range(1000):
            model_id = f"m{i}"
            await asyncio.gather(*(runner.predict(model_id, model, rows(1, j), {}, ())
                                   for j in range(3)))  # merged: the batcher keeps traffic
            unbatched = SizedModel(10)
            unbatched.batchable = False
            await runner.predict(model_id, unbatched, rows(1), {}, ())
            runner.forget(model_id)
        assert runner.tracked() == 0
        assert runner.batcher._traffic == {} and runner.batcher._pending == {}


async def test_forget_does_not_break_a_batch_in_flight() -> None:
    with ThreadPoolExecutor(2) as executor:
        runner = PredictionRunner(executor, max_batch_delay_ms=20)
        model = SizedModel(10)
        await runner.predict("m", model, rows(1), {}, ())  # a measured, waiting batch
        calls = [asyncio.create_task(runner.predict("m", model, rows(1, j), {}, ()))
                 for j in range(4)]
        await asyncio.sleep(0)  # they have joined an open batch
        runner.forget("m")
        assert runner.tracked() == 1  # still in flight
        results = await asyncio.gather(*calls)
        assert [float(out[0].data[0, 0]) for out, _ in results] == [0.0, 1.0, 2.0, 3.0]
        assert runner.tracked() == 0 and runner.batcher._traffic == {}
        await runner.predict("m", model, rows(1), {}, ())  # served again afterwards
        assert runner.typical_ns("m") > 0
