"""Where a model's files are on local disk: under the models root, or pulled from storage.

A local path (plain or ``file://``) is read where it is, confined to the models
root. A remote location (``s3://``, ``gs://``, ``https://``, or a plain path
with a storage key) is pulled into the local disk cache first; the runtime then
loads it from there (see ``modelmesh.storage.puller``). Nothing here knows a
model format.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from modelmesh.errors import InvalidArgument, StorageError
from modelmesh.registry.records import ModelRecord
from modelmesh.storage.config import StorageConfigs, shared_storage_configs
from modelmesh.storage.diskcache import DiskCache
from modelmesh.storage.paths import FileScope, check_path_text, real_path
from modelmesh.storage.puller import Puller, Source, resolve_source

if TYPE_CHECKING:
    from modelmesh.metrics import Metrics
    from modelmesh.settings import Settings

#: Before a remote model's files are on local disk, its in-memory size is guessed as
#: its bytes in storage times this (the runtime's own estimate needs the file).
REMOTE_SIZE_FACTOR = 1.2


def resolve_model_path(models_root: Path, path: str) -> Path:
    """Resolve a registered path against the models root, refusing escapes.

    Accepts a path relative to the root, an absolute path inside it, or a
    ``file://`` URI of either. Symlinks are followed before the check, so a link
    that points outside the root is refused too. A path the filesystem cannot
    take (a NUL byte, a component too long) is refused with ``InvalidArgument``.
    This checks the registered path only; the files a load opens are checked
    again, each of them (``ModelFiles``, ``modelmesh.storage.paths``).
    """
    return _resolve_model_path(models_root, path)[0]


def _resolve_model_path(models_root: Path, path: str) -> tuple[Path, bool]:
    """``resolve_model_path``, and whether the path exists (then it is fully resolved)."""
    if not path:
        raise InvalidArgument("model path must not be empty")
    check_path_text(path)
    raw = path.removeprefix("file://")
    if "://" in raw:
        scheme = raw.split("://", 1)[0]
        raise InvalidArgument(
            f"model path '{path}': storage scheme '{scheme}://' is not supported here; "
            "use a path under the models root"
        )
    # os.path on strings: this runs for every registration, and pathlib's resolve()
    # was a tenth of a registerModel call's CPU.
    root = _real_root(str(models_root))
    joined = raw if os.path.isabs(raw) else os.path.join(root, raw)
    try:
        full, exists = real_path(joined), True  # the kernel's answer, for a path that exists
    except OSError:
        # What of it exists resolved, the rest as given.
        full, exists = os.path.realpath(joined), False
    if full != root and not full.startswith(root.rstrip(os.sep) + os.sep):
        raise InvalidArgument(
            f"model path '{path}' resolves outside the models root '{models_root}'"
        )
    return Path(full), exists


@functools.lru_cache(maxsize=16)
def _real_root(models_root: str) -> str:
    return os.path.realpath(models_root)


def check_model_location(settings: Settings, path: str, key: str = "") -> None:
    """Validate a registration's location: a local path under the models root, or a
    remote location whose scheme, storage key and object key can work.

    Raises InvalidArgument saying what to fix. Nothing is contacted.
    """
    configs = shared_storage_configs(settings.storage_config)
    if resolve_source(path, key, configs) is None:
        resolve_model_path(Path(settings.models_root), path)


def disk_cache_dir(settings: Settings) -> Path:
    """Where pulled models are kept: ``--disk-cache-dir``, else ``<data-dir>/models-cache``."""
    return Path(settings.disk_cache_dir) if settings.disk_cache_dir else \
        Path(settings.data_dir) / "models-cache"


@dataclass(frozen=True)
class LocalModel:
    """A model's files on local disk: ``path`` (resolved), and the scope its files must keep to."""

    path: Path
    scope: FileScope


