"""The models loaded on this instance: a byte-capacity LRU with single-flight loads.

Rules the cache keeps:
- every model is loaded at most once however many requests arrive while it loads:
  they all wait on the same load and are served by the copy it loaded (a waiting
  request pins the copy like a request in flight, so no other load's room-making
  can evict it before the waiters run; a waiter that gives up unpins it);
- at most ``max_concurrent_loads`` loads run at a time;
- the bytes of loaded and loading models never exceed ``capacity_bytes`` at any
  await point: a load reserves its predicted size before it starts, and a larger
  measured size is made room for before it is counted, by evicting models no
  request uses, in the placement policy's ``evict`` order (least recently used
  first without a policy);
- a model in use is never evicted; a load that needs its bytes waits (up to
  ``space_wait``) before it starts. A model larger than predicted is not held
  beyond the capacity meanwhile: it is unloaded and the load fails transiently
  (``CapacityExceeded``; the next request reserves the measured size up front);
- a model larger than the capacity is refused (``CapacityExceeded``) before loading
  when its predicted or measured size says so, else after; the measured size goes
  with the failure (and the FAILED event), so the next attempt is refused up front;
- a failed load is remembered for ``failure_ttl`` seconds (its error returned at
  once, no retry loop), unless it may pass on its own (no room right now);
- a model unloaded while it loads still serves the requests waiting for it, then
  goes; ``forget`` also drops its use history and remembered failure.

Loading and unloading run in a thread pool; the event loop only does bookkeeping,
except for small local models that load quickly (``entries.LoadTimes``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from modelmesh.cache.entries import (
    CacheEntry,
    CacheEvent,
    EventKind,
    LoadTimes,
    ModelLoader,
    UnloadReason,
    Usage,
    predict_then_load,
    size_phrase,
)
from modelmesh.cache.eviction import memory_of, snapshot, victims
from modelmesh.errors import CapacityExceeded, ModelLoadFailed, Unavailable
from modelmesh.registry.records import CopyState, ModelRecord
from modelmesh.runtimes.base import LoadedModel
from placement import InstanceCache, Memory, Policy, rate_after_request

__all__ = ["CacheEntry", "CacheEvent", "EventKind", "ModelCache", "ModelLoader",
           "UnloadReason", "Usage"]

log = logging.getLogger(__name__)


class ModelCache:
    """Models resident on this instance, within ``capacity_bytes``."""

    def __init__(
        self,
        capacity_bytes: int,
        loader: ModelLoader,
        *,
        max_concurrent_loads: int = 2,
        failure_ttl: float = 30.0,
        space_wait: float = 30.0,
        on_event: Callable[[CacheEvent], None] | None = None,
        executor: ThreadPoolExecutor | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self.policy = policy
        self.usage: dict[str, Usage] = {}
        self.clock = 0.0  # the pool's aging value (placement.InstanceCache.clock)
        #: While set, no new load starts (the instance is draining before shutdown).
        self.refuse_loads = ""
        self.loader = loader
        self.failure_ttl = failure_ttl
        self.space_wait = space_wait
        self._on_event = on_event or (lambda _ev: None)
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()  # LRU order: oldest first
        self._used = 0
        self._held = 0  # bytes held for loads whose size is not known yet (not used bytes)
        self._load_slots = asyncio.Semaphore(max_concurrent_loads)
        self._space_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()  # loads
        self._unloads: set[asyncio.Future[None]] = set()  # model.unload() calls in threads
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=max(2, max_concurrent_loads), thread_name_prefix="mm-load"
        )
        self.loads = 0
        self.evictions = 0
        #: Entries by state, kept as they change (every cache event reports them).
        self._by_state = dict.fromkeys(CopyState, 0)
        self._memory: Memory | None = None
        self._memory_at = 0.0
        self._load_times = LoadTimes()  # which loads may run on the event loop

    # -- queries ----------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def loaded_count(self) -> int:
        return self._by_state[CopyState.LOADED]

    @property
    def loading_count(self) -> int:
        return self._by_state[CopyState.LOADING]

    def memory(self, max_age: float = 0.1) -> Memory:
        """The snapshot's memory summary, at most ``max_age`` seconds old (routing and
        the instance record ask often; other instances' figures are older still)."""
        now = time.monotonic()
        if self._memory is None or now - self._memory_at > max_age:
            self._memory = memory_of(self._entries.values(), self.capacity_bytes)
            self._memory_at = now
        return self._memory

    def get(self, model_id: str) -> CacheEntry | None:
        return self._entries.get(model_id)

    def is_loaded(self, model_id: str) -> bool:
        entry = self._entries.get(model_id)
        return entry is not None and entry.state is CopyState.LOADED

    def entries(self) -> list[CacheEntry]:
        return list(self._entries.values())

    def lru_time(self) -> float:
        """Monotonic last-use time of the least recently used loaded model (0 if none)."""
        for entry in self._entries.values():
            if entry.state is CopyState.LOADED:
                return entry.last_used
        return 0.0

    # -- use ----------------------------------------------------------------------

    async def acquire(self, record: ModelRecord) -> CacheEntry:
        """Return the loaded entry for ``record``, loading it first if needed.

        The caller must call ``release(entry)`` when done; until then the model
        cannot be evicted. A request that finds the model loading waits for that
        load and is served by the copy it loads (or gets its failure).
        """
        model_id = record.model_id
        entry = self._entries.get(model_id)
        if entry is None:
            entry = self._start_load(record)
        elif entry.state is CopyState.FAILED:
            if time.monotonic() < entry.failed_until:
                raise entry.failure()
            entry = self._start_load(record, entry)
        if entry.state is CopyState.LOADED:
            entry.in_use += 1
            self._touch(entry)
            return entry
        # LOADING: the waiter pins the copy now, so that it is still here when the
        # waiter runs (the load's end wakes it, but other tasks may run first).
        entry.in_use += 1
        try:
            await asyncio.shield(entry.ready)
        except BaseException:  # cancelled (the data plane's load timeout): unpin
            self._unpin(entry)
            raise
        if entry.state is CopyState.LOADED:
            self._touch(entry)
            return entry
        self._unpin(entry)
        raise entry.failure()

    def _unpin(self, entry: CacheEntry) -> None:
        """A waiter that will not use the copy lets go of its pin."""
        if entry.state is CopyState.LOADED:  # loaded before the waiter gave up
            self.release(entry)
        else:
            entry.in_use -= 1

    def _touch(self, entry: CacheEntry) -> None:
        """Record one use: LRU order, the model's decayed rate, the copy's priority."""
        entry.last_used = time.monotonic()
        entry.hits += 1
        self._entries.move_to_end(entry.model_id)
        now = time.time()
        usage = self.usage.get(entry.model_id)
        if usage is None:
            usage = self.usage[entry.model_id] = Usage()
        usage.rate = rate_after_request(usage.rate, usage.last_used, now)
        usage.last_used = now
        if self.policy is not None:
            entry.priority = self.policy.priority(
                now=now, size_bytes=entry.size, request_rate=usage.rate, hits_here=entry.hits,
                load_seconds=max(entry.load_ms / 1000, 0.001), clock=self.clock,
            )

    def release(self, entry: CacheEntry) -> None:
        entry.in_use -= 1
        if entry.in_use == 0:
            if entry.unload_requested:
                self._drop(entry, entry.unload_requested)
            self._space_freed.set()

    def ensure_loading(self, record: ModelRecord) -> CacheEntry:
        """Start loading ``record`` if it is not here yet, without waiting."""
        entry = self._entries.get(record.model_id)
        if entry is None or (
            entry.state is CopyState.FAILED and time.monotonic() >= entry.failed_until
        ):
            entry = self._start_load(record, entry)
        return entry

    # -- loading ------------------------------------------------------------------

    def _start_load(self, record: ModelRecord, previous: CacheEntry | None = None) -> CacheEntry:
        """A new LOADING entry for ``record``, replacing ``previous`` (an expired failure)."""
        if previous is not None:
            del self._entries[record.model_id]
            self._by_state[previous.state] -= 1
        if self.refuse_loads:
            raise Unavailable(f"not loading '{record.model_id}' here: {self.refuse_loads}")
        loop = asyncio.get_running_loop()
        entry = CacheEntry(record.model_id, loop.create_future())
        if previous is not None:
            entry.measured = previous.measured  # what the last attempt found it weighs
        self._entries[record.model_id] = entry
        self._by_state[CopyState.LOADING] += 1
        task = loop.create_task(self._load(entry, record), name=f"load:{record.model_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return entry

    async def _load(self, entry: CacheEntry, record: ModelRecord) -> None:
        loop = asyncio.get_running_loop()
        model: LoadedModel | None = None
        model_id = record.model_id
        try:
            async with self._load_slots:
                if entry.unload_requested:
                    raise ModelLoadFailed(model_id, f"{entry.unload_requested} while queued "
                                                    "to load")
                self._on_event(CacheEvent(EventKind.LOADING, model_id))
                started = time.perf_counter()
                # A size measured here before beats any estimate.
                predicted = entry.measured or record.size_estimate
                inline = self._load_times.may_inline(self.loader, record, predicted)
                if not predicted and inline:  # local files: a stat and a few bytes read
                    predicted = self.loader.predict_size(record)
                    inline = self._load_times.may_inline(self.loader, record, predicted)
                elif not predicted:
                    predicted, model = await self._predict_and_load(entry, record)
                if predicted > self.capacity_bytes:
                    raise CapacityExceeded(
                        f"model '{model_id}' {size_phrase(entry.measured, predicted)}, more "
                        f"than this instance's capacity of {self.capacity_bytes} bytes"
                    )
                if model is None:
                    await self._make_room(predicted, entry)
                    self._resize(entry, predicted)
                    model = await self._load_times.load(self.loader, record, inline,
                                                        self._executor)
                measured = entry.measured = max(int(model.size_bytes), 1)
                self._fit_measured(entry, predicted)
                entry.model = model
                entry.load_ms = (time.perf_counter() - started) * 1000
                self._by_state[entry.state] -= 1
                entry.state = CopyState.LOADED
                self._by_state[CopyState.LOADED] += 1
                entry.loaded_at = time.time()
                self._touch(entry)  # the load is for a use: it starts valued as one
                entry.hits = 0
                self.loads += 1
                self._entries.move_to_end(model_id)
                log.info("model loaded: %s (%d bytes, %.0f ms)", model_id, measured,
                         entry.load_ms)
                self._on_event(CacheEvent(EventKind.LOADED, model_id, measured, entry.load_ms))
                if entry.unload_requested and entry.in_use == 0:
                    # Unloaded while loading: requests waiting for it are served first.
                    self._drop(entry, entry.unload_requested)
        except Exception as exc:  # any load failure becomes the model's recorded failure
            self._mark_failed(entry, exc)
            if model is not None:
                entry.model = None
                await loop.run_in_executor(self._executor, model.unload)
            if entry.unload_requested and self._entries.get(model_id) is entry:
                self._remove_failed(entry)
            log.warning("model failed to load: %s: %s", model_id, entry.error)
            self._on_event(CacheEvent(EventKind.FAILED, model_id, size_bytes=entry.measured,
                                      error=entry.error))
        except asyncio.CancelledError:  # close(): the waiters get a clear error, not a hang
            self._mark_failed(entry, Unavailable(
                f"loading '{model_id}' was cancelled: the cache is closing", transient=True))
            raise
        finally:
            if not entry.ready.done():
                entry.ready.set_result(None)

    async def _predict_and_load(self, entry: CacheEntry,
                                record: ModelRecord) -> tuple[int, LoadedModel | None]:
        """(predicted size, the model if loaded too): one thread hop, not two. Loaded
        with the prediction if that fits the bytes held meanwhile (half the free bytes, at
        most an eighth of the capacity; apart from the used bytes instance records show);
        else, nearly full, the load makes room for that size as every load does."""
        free = self.capacity_bytes - self._used - self._held
        budget = max(0, min(free // 2, self.capacity_bytes // 8))
        self._held += budget
        try:
            predicted, model, took = await asyncio.get_running_loop().run_in_executor(
                self._executor, predict_then_load, self.loader, record, budget)
        finally:
            self._held -= budget
            self._space_freed.set()
        if model is not None:
            self._resize(entry, predicted)  # within the bytes just let go of
            self._load_times.note(record, model, took)
        return predicted, model

    def _fit_measured(self, entry: CacheEntry, predicted: int) -> None:
        """Count the measured size of a model just loaded, or raise if it does not fit.

        Runs without awaiting: the bytes counted never exceed the capacity. A model
        larger than the capacity fails for good; one that fits alone but not next
        to the models in use fails transiently, and is not held (beyond the
        capacity) while waiting for them: the retry reserves the measured size
        before loading, and so waits for room the way every load does.
        """
        measured = entry.measured
        if measured > self.capacity_bytes:
            raise CapacityExceeded(
                f"model '{entry.model_id}' takes {measured} bytes once loaded (about "
                f"{predicted} were predicted), more than this instance's capacity of "
                f"{self.capacity_bytes} bytes"
            )
        shortfall = self._used + self._held - entry.size + measured - self.capacity_bytes
        if shortfall > 0 and self._evict_for(shortfall, entry, all_or_nothing=True) < shortfall:
            raise CapacityExceeded(
                f"no room for '{entry.model_id}' right now: it takes {measured} bytes once "
                f"loaded, not the {predicted} predicted, and the other "
                f"{self._used - entry.size} bytes are in use or loading", transient=True,
            )
        self._resize(entry, measured)

    def _mark_failed(self, entry: CacheEntry, exc: Exception) -> None:
        """Record ``exc`` as the entry's failure and give back its bytes."""
        self._resize(entry, 0)
        counted = self._entries.get(entry.model_id) is entry
        if counted:
            self._by_state[entry.state] -= 1
        entry.fail(exc, self.failure_ttl)
        if counted:
            self._by_state[entry.state] += 1

    def _remove_failed(self, entry: CacheEntry) -> None:
        del self._entries[entry.model_id]
        self._by_state[entry.state] -= 1
        if entry.forgotten:
            self.usage.pop(entry.model_id, None)

    def _resize(self, entry: CacheEntry, size: int) -> None:
        if size < entry.size:
            self._space_freed.set()  # a load waiting for room may now fit
        self._used += size - entry.size
        entry.size = size

    async def _make_room(self, needed: int, loading: CacheEntry) -> None:
        """Evict until ``needed`` more bytes fit; wait for in-use models if needed."""
        deadline = time.monotonic() + self.space_wait
        while True:
            shortfall = self._used + self._held + needed - self.capacity_bytes
            if shortfall <= 0:
                return
            freed = self._evict_for(shortfall, loading)
            if freed >= shortfall:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CapacityExceeded(
                    f"no room to load '{loading.model_id}' ({needed} bytes): the other "
                    f"{self._used} bytes are in use or loading", transient=True,
                )
            self._space_freed.clear()
            try:
                await asyncio.wait_for(self._space_freed.wait(), remaining)
            except TimeoutError:
                pass

    def _evict_for(self, needed: int, keep: CacheEntry, *, all_or_nothing: bool = False) -> int:
        """Evict idle loaded models until ``needed`` more bytes are free; returns bytes freed.

        The order is the placement policy's (``Policy.evict``); without a policy,
        least recently used first. When not enough can be freed now, it still
        evicts what it can, so that the waiting load needs fewer in-use models
        to finish; unless ``all_or_nothing``, when it then evicts nothing.
        """
        victims, clock = self._victims(needed, keep)
        if all_or_nothing and sum(self._entries[m].size for m in victims) < needed:
            return 0
        self.clock = clock
        freed = 0
        for model_id in victims:
            entry = self._entries[model_id]
            freed += entry.size
            self.evictions += 1
            self._drop(entry, UnloadReason.EVICTED)
        return freed

    def _victims(self, needed: int, keep: CacheEntry | None) -> tuple[list[str], float]:
        """(the models to evict to free ``needed`` bytes, the pool's clock after that)."""
        return victims(self._entries.values(), needed, keep, self.policy,
                       lambda: self.snapshot(keep), self.clock)

    def snapshot(self, keep: CacheEntry | None = None) -> InstanceCache:
        """This cache as placement's ``InstanceCache`` (in use / loading count as pinned)."""
        return snapshot(self._entries.values(), self.capacity_bytes, self.clock, keep)

    def _drop(self, entry: CacheEntry, reason: UnloadReason) -> None:
        """Remove a loaded model now and release its resources in a thread (awaited on close)."""
        if self._entries.get(entry.model_id) is entry:
            del self._entries[entry.model_id]
            self._by_state[entry.state] -= 1
        self._resize(entry, 0)
        model, entry.model = entry.model, None
        if model is not None and type(model).unload is not LoadedModel.unload:
            # (a model with nothing to release outside the heap needs no thread)
            done = asyncio.get_running_loop().run_in_executor(self._executor, model.unload)
            self._unloads.add(done)
            done.add_done_callback(self._unloaded)
        log.info("model unloaded: %s (%s)", entry.model_id, reason)
        self._on_event(CacheEvent(EventKind.UNLOADED, entry.model_id, reason=reason))
        if entry.forgotten:
            self.usage.pop(entry.model_id, None)

    def _unloaded(self, done: asyncio.Future[None]) -> None:
        self._unloads.discard(done)
        if not done.cancelled() and done.exception() is not None:
            log.warning("releasing an unloaded model failed: %s", done.exception())

    # -- unloading ----------------------------------------------------------------

    def unload(self, model_id: str,
               reason: UnloadReason = UnloadReason.UNREGISTERED) -> bool:
        """Unload ``model_id`` now, or as soon as its in-flight requests finish.

        A model still loading is unloaded when the load ends, after the requests
        waiting for it (if any) have been served.
        """
        entry = self._entries.get(model_id)
        if entry is None:
            return False
        if entry.state is CopyState.LOADED and entry.in_use == 0:
            self._drop(entry, reason)
        elif entry.state is CopyState.FAILED:
            self._remove_failed(entry)
        else:
            entry.unload_requested = reason
        return True

    def forget(self, model_id: str) -> None:
        """Unload ``model_id`` (reason UNREGISTERED) and drop every record of it here.

        For a model that is unregistered: its use history and any remembered
        failure go too, now or, while requests use or wait for it, when they finish.
        """
        entry = self._entries.get(model_id)
        if entry is not None:
            entry.forgotten = True
            self.unload(model_id, UnloadReason.UNREGISTERED)
        if self._entries.get(model_id) is None:
            self.usage.pop(model_id, None)

    async def settle(self) -> None:
        """Wait until no load runs and every unloaded model's resources are released."""
        while self._tasks or self._unloads:
            await asyncio.gather(*self._tasks, *self._unloads, return_exceptions=True)

    async def close(self) -> None:
        """Cancel pending loads and unload everything."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for entry in list(self._entries.values()):
            if entry.state is CopyState.LOADED:
                self._drop(entry, UnloadReason.SHUTDOWN)
        self._entries.clear()
        self._by_state = dict.fromkeys(CopyState, 0)
        if self._unloads:
            await asyncio.gather(*self._unloads, return_exceptions=True)
        if self._own_executor:
            self._executor.shutdown(wait=True)

