"""The models loaded on this instance: a byte-capacity LRU with single-flight loads.

Rules the cache keeps:
- every model is loaded at most once however many requests arrive while it loads
  (they all wait on the same load);
- at most ``max_concurrent_loads`` loads run at a time;
- the bytes of loaded and loading models never exceed ``capacity_bytes``; room is
  made by evicting models that no request is using, in the order the placement
  policy's ``evict`` gives (lowest retention priority first; least recently used
  first when no policy is set);
- a model in use is never evicted; a load that needs their bytes waits for them;
- a failed load is remembered for ``failure_ttl`` seconds: requests in that window
  get the failure at once instead of retrying the load in a tight loop.

Loading and unloading run in a thread pool; the event loop only does bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from modelmesh.errors import CapacityExceeded, MeshError, ModelLoadFailed, Unavailable
from modelmesh.registry.records import CopyState, ModelRecord
from modelmesh.runtimes.base import LoadedModel
from placement import CachedModel, InstanceCache, Memory, Policy, rate_after_request

log = logging.getLogger(__name__)


class ModelLoader(Protocol):
    """Turns a registration into a model in memory (sync; called off the event loop)."""

    def predict_size(self, record: ModelRecord) -> int: ...

    def load(self, record: ModelRecord) -> LoadedModel: ...


class CacheEntry:
    """One model's slot in the cache (mutable; owned by the cache)."""

    __slots__ = (
        "model_id", "state", "size", "model", "ready", "in_use", "last_used",
        "error", "failed_until", "load_ms", "unload_requested", "hits", "priority",
        "loaded_at",
    )

    def __init__(self, model_id: str, ready: asyncio.Future[None]) -> None:
        self.model_id = model_id
        self.state = CopyState.LOADING
        self.size = 0
        self.model: LoadedModel | None = None
        self.ready = ready
        self.in_use = 0
        self.last_used = time.monotonic()
        self.error = ""
        self.failed_until = 0.0
        self.load_ms = 0.0
        self.unload_requested = False
        self.hits = 0  # uses since loaded (the rate window of this copy reads it)
        self.priority = 0.0  # retention priority from the policy at the last use
        self.loaded_at = time.time()


@dataclass(slots=True)
class Usage:
    """A model's use on this instance: decayed rate and last use (wall-clock seconds).

    Kept when the model is evicted, so a model coming back is valued by its history.
    """

    rate: float = 0.0
    last_used: float | None = None


class EventKind(StrEnum):
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"
    UNLOADED = "unloaded"


class UnloadReason(StrEnum):
    """Why a model left the cache (the ``modelmesh_unloads`` metric's label)."""

    EVICTED = "evicted"
    UNREGISTERED = "unregistered"
    REPLACED = "replaced"
    SCALED_DOWN = "scaled down"
    REPOSITORY_UNLOAD = "repository unload"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True, slots=True)
