"""The runtime server's table of models: single-flight loads, bounded concurrency, no eviction.

The mesh decides which models are loaded here; ``LoadedModels`` loads each at
most once however many loadModel calls arrive, drops a model unloaded while
it loads, and keeps a model in use by a request until that request is done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from modelmesh.errors import MeshError, ModelLoadFailed, NotLoaded
from modelmesh.registry.records import ModelRecord
from modelmesh.runtime_server.settings import RuntimeServerSettings
from modelmesh.runtimes.base import LoadedModel
from modelmesh.runtimes.loader import EmbeddedLoader
from modelmesh.storage import ModelFiles

log = logging.getLogger(__name__)


class _Slot:
    __slots__ = ("model_id", "task", "model", "in_use", "unload_requested")

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.task: asyncio.Task[LoadedModel] | None = None
        self.model: LoadedModel | None = None
        self.in_use = 0
        self.unload_requested = False


class LoadedModels:
    """The runtime's models: single-flight loads, bounded concurrency, no eviction."""

    def __init__(self, settings: RuntimeServerSettings, executor: ThreadPoolExecutor) -> None:
        self.settings = settings
        # A file larger than the capacity could never be loaded here: refused unread.
        self.loader = EmbeddedLoader(ModelFiles(settings.models_root,
                                                max_file_bytes=settings.capacity))
        self._executor = executor
        self._slots: dict[str, _Slot] = {}
        self._load_slots = asyncio.Semaphore(settings.max_concurrent_loads)

    @property
    def used_bytes(self) -> int:
        return sum(s.model.size_bytes for s in self._slots.values() if s.model is not None)

    def loaded(self) -> list[tuple[str, LoadedModel]]:
        return [(i, s.model) for i, s in self._slots.items() if s.model is not None]

    async def load(self, record: ModelRecord) -> LoadedModel:
        """Load ``record`` (or join the load under way); the loaded model."""
        slot = self._slots.get(record.model_id)
        if slot is None or slot.unload_requested:
            slot = self._slots[record.model_id] = _Slot(record.model_id)
            slot.task = asyncio.get_running_loop().create_task(
                self._load(slot, record), name=f"load:{record.model_id}")
            # Its failure is reported to the callers waiting; none may be left to see it.
            slot.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if slot.model is not None:
            return slot.model
        assert slot.task is not None
        try:
            return await asyncio.wait_for(asyncio.shield(slot.task), self.settings.load_timeout)
        except TimeoutError:
            self._forget(slot)
            raise ModelLoadFailed(
                record.model_id, f"did not load within {self.settings.load_timeout:g}s"
            ) from None

    async def _load(self, slot: _Slot, record: ModelRecord) -> LoadedModel:
        loop = asyncio.get_running_loop()
        try:
            async with self._load_slots:
                if slot.unload_requested:
                    raise ModelLoadFailed(record.model_id, "unloaded while queued to load")
                started = time.perf_counter()
                model = await loop.run_in_executor(self._executor, self.loader.load, record)
        except MeshError as exc:
            self._forget(slot)
            if isinstance(exc, ModelLoadFailed):
                log.warning("model failed to load: %s: %s", record.model_id, exc.reason)
            raise
        except Exception as exc:  # the format's library: report it as the load's failure
            self._forget(slot)
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("model failed to load: %s: %s", record.model_id, reason)
            raise ModelLoadFailed(record.model_id, reason) from exc
        if slot.unload_requested or self._slots.get(record.model_id) is not slot:
            # unloadModel came while loading: the model must not stay loaded.
            loop.run_in_executor(self._executor, model.unload)
            raise ModelLoadFailed(record.model_id, "unloaded while loading")
        slot.model = model
        log.info("model loaded: %s (%d bytes, %.0f ms)", record.model_id, model.size_bytes,
                 (time.perf_counter() - started) * 1000)
        if self.used_bytes > self.settings.capacity:
            log.warning("models use %d bytes, over this runtime's capacity of %d",
                        self.used_bytes, self.settings.capacity)
        return model

    def _forget(self, slot: _Slot) -> None:
        slot.unload_requested = True
        if self._slots.get(slot.model_id) is slot:
            del self._slots[slot.model_id]

    def unload(self, model_id: str) -> None:
        """Unload now, or when the requests using it finish; a load under way is dropped."""
        slot = self._slots.pop(model_id, None)
        if slot is None:
            return
        slot.unload_requested = True
        if slot.model is not None and slot.in_use == 0:
            self._release_model(slot)

    def _release_model(self, slot: _Slot) -> None:
        model, slot.model = slot.model, None
        if model is not None:
            self._executor.submit(model.unload)
            log.info("model unloaded: %s", slot.model_id)

    def unload_all(self) -> int:
        ids = list(self._slots)
        for model_id in ids:
            self.unload(model_id)
        return len(ids)

    def size(self, model_id: str) -> int:
        slot = self._slots.get(model_id)
        if slot is None or slot.model is None:
            raise NotLoaded(model_id)
        return int(slot.model.size_bytes)

    def acquire(self, model_id: str) -> _Slot:
        slot = self._slots.get(model_id)
        if slot is None or slot.model is None:
            raise NotLoaded(model_id)
        slot.in_use += 1
        return slot

    def release(self, slot: _Slot) -> None:
        slot.in_use -= 1
        if slot.in_use == 0 and slot.unload_requested:
            self._release_model(slot)

    async def close(self) -> None:
        tasks = [s.task for s in self._slots.values() if s.task is not None and not s.task.done()]
        self.unload_all()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
