"""What the cache is made of and what it tells the instance: entries, events, reasons."""

from __future__ import annotations

import asyncio
import time
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


def predict_then_load(loader: ModelLoader, record: ModelRecord,
                      budget: int) -> tuple[int, LoadedModel | None]:
    """(predicted size, the model loaded if that size is within ``budget``); in a thread."""
    predicted = loader.predict_size(record)
    return predicted, loader.load(record) if predicted <= budget else None


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