class ModelFiles:
    """A model's files on local disk: under the models root, or pulled into the disk cache.

    Knows no model format: what a file means is the runtimes' business. Before a
    model's files are handed on, their tree is checked (``FileScope.check_tree``):
    every file, and every symlink's target, under the models root (or, pulled, in
    its disk cache entry, where no symlink may be), and nothing but directories
    and regular files. ``max_file_bytes`` (0: none) is the largest file a runtime
    may open: a file larger than the model memory could never be loaded here.
    """

    def __init__(self, models_root: Path, puller: Puller | None = None,
                 max_file_bytes: int = 0) -> None:
        self.models_root = Path(models_root)
        self.puller = puller
        self.max_file_bytes = max_file_bytes

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> ModelFiles:
        """Files with the storage configuration, disk cache and limits of ``settings``."""
        def on_change(cache: DiskCache) -> None:
            if metrics is not None:
                metrics.disk_cache_used_bytes.set(cache.used_bytes)
                metrics.disk_cache_evictions.set(cache.evictions)

        if metrics is not None:
            metrics.disk_cache_capacity_bytes.set(settings.disk_cache_capacity)
        cache = DiskCache(disk_cache_dir(settings), settings.disk_cache_capacity, on_change)
        puller = Puller(shared_storage_configs(settings.storage_config), cache,
                        max_concurrent_downloads=settings.max_concurrent_downloads,
                        timeout=settings.download_timeout, metrics=metrics)
        return cls(Path(settings.models_root), puller, max_file_bytes=settings.capacity)

    def _source(self, record: ModelRecord) -> Source | None:
        configs = self.puller.configs if self.puller is not None else StorageConfigs()
        return resolve_source(record.path, record.storage_key, configs)

    def _puller(self, source: Source) -> Puller:
        if self.puller is None:
            raise StorageError(f"{source}: this loader has no storage configured")
        return self.puller

    def is_local(self, record: ModelRecord) -> bool:
        """Whether the model is read from under the models root (not pulled from storage)."""
        return self._source(record) is None

    def _locate(self, record: ModelRecord) -> LocalModel:
        full, exists = _resolve_model_path(self.models_root, record.path)
        # The root resolved once, as resolve_model_path resolves it (_real_root).
        scope = FileScope(_real_root(str(self.models_root)), max(0, self.max_file_bytes))
        if not exists and not os.path.lexists(full):
            raise StorageError(f"model file '{record.path}' not found under the models root")
        return LocalModel(scope.check_tree(full, resolved=exists), scope)

    @contextmanager
    def located(self, record: ModelRecord) -> Iterator[LocalModel]:
        """The model's files on local disk and their scope, for the block (pulled if remote)."""
        source = self._source(record)
        if source is None:
            yield self._locate(record)
            return
        with self._puller(source).pulled(source) as (path, entry):
            yield self._in_cache(path, entry)

    def _in_cache(self, path: Path, entry: Path) -> LocalModel:
        scope = FileScope.at(entry, self.max_file_bytes, "its disk cache entry",
                             allow_symlinks=False)
        return LocalModel(scope.check_tree(path), scope)

    @contextmanager
    def local_files(self, record: ModelRecord) -> Iterator[Path]:
        """The model's files on local disk for the duration of the block (pulled if remote)."""
        with self.located(record) as model:
            yield model.path

    def predict_size(self, record: ModelRecord,
                     measure: Callable[[Path, FileScope], int]) -> int:
        """The model's loaded size before loading: ``measure`` (the format's estimate)
        of its local files, or, for a remote model not on local disk yet, its bytes in
        storage times ``REMOTE_SIZE_FACTOR``."""
        source = self._source(record)
        if source is None:
            model = self._locate(record)
            return measure(model.path, model.scope)
        puller = self._puller(source)
        with puller.cached_entry(source) as local:
            if local is not None:
                cached = self._in_cache(*local)
                return measure(cached.path, cached.scope)
        return max(1, int(puller.remote_bytes(source) * REMOTE_SIZE_FACTOR))
