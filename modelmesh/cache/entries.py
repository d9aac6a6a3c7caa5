"""What the cache is made of and what it tells the instance: entries, events, reasons."""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from modelmesh.errors import CapacityExceeded, MeshError, ModelLoadFailed
from modelmesh.registry.records import CopyState, ModelRecord
from modelmesh.runtimes.base import LoadedModel


class ModelLoader(Protocol):
    """Turns a registration into a model in memory (sync; called off the event loop)."""

    def predict_size(self, record: ModelRecord) -> int: ...

    def load(self, record: ModelRecord) -> LoadedModel: ...

    # Optional: ``inline(record) -> bool``, whether ``record``'s files are on local disk
    # (nothing to fetch), so that a small, quick load may run on the event loop.


def predict_then_load(loader: ModelLoader, record: ModelRecord,
                      budget: int) -> tuple[int, LoadedModel | None, int]:
    """(predicted size, the model loaded if that size is within ``budget``, the thread CPU
    ns the load took); in a thread."""
    predicted = loader.predict_size(record)
    if predicted > budget:
        return predicted, None, 0
    model, took = timed_load(loader, record)
    return predicted, model, took


#: Models of at most this size (bytes in memory) may load on the event loop...
INLINE_LOAD_BYTES = 1 << 20
#: ...when small models of their format have lately loaded in less than this (CPU).
INLINE_LOAD_NS = 2_000_000


class LoadTimes:
    """How long small models of each format take to load: whether one may load inline.

    A model of at most ``INLINE_LOAD_BYTES`` whose files are on local disk
    (``ModelLoader.inline``), of a format whose small models have lately loaded in
    under ``INLINE_LOAD_NS``, is loaded on the event loop. A thread hop costs more
    than such a load (a 110 KB forest unpickles in 0.2 ms), and a loading thread that
    competes for the GIL with a busy event loop waits up to the switch interval
    (5 ms) after each system call it makes: a load of a dozen system calls then took
    tens of milliseconds while the model's requests waited for it. The first load of
    each format, and loads that became slow, run in a thread.

    Loads are timed by the CPU of the thread they ran on, inline or not, so that a
    wait for the GIL (the gRPC poller's thread takes it too) does not count: timed by
    wall clock, inline loads of 0.3 ms of CPU read as about 1 ms under load, and the
    format went back and forth between the loop and a thread.
    """

    def __init__(self) -> None:
        self._small_ns: dict[str, int] = {}  # moving average, by model type

    def may_inline(self, loader: ModelLoader, record: ModelRecord, predicted: int) -> bool:
        """Whether ``record`` may load on the event loop (``modelmesh.cache.local``)."""
        if predicted > INLINE_LOAD_BYTES:
            return False
        typical = self._small_ns.get(record.model_type, 0)
        if not 0 < typical < INLINE_LOAD_NS:
            return False
        inline = getattr(loader, "inline", None)
        return inline is not None and bool(inline(record))

    async def load(self, loader: ModelLoader, record: ModelRecord, inline: bool,
                   executor: Executor) -> LoadedModel:
        """``loader.load(record)``, here (``inline``) or in ``executor``; timed."""
        if inline:
            model, took = timed_load(loader, record)
        else:
            model, took = await asyncio.get_running_loop().run_in_executor(
                executor, timed_load, loader, record)
        self.note(record, model, took)
        return model

    def note(self, record: ModelRecord, model: LoadedModel, ns: int) -> None:
        """A load's time: the CPU of the thread it ran on (0: not typical, not counted)."""
        if model.size_bytes > INLINE_LOAD_BYTES or ns <= 0:
            return
        seen = self._small_ns.get(record.model_type, 0)
        self._small_ns[record.model_type] = ns if not seen else (seen * 7 + ns) // 8


def timed_load(loader: ModelLoader, record: ModelRecord) -> tuple[LoadedModel, int]:
    """``loader.load(record)``, and the CPU time it took on this thread: what it costs
    the event loop (its wall time would count waits for the GIL too). 0 for a load that
    imported modules (a format's first: its library's import is no load's typical cost,
    and would keep the format's next few dozen loads off the loop)."""
    modules = len(sys.modules)
    begun = time.thread_time_ns()
    model = loader.load(record)
    took = time.thread_time_ns() - begun
    return model, took if len(sys.modules) == modules else 0


def size_phrase(measured: int, predicted: int) -> str:
    if measured:
        return f"takes {measured} bytes once loaded (measured here)"
    return f"needs about {predicted} bytes"


class CacheEntry:
    """One model's slot in the cache (mutable; owned by the cache)."""

    __slots__ = (
        "model_id", "state", "size", "model", "ready", "in_use", "last_used",
        "error", "error_kind", "transient", "failed_until", "load_ms", "unload_requested",
        "forgotten", "hits", "priority", "loaded_at", "measured",
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
        #: The class of the failure (requests in the failure window get the same).
        self.error_kind: type[MeshError] = ModelLoadFailed
        self.transient = False  # the failure may pass on its own (it is not remembered)
        self.failed_until = 0.0
        self.load_ms = 0.0
        #: Set (to why) when the model is to leave as soon as no request uses it.
        self.unload_requested: UnloadReason | None = None
        self.forgotten = False  # ``forget``: drop the model's use history when it leaves
        #: Bytes the model took once loaded (0: not measured), kept after a failure.
        self.measured = 0
        self.hits = 0  # uses since loaded (the rate window of this copy reads it)
        self.priority = 0.0  # retention priority from the policy at the last use
        self.loaded_at = time.time()


    def fail(self, exc: Exception, failure_ttl: float) -> None:
        """Record ``exc`` as this load's failure (remembered ``failure_ttl`` s unless transient)."""
        kind: type[MeshError]
        if isinstance(exc, ModelLoadFailed):
            reason, kind = exc.reason, ModelLoadFailed
        elif isinstance(exc, CapacityExceeded):
            reason, kind = exc.message, CapacityExceeded
        elif isinstance(exc, MeshError):
            reason, kind = exc.message, ModelLoadFailed
        else:
            reason, kind = f"{type(exc).__name__}: {exc}", ModelLoadFailed
        self.state = CopyState.FAILED
        self.error = reason
        self.error_kind = kind
        # A lack of room right now is not the model's fault: the next request retries.
        self.transient = isinstance(exc, MeshError) and exc.transient
        self.failed_until = time.monotonic() + (0.0 if self.transient else failure_ttl)

    def failure(self) -> MeshError:
        """A fresh exception of the kind the load failed with."""
        if self.error_kind is CapacityExceeded:
            return CapacityExceeded(self.error, transient=self.transient)
        return ModelLoadFailed(self.model_id, self.error)


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
