"""The local cache's rules, with a stand-in loader (no model files, no processes).

``StandInLoader`` is a test double for the real file loader: it fabricates
models of chosen sizes and counts how often each is loaded.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from modelmesh.cache.local import CacheEvent, ModelCache
from modelmesh.errors import CapacityExceeded, ModelLoadFailed
from modelmesh.registry.records import CopyState, ModelRecord
from modelmesh.runtimes.base import LoadedModel
from modelmesh.tensor import ModelSignature


class StandInModel(LoadedModel):
    def __init__(self, size: int) -> None:
        self.size_bytes = size
        self.signature = ModelSignature((), ())
        self.unloaded = False

    def predict(self, inputs, parameters):
        return []

    def unload(self) -> None:
        self.unloaded = True


class StandInLoader:
    def __init__(self, sizes: dict[str, int], delay: float = 0.0, fail: set[str] = frozenset()):
        self.sizes = sizes
        self.delay = delay
        self.fail = set(fail)
        self.loads: dict[str, int] = {}
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self.models: dict[str, StandInModel] = {}

    def predict_size(self, record: ModelRecord) -> int:
        return self.sizes[record.model_id]

    def load(self, record: ModelRecord) -> LoadedModel:
        with self._lock:
            self.loads[record.model_id] = self.loads.get(record.model_id, 0) + 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay)
            if record.model_id in self.fail:
                raise ValueError("corrupt model file")
            model = StandInModel(self.sizes[record.model_id])
            self.models[record.model_id] = model
            return model
        finally:
            with self._lock:
                self.active -= 1


def rec(model_id: str) -> ModelRecord:
    return ModelRecord(model_id, "sklearn", f"{model_id}.joblib")


async def use(cache: ModelCache, model_id: str) -> None:
    entry = await cache.acquire(rec(model_id))
    cache.release(entry)


async def test_single_load_for_concurrent_requests() -> None:
    loader = StandInLoader({"a": 100}, delay=0.2)
    cache = ModelCache(1000, loader)
    await asyncio.gather(*(use(cache, "a") for _ in range(50)))
    assert loader.loads == {"a": 1}
    assert cache.is_loaded("a") and cache.used_bytes == 100
    await cache.close()


async def test_lru_eviction_keeps_within_capacity() -> None:
    loader = StandInLoader({m: 400 for m in "abcd"})
    events: list[CacheEvent] = []
    cache = ModelCache(1000, loader, on_event=events.append)
    await use(cache, "a")
    await use(cache, "b")
    await use(cache, "a")  # a is now more recent than b
    await use(cache, "c")  # needs 400 more: b (least recently used) goes
    assert cache.is_loaded("a") and cache.is_loaded("c") and not cache.is_loaded("b")
    assert cache.used_bytes == 800 <= cache.capacity_bytes
    assert [e.model_id for e in events if e.kind == "unloaded"] == ["b"]
    await asyncio.sleep(0.1)  # unload runs in the loader thread pool
    assert loader.models["b"].unloaded
    await cache.close()


async def test_model_in_use_is_never_evicted() -> None:
    loader = StandInLoader({"a": 600, "b": 600})
    cache = ModelCache(1000, loader, space_wait=5)
    held = await cache.acquire(rec("a"))
    load_b = asyncio.create_task(use(cache, "b"))
    await asyncio.sleep(0.2)
    assert cache.is_loaded("a") and not load_b.done()  # b waits for a to be released
    cache.release(held)
    await asyncio.wait_for(load_b, 5)
    assert cache.is_loaded("b") and not cache.is_loaded("a")
    await cache.close()


async def test_no_room_while_everything_is_in_use() -> None:
    loader = StandInLoader({"a": 600, "b": 600})
    cache = ModelCache(1000, loader, space_wait=0.3)
    held = await cache.acquire(rec("a"))
    with pytest.raises(CapacityExceeded, match="no room"):
        await use(cache, "b")
    cache.release(held)
    await cache.close()


async def test_model_larger_than_capacity_fails_clearly() -> None:
    cache = ModelCache(1000, StandInLoader({"huge": 5000}))
    with pytest.raises(CapacityExceeded, match="capacity"):
        await use(cache, "huge")
    await cache.close()


async def test_failures_are_remembered_until_they_expire() -> None:
    loader = StandInLoader({"bad": 10}, fail={"bad"})
    cache = ModelCache(1000, loader, failure_ttl=0.3)
    for _ in range(5):
        with pytest.raises(ModelLoadFailed, match="corrupt model file"):
            await use(cache, "bad")
    assert loader.loads == {"bad": 1}  # no retry storm
    assert cache.get("bad").state is CopyState.FAILED
    await asyncio.sleep(0.35)
    loader.fail.clear()
    await use(cache, "bad")  # expired: retried, and now it works
    assert loader.loads == {"bad": 2} and cache.is_loaded("bad")
    await cache.close()


async def test_concurrent_loads_are_bounded() -> None:
    loader = StandInLoader({f"m{i}": 10 for i in range(8)}, delay=0.1)
    cache = ModelCache(10_000, loader, max_concurrent_loads=2)
    await asyncio.gather(*(use(cache, f"m{i}") for i in range(8)))
    assert loader.max_active == 2
    assert cache.loaded_count == 8
    await cache.close()


async def test_unload_waits_for_in_flight_requests() -> None:
    loader = StandInLoader({"a": 10})
    cache = ModelCache(1000, loader)
    held = await cache.acquire(rec("a"))
    assert cache.unload("a")
    assert cache.is_loaded("a")  # still serving the in-flight request
    cache.release(held)
    assert not cache.is_loaded("a") and cache.used_bytes == 0
    await cache.close()


async def test_measured_size_larger_than_predicted_evicts_others() -> None:
    loader = StandInLoader({"a": 500, "b": 100})
    cache = ModelCache(1000, loader)
    await use(cache, "a")
    loader.sizes["b"] = 100
    cache_b_record = rec("b")
    # predicted 100, but the model turns out to weigh 700
    loader_load = loader.load

    def heavier(record):
        model = loader_load(record)
        model.size_bytes = 700
        return model

    loader.load = heavier  # type: ignore[method-assign]
    entry = await cache.acquire(cache_b_record)
    cache.release(entry)
    assert cache.used_bytes <= 1000 and not cache.is_loaded("a")
    await cache.close()


async def test_counts_follow_every_state_change() -> None:
    loader = StandInLoader({"a": 100, "b": 100, "c": 100, "bad": 10}, delay=0.05, fail={"bad"})
    cache = ModelCache(1000, loader, failure_ttl=0.0)
    assert (cache.loaded_count, cache.loading_count) == (0, 0)
    entry = cache.ensure_loading(rec("a"))
    assert (cache.loaded_count, cache.loading_count) == (0, 1)
    await entry.ready
    assert (cache.loaded_count, cache.loading_count) == (1, 0)
    await asyncio.gather(use(cache, "b"), use(cache, "c"))
    with pytest.raises(ModelLoadFailed):
        await use(cache, "bad")
    assert (cache.loaded_count, cache.loading_count) == (3, 0)
    cache.unload("b")
    assert (cache.loaded_count, cache.loading_count) == (2, 0)
    assert cache.memory(max_age=0).used_bytes == 200
    await cache.close()
    assert (cache.loaded_count, cache.loading_count) == (0, 0)


async def test_loaded_and_loading_counts_follow_every_change() -> None:
    """The counts kept as entries change agree with a recount after each kind of change."""
    sizes = {f"m{i}": 100 for i in range(12)} | {"big": 5000}
    loader = StandInLoader(sizes, delay=0.01, fail={"m3"})
    cache = ModelCache(450, loader, failure_ttl=0.0)

    def recount() -> tuple[int, int]:
        states = [e.state for e in cache.entries()]
        return states.count(CopyState.LOADED), states.count(CopyState.LOADING)

    def check() -> None:
        assert (cache.loaded_count, cache.loading_count) == recount()

    pending = [asyncio.ensure_future(use(cache, f"m{i}")) for i in range(6)]
    await asyncio.sleep(0)
    check()  # some loading
    await asyncio.gather(*pending, return_exceptions=True)  # m3 failed, evictions made room
    check()
    assert cache.loaded_count == 4
    for model_id in ("m3", "big"):  # an expired failure retried; one too big for the cache
        with pytest.raises((ModelLoadFailed, CapacityExceeded)):
            await use(cache, model_id)
        check()
    cache.unload("m5")
    cache.forget("m4")
    check()
    entry = await cache.acquire(rec("m7"))
    cache.unload("m7")  # in use: leaves when released
    check()
    cache.release(entry)
    check()
    await cache.close()
    assert (cache.loaded_count, cache.loading_count) == (0, 0) == recount()


async def test_size_and_load_in_one_hop_when_it_fits_else_room_made_first() -> None:
    """With room to spare the size is predicted and the model loaded in one thread job;
    near full, the size comes back alone and the load waits for the room it needs."""
    sizes = {"a": 100, "b": 100, "c": 100, "big": 400}
    loader = StandInLoader(sizes)
    calls: list[tuple[str, str, int]] = []
    predict, load = loader.predict_size, loader.load

    def traced_predict(record):
        calls.append(("predict", record.model_id, threading.get_ident()))
        return predict(record)

    def traced_load(record):
        calls.append(("load", record.model_id, threading.get_ident()))
        used.append(cache.used_bytes)
        return load(record)

    used: list[int] = []
    loader.predict_size, loader.load = traced_predict, traced_load  # type: ignore[method-assign]
    cache = ModelCache(1000, loader)
    try:
        await use(cache, "a")  # 1000 free: budget 125 holds its 100
        assert [c[:2] for c in calls] == [("predict", "a"), ("load", "a")]
        # One thread job; the 125 bytes held meanwhile are not shown as used bytes.
        assert calls[0][2] == calls[1][2] and used == [0]
        await use(cache, "big")  # 900 free: budget 125 < 400, so it is loaded after the size
        await use(cache, "b")
        await use(cache, "c")  # 400 free: budget 125 fits 100
        assert cache.used_bytes == 700 and all(u <= 1000 for u in used)
        calls.clear()
        cache.capacity_bytes = 700  # now full: no budget, the usual two steps
        cache.unload("c")
        await use(cache, "c")
        assert [c[0] for c in calls] == ["predict", "load"] and cache.used_bytes <= 700
    finally:
        await cache.close()


class LocalLoader(StandInLoader):
    """A stand-in whose models are all on local disk (``inline``), recording the thread
    each load ran on; ``slow`` models take that long to load (seconds of thread CPU)."""

    def __init__(self, sizes: dict[str, int], slow: dict[str, float] | None = None,
                 local: bool = True) -> None:
        super().__init__(sizes)
        self.slow = slow or {}
        self.local = local
        self.threads: dict[str, int] = {}

    def inline(self, record: ModelRecord) -> bool:
        return self.local

    def load(self, record: ModelRecord) -> LoadedModel:
        self.threads[record.model_id] = threading.get_ident()
        end = time.thread_time() + self.slow.get(record.model_id, 0.0)
        while time.thread_time() < end:  # CPU, as an unpickle takes it
            pass
        return super().load(record)


async def test_small_local_models_load_on_the_event_loop_once_their_kind_is_quick() -> None:
    loop_thread = threading.get_ident()
    loader = LocalLoader({"first": 100, "second": 100, "big": 2 << 20, "third": 100})
    cache = ModelCache(10 << 20, loader)
    for model_id in ("first", "second", "big", "third"):
        await use(cache, model_id)
    assert loader.threads["first"] != loop_thread  # its kind's first load: measured in a thread
    assert loader.threads["second"] == loop_thread
    assert loader.threads["big"] != loop_thread  # over INLINE_LOAD_BYTES
    assert loader.threads["third"] == loop_thread
    assert all(cache.is_loaded(m) for m in loader.threads)


async def use_in_turn(cache: ModelCache, *model_ids: str) -> None:
    """``use`` each model in turn, then close the cache."""
    try:
        for model_id in model_ids:
            await use(cache, model_id)
    finally:
        await cache.close()


class WaitingLoader(LocalLoader):
    """A stand-in whose loads wait 10 ms (as a load waiting for the GIL or a slow disk
    does) while taking next to no CPU."""

    def load(self, record: ModelRecord) -> LoadedModel:
        time.sleep(0.01)
        return super().load(record)


async def test_inline_loads_are_timed_by_their_cpu_not_their_wall_clock() -> None:
    """Timed by the wall clock, the waiting load would count 10 ms, over INLINE_LOAD_NS,
    and send its kind back to a thread; by its CPU it stays on the loop."""
    loop_thread = threading.get_ident()
    loader = WaitingLoader({"first": 100, "second": 100, "third": 100})
    await use_in_turn(ModelCache(1 << 20, loader), "first", "second", "third")
    assert loader.threads["first"] != loop_thread
    assert loader.threads["second"] == loop_thread
    assert loader.threads["third"] == loop_thread


class ImportingLoader(LocalLoader):
    """A stand-in whose first load imports a module (a stand-in one), as a format's first
    load imports its library."""

    def load(self, record: ModelRecord) -> LoadedModel:
        import sys
        import types

        if record.model_id == "first":
            sys.modules["_stand_in_format_library"] = types.ModuleType("stand-in")
        return super().load(record)


async def test_a_formats_first_load_with_its_imports_is_not_its_typical_load() -> None:
    """The first load took 5 ms of CPU importing; counted, it would keep the next loads
    off the loop until the average forgot it. Not counted, the second load is measured
    (in a thread) and the third runs inline."""
    import sys

    loop_thread = threading.get_ident()
    loader = ImportingLoader({"first": 100, "second": 100, "third": 100}, slow={"first": 0.005})
    try:
        await use_in_turn(ModelCache(1 << 20, loader), "first", "second", "third")
    finally:
        sys.modules.pop("_stand_in_format_library", None)
    assert loader.threads["second"] != loop_thread
    assert loader.threads["third"] == loop_thread


async def test_remote_or_slow_loads_stay_in_threads() -> None:
    loop_thread = threading.get_ident()
    remote = LocalLoader({"a": 100, "b": 100}, local=False)
    cache = ModelCache(1 << 20, remote)
    await use(cache, "a")
    await use(cache, "b")
    assert loop_thread not in remote.threads.values()

    # A kind whose loads took 5 ms of CPU: every load of it goes to a thread.
    slow = LocalLoader({"s1": 100, "s2": 100}, slow={"s1": 0.005, "s2": 0.005})
    cache = ModelCache(1 << 20, slow)
    await use(cache, "s1")
    await use(cache, "s2")
    assert loop_thread not in slow.threads.values()

    # A loader without the capability (the remote runtimes' loaders) never loads inline.
    plain = StandInLoader({"p1": 100, "p2": 100})
    cache = ModelCache(1 << 20, plain)
    seen = []
    original = plain.load
    plain.load = lambda record: seen.append(threading.get_ident()) or original(record)
    await use(cache, "p1")
    await use(cache, "p2")
    assert loop_thread not in seen and len(seen) == 2
