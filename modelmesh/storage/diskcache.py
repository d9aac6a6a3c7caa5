"""The local disk cache: models pulled from storage, kept within a byte budget.

A third tier below GPU and CPU memory: a model evicted from memory loads again
from local disk instead of the network. Layout under the cache root::

    objects/<entry id>/meta.json   what the entry holds (location, version, bytes)
    objects/<entry id>/data/...    the model's files, as the runtime reads them
    tmp/                           downloads in progress; cleared at start-up

An entry is filled in ``tmp/`` and moved into ``objects/`` with one atomic
rename once every file is complete and verified, so a crash never leaves a
partial model that looks complete. An entry holds directories and regular
files only: a fill that leaves a symlink (or a FIFO, a device) is refused, and
an entry found holding one at start-up is removed as damaged, so no file read
from the cache can be one outside it. The index is rebuilt from ``objects/`` on
start, so the cache survives restarts. Entries are evicted least recently used
first, never while pinned (a load is reading them). A model that does not fit
the budget (or every model, with capacity 0) is still pulled, into a temporary
directory removed after the load.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelmesh.errors import StorageError
from modelmesh.storage.paths import FileScope
from modelmesh.storage.uri import safe_relative

log = logging.getLogger(__name__)

META = "meta.json"
DATA = "data"


@dataclass
class _Entry:
    entry_id: str
    size: int
    last_used: float
    group: str  # entries of the same location (any version) share a group
    pins: int = 0


@dataclass
class CachedModel:
    """A pinned model directory; release it through ``DiskCache.release``."""

    entry_id: str
    data: Path  # the directory holding the model's files
    cached: bool  # False: a temporary copy deleted on release
    meta: dict[str, Any] = field(default_factory=dict)


class DiskCache:
    """Downloaded models on local disk, least recently used evicted beyond ``capacity_bytes``."""

    def __init__(self, root: Path, capacity_bytes: int,
                 on_change: Callable[[DiskCache], None] | None = None) -> None:
        self.root = Path(root)
        self.capacity_bytes = max(0, int(capacity_bytes))
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._fill_locks: dict[str, threading.Lock] = {}
        self._reserved = 0
        self._trash: list[Path] = []
        self._on_change = on_change or (lambda _c: None)
        self.evictions = 0
        self._rebuild()

    # -- queries ----------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def __contains__(self, entry_id: str) -> bool:
        with self._lock:
            return entry_id in self._entries

    def entry_ids(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    # -- use ----------------------------------------------------------------------

    def fill_lock(self, entry_id: str) -> threading.Lock:
        """Held while an entry is looked up and filled: one download per entry at a time."""
        with self._lock:
            return self._fill_locks.setdefault(entry_id, threading.Lock())

    def acquire(self, entry_id: str) -> CachedModel | None:
        """Pin and return the entry if it is cached; the caller must ``release`` it."""
        with self._lock:
            entry = self._entries.get(entry_id)
            if entry is None:
                return None
            entry.pins += 1
            entry.last_used = time.time()
        path = self._objects / entry_id
        try:
            os.utime(path / META)  # the LRU clock survives restarts
        except OSError:
            pass
        return CachedModel(entry_id, path / DATA, True, self._read_meta(path))

    def acquire_latest(self, group: str) -> CachedModel | None:
        """Pin the most recently used entry of ``group`` (any version), if any."""
        with self._lock:
            candidates = [e for e in self._entries.values() if e.group == group]
            if not candidates:
                return None
            best = max(candidates, key=lambda e: e.last_used)
        return self.acquire(best.entry_id)

    def release(self, model: CachedModel) -> None:
        if not model.cached:
            shutil.rmtree(model.data.parent, ignore_errors=True)
            return
        with self._lock:
            entry = self._entries.get(model.entry_id)
            if entry is not None:
                entry.pins -= 1

    def store(self, entry_id: str, expected_bytes: int, group: str,
              fill: Callable[[Path], int], meta: dict[str, Any]) -> CachedModel:
        """Fill a new entry with ``fill(data_dir) -> bytes written`` and pin it.

        ``fill`` writes into a temporary directory; only if it returns does the
        entry appear (atomically). If the budget cannot hold ``expected_bytes``
        the returned copy is temporary (``cached`` False). Exceptions from
        ``fill`` propagate after the partial files are removed.
        """
        expected = max(expected_bytes, 0)
        reserved = self._reserve(expected)
        keep = bool(reserved) or expected == 0  # unknown size: decide once written
        work = self._tmp / f"{entry_id}.{uuid.uuid4().hex[:8]}"
        data = work / DATA
        data.mkdir(parents=True)
        try:
            written = fill(data)
            _tree_bytes(data)  # refuses symlinks and special files
        except BaseException:
            self._unreserve(reserved)
            shutil.rmtree(work, ignore_errors=True)
            raise
        if keep and written > reserved:
            keep = self._reserve(written - reserved) > 0
            reserved = written if keep else reserved
        elif keep and written < reserved:
            self._unreserve(reserved - written)
            reserved = written
        meta = {**meta, "entry_id": entry_id, "group": group, "bytes": written,
                "stored": time.time()}
        if not keep:
            self._unreserve(reserved)
            log.info("disk cache: %s (%d bytes) not kept: over the %d-byte budget",
                     meta.get("location", entry_id), written, self.capacity_bytes)
            return CachedModel(entry_id, data, False, meta)
        (work / META).write_text(json.dumps(meta))
        final = self._objects / entry_id
        self._objects.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._reserved -= reserved
            if entry_id in self._entries:  # filled meanwhile by another path: keep that one
                self._entries[entry_id].pins += 1
                shutil.rmtree(work, ignore_errors=True)
                return CachedModel(entry_id, final / DATA, True, meta)
            if final.exists():  # unindexed leftovers (a failed delete): replace them
                shutil.rmtree(final, ignore_errors=True)
            os.replace(work, final)
            self._entries[entry_id] = _Entry(entry_id, written, time.time(), group, pins=1)
        self._changed()
        return CachedModel(entry_id, final / DATA, True, meta)

    def drop_group(self, group: str, keep: str) -> int:
        """Remove the unpinned entries of ``group`` other than ``keep``; returns how many."""
        with self._lock:
            stale = [e for e in self._entries.values()
                     if e.group == group and e.entry_id != keep and not e.pins]
            for entry in stale:
                self._drop_locked(entry)
        if stale:
            self._changed()
        return len(stale)

    # -- budget -------------------------------------------------------------------

    def _reserve(self, n: int) -> int:
        """Reserve room for a download in progress; 0 if it cannot fit."""
        if n <= 0:
            return 0
        with self._lock:
            if not self._make_room_locked(n):
                return 0
            self._reserved += n
        self._changed()
        return n

    def _unreserve(self, n: int) -> None:
        if n:
            with self._lock:
                self._reserved -= n

    def _make_room_locked(self, n: int) -> bool:
        if n > self.capacity_bytes:
            return False
        excess = sum(e.size for e in self._entries.values()) + self._reserved + n \
            - self.capacity_bytes
        victims: list[_Entry] = []
        for entry in sorted(self._entries.values(), key=lambda e: e.last_used):
            if excess <= 0:
                break
            if not entry.pins:
                victims.append(entry)
                excess -= entry.size
        if excess > 0:
            return False  # not enough is evictable now: evict nothing
        for entry in victims:
            self._drop_locked(entry)
            self.evictions += 1
        return True

    def _drop_locked(self, entry: _Entry) -> None:
        """Unindex an entry and move its files aside (deleted by ``_changed``, unlocked)."""
        del self._entries[entry.entry_id]
        path = self._objects / entry.entry_id
        trash = self._tmp / f"evicted-{entry.entry_id}.{uuid.uuid4().hex[:8]}"
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            os.replace(path, trash)
        except OSError:
            trash = path
        self._trash.append(trash)
        log.info("disk cache: evicted %s (%d bytes)", entry.entry_id, entry.size)

    def _changed(self) -> None:
        with self._lock:
            trash, self._trash = self._trash, []
        for path in trash:
            shutil.rmtree(path, ignore_errors=True)
        try:
            self._on_change(self)
        except Exception:  # noqa: BLE001 - metrics must never break a load
            log.exception("disk cache change callback failed")

    # -- start-up -----------------------------------------------------------------

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any]:
        meta = path / META
        try:
            if meta.is_symlink() or not meta.is_file():  # never read a link or a FIFO
                return {}
            data = json.loads(meta.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _rebuild(self) -> None:
        """Index what a previous run left; remove partial downloads and damaged entries."""
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._objects.mkdir(parents=True, exist_ok=True)
        for path in self._objects.iterdir():
            meta = self._read_meta(path)
            data = path / DATA
            size = meta.get("bytes")
            if not (meta.get("entry_id") == path.name and isinstance(size, int)
                    and not path.is_symlink() and data.is_dir() and not data.is_symlink()
                    and _single_file_ok(data, meta.get("single_file"))
                    and _tree_size_or_none(data) == size):
                log.warning("disk cache: removing damaged entry %s", path.name)
                _remove(path)
                continue
            last_used = (path / META).stat().st_mtime
            self._entries[path.name] = _Entry(path.name, size, last_used,
                                              str(meta.get("group", "")))
        with self._lock:
            self._make_room_locked(0)  # the budget may have shrunk since the last run
        if self._entries:
            log.info("disk cache: %d models (%d bytes) found in %s", len(self._entries),
                     sum(e.size for e in self._entries.values()), self.root)
        self._changed()


def _tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path``; StorageError if it holds anything else."""
    scope = FileScope.at(path, label="the disk cache entry", allow_symlinks=False)
    return sum(os.stat(f).st_size for f in scope.walk(path))


def _tree_size_or_none(path: Path) -> int | None:
    try:
        return _tree_bytes(path)
    except StorageError as exc:
        log.warning("disk cache: %s", exc.message)
        return None


def _single_file_ok(data: Path, single: object) -> bool:
    """A single-file entry's file name (from meta.json) names a regular file in the entry."""
    if not single:
        return True
    try:
        rel = safe_relative(str(single), "meta.json")
    except Exception:  # noqa: BLE001 - any bad name is damage
        return False
    return os.path.isfile(data / rel) and not os.path.islink(data / rel)


def _remove(path: Path) -> None:
    """Remove an entry (or a link where one should not be) without following links."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