class CacheEvent:
    """What the cache tells the rest of the instance (copy records, metrics, logs)."""

    kind: EventKind
    model_id: str
    size_bytes: int = 0
    load_ms: float = 0.0
    error: str = ""
    reason: UnloadReason | None = None  # for UNLOADED


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
        self._generation = 0  # bumped whenever an entry is added, removed or changes state
        self._counted_at = -1
        self._count_cache = (0, 0)
        self._memory: Memory | None = None
        self._memory_at = 0.0

    # -- queries ----------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def loaded_count(self) -> int:
        return self._counts()[0]

    @property
    def loading_count(self) -> int:
        return self._counts()[1]

    def _counts(self) -> tuple[int, int]:
        """(loaded, loading), recounted only after an entry changed state.

        Every cache event asks for them (metrics, the instance record); with
        thousands of models a count per event was a visible share of the loop.
        """
        if self._counted_at != self._generation:
            loaded = loading = 0
            for e in self._entries.values():
                if e.state is CopyState.LOADED:
                    loaded += 1
                elif e.state is CopyState.LOADING:
                    loading += 1
            self._count_cache = (loaded, loading)
            self._counted_at = self._generation
        return self._count_cache

    def memory(self, max_age: float = 0.1) -> Memory:
        """The snapshot's memory summary, at most ``max_age`` seconds old.

        Routing asks for it on every request it cannot serve here and the
        instance record on every cache event; one summary walks every entry, so
        it is shared for a moment (other instances' figures are older still).
        """
        now = time.monotonic()
        if self._memory is None or now - self._memory_at > max_age:
            self._memory = self.snapshot().memory()
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
        cannot be evicted.
        """
        model_id = record.model_id
        while True:
            entry = self._entries.get(model_id)
            if entry is None:
                entry = self._start_load(record)
            if entry.state is CopyState.LOADED:
                entry.in_use += 1
                self._touch(entry)
                return entry
            if entry.state is CopyState.LOADING:
                await asyncio.shield(entry.ready)
                if entry.state is CopyState.FAILED:  # the load this request waited for
                    raise ModelLoadFailed(model_id, entry.error)
                continue
            # FAILED
            if time.monotonic() < entry.failed_until:
                raise ModelLoadFailed(model_id, entry.error)
            del self._entries[model_id]
            self._generation += 1

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
                self._drop(entry, UnloadReason.UNREGISTERED)
            self._space_freed.set()

    def ensure_loading(self, record: ModelRecord) -> CacheEntry:
        """Start loading ``record`` if it is not here yet, without waiting."""
        entry = self._entries.get(record.model_id)
        if entry is None or (
            entry.state is CopyState.FAILED and time.monotonic() >= entry.failed_until
        ):
            self._entries.pop(record.model_id, None)
            self._generation += 1
            entry = self._start_load(record)
        return entry

    # -- loading ------------------------------------------------------------------

    def _start_load(self, record: ModelRecord) -> CacheEntry:
        if self.refuse_loads:
            raise Unavailable(f"not loading '{record.model_id}' here: {self.refuse_loads}")
        loop = asyncio.get_running_loop()
        entry = CacheEntry(record.model_id, loop.create_future())
        self._entries[record.model_id] = entry
        self._generation += 1
        task = loop.create_task(self._load(entry, record), name=f"load:{record.model_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return entry

    async def _load(self, entry: CacheEntry, record: ModelRecord) -> None:
        loop = asyncio.get_running_loop()
        model: LoadedModel | None = None
        try:
            async with self._load_slots:
                if entry.unload_requested:
                    raise ModelLoadFailed(record.model_id, "unregistered while queued to load")
                self._on_event(CacheEvent(EventKind.LOADING, record.model_id))
                started = time.perf_counter()
                predicted = record.size_estimate or await loop.run_in_executor(
                    self._executor, self.loader.predict_size, record
                )
                if predicted > self.capacity_bytes:
                    raise CapacityExceeded(
                        f"model '{record.model_id}' needs about {predicted} bytes, more than "
                        f"this instance's capacity of {self.capacity_bytes} bytes"
                    )
                await self._make_room(predicted, entry)
                self._resize(entry, predicted)
                model = await loop.run_in_executor(self._executor, self.loader.load, record)
                self._resize(entry, max(int(model.size_bytes), 1))
                if self._used > self.capacity_bytes:
                    # The measured size exceeded the prediction: make room after the fact.
                    self._evict_for(self._used - self.capacity_bytes, entry)
                entry.model = model
                entry.load_ms = (time.perf_counter() - started) * 1000
                entry.state = CopyState.LOADED
                self._generation += 1
                entry.loaded_at = time.time()
                self._touch(entry)  # the load is for a use: it starts valued as one
                entry.hits = 0
                self.loads += 1
                if entry.unload_requested:
                    self._drop(entry, UnloadReason.UNREGISTERED)
                else:
                    self._entries.move_to_end(record.model_id)
                log.info("model loaded: %s (%d bytes, %.0f ms)", record.model_id, entry.size,
                         entry.load_ms)
                self._on_event(CacheEvent(EventKind.LOADED, record.model_id, entry.size,
                                         entry.load_ms))
        except Exception as exc:  # any load failure becomes the model's recorded failure
            reason = exc.reason if isinstance(exc, ModelLoadFailed) else (
                exc.message if isinstance(exc, MeshError) else f"{type(exc).__name__}: {exc}"
            )
            self._resize(entry, 0)
            entry.state = CopyState.FAILED
            self._generation += 1
            entry.error = reason
            # A lack of room right now is not the model's fault: the next request retries.
            transient = isinstance(exc, MeshError) and exc.transient
            entry.failed_until = time.monotonic() + (0.0 if transient else self.failure_ttl)
            if model is not None:
                await loop.run_in_executor(self._executor, model.unload)
            if entry.unload_requested and self._entries.get(entry.model_id) is entry:
                del self._entries[entry.model_id]
                self._generation += 1
            log.warning("model failed to load: %s: %s", record.model_id, reason)
            self._on_event(CacheEvent(EventKind.FAILED, record.model_id, error=reason))
        finally:
            if not entry.ready.done():
                entry.ready.set_result(None)

    def _resize(self, entry: CacheEntry, size: int) -> None:
        self._used += size - entry.size
        entry.size = size

    async def _make_room(self, needed: int, loading: CacheEntry) -> None:
        """Evict until ``needed`` more bytes fit; wait for in-use models if needed."""
        deadline = time.monotonic() + self.space_wait
        while True:
            shortfall = self._used + needed - self.capacity_bytes
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

    def _evict_for(self, needed: int, keep: CacheEntry) -> int:
        """Evict idle loaded models until ``needed`` more bytes are free; returns bytes freed.

        The order is the placement policy's (``Policy.evict``); without a policy,
        least recently used first. When not enough can be freed now, it still
        evicts what it can, so that the waiting load needs fewer in-use models
        to finish.
        """
        victims = self.choose_victims(needed, keep)
        freed = 0
        for model_id in victims:
            entry = self._entries[model_id]
            freed += entry.size
            self.evictions += 1
            self._drop(entry, UnloadReason.EVICTED)
        return freed

    def choose_victims(self, needed: int, keep: CacheEntry | None = None) -> list[str]:
        """The models ``_evict_for`` would unload to free ``needed`` bytes (nothing changes)."""
        def evictable(e: CacheEntry) -> bool:
            return e is not keep and e.state is CopyState.LOADED and not e.in_use

        if self.policy is None:
            victims, freed = [], 0
            for entry in self._entries.values():  # LRU order
                if freed >= needed:
                    break
                if evictable(entry):
                    victims.append(entry.model_id)
                    freed += entry.size
            return victims
        snapshot = self.snapshot(keep)
        chosen = self.policy.evict(snapshot, snapshot.free_bytes + needed)
        if chosen is None:  # cannot free it all: take every evictable model, lowest first
            chosen = [e.model_id for e in sorted(
                (e for e in snapshot.entries if not e.in_use),
                key=lambda e: (e.priority, e.model_id))]
        self.clock = self.policy.clock_after_evict(snapshot, chosen)
        return chosen

    def snapshot(self, keep: CacheEntry | None = None) -> InstanceCache:
        """This cache as placement's ``InstanceCache`` (in use / loading count as pinned)."""
        mono, wall = time.monotonic(), time.time()
        return InstanceCache(
            instance_id="", capacity_bytes=self.capacity_bytes, clock=self.clock,
            entries=tuple(
                CachedModel(
                    e.model_id, e.size, e.priority, wall - (mono - e.last_used),
                    in_use=e is keep or e.state is not CopyState.LOADED or e.in_use > 0,
                )
                for e in self._entries.values() if e.size > 0
            ),
        )

    def _drop(self, entry: CacheEntry, reason: UnloadReason) -> None:
        """Remove a loaded model now and release its resources in a thread (awaited on close)."""
        if self._entries.get(entry.model_id) is entry:
            del self._entries[entry.model_id]
            self._generation += 1
        self._resize(entry, 0)
        model, entry.model = entry.model, None
        if model is not None:
            done = asyncio.get_running_loop().run_in_executor(self._executor, model.unload)
            self._unloads.add(done)
            done.add_done_callback(self._unloaded)
        log.info("model unloaded: %s (%s)", entry.model_id, reason)
        self._on_event(CacheEvent(EventKind.UNLOADED, entry.model_id, reason=reason))

    def _unloaded(self, done: asyncio.Future[None]) -> None:
        self._unloads.discard(done)
        if not done.cancelled() and done.exception() is not None:
            log.warning("releasing an unloaded model failed: %s", done.exception())

    # -- unloading ----------------------------------------------------------------

    def unload(self, model_id: str,
               reason: UnloadReason = UnloadReason.UNREGISTERED) -> bool:
        """Unload ``model_id`` now, or as soon as its in-flight requests finish."""
        entry = self._entries.get(model_id)
        if entry is None:
            return False
        if entry.state is CopyState.LOADED and entry.in_use == 0:
            self._drop(entry, reason)
        elif entry.state is CopyState.FAILED:
            del self._entries[model_id]
            self._generation += 1
        else:
            entry.unload_requested = True
        return True

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
        self._generation += 1
        if self._unloads:
            await asyncio.gather(*self._unloads, return_exceptions=True)
        if self._own_executor:
            self._executor.shutdown(wait=True)
