"""The registry's mirror: every record under the mesh prefix, in memory, kept by one watch.

Reads on the request path come from here and never wait on etcd. The watch
resumes from the last revision after a disconnect and re-lists after a
compaction; listeners hear every change. ``wait_for`` gives read-your-writes.

Ids are escaped in keys (``key_segment``): ``%`` becomes ``%25`` and ``/``
becomes ``%2F``, so no id's keys are a prefix of another's (``copies/x/`` must
not hold the copies of ``x/y``), and every key maps back to its ids.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from modelmesh.registry import etcd as e
from modelmesh.registry.misses import MissedLookups
from modelmesh.registry.records import CopyRecord, InstanceRecord, ModelRecord, VModelRecord

log = logging.getLogger(__name__)

MODELS, VMODELS, INSTANCES, COPIES = "models", "vmodels", "instances", "copies"


def key_segment(value: str) -> str:
    """An id as one etcd key segment: ``%`` and ``/`` escaped, nothing else changed."""
    if "%" in value or "/" in value:
        return value.replace("%", "%25").replace("/", "%2F")
    return value


def from_key_segment(segment: str) -> str:
    """The id of a key segment (the inverse of ``key_segment``)."""
    return urllib.parse.unquote(segment) if "%" in segment else segment


@dataclass(frozen=True, slots=True)
class Change:
    """One change seen by the mirror; ``old``/``new`` are None for create/delete.

    ``key`` is the row's id; for a copy, ``<model id>/<instance id>`` for logs
    only (ids may contain ``/``: read them from the record).
    """

    table: str
    key: str
    old: Any
    new: Any


Listener = Callable[[Change], None]


class Mirror:
    """The watch-fed copy of the mesh's tables (``Registry`` adds the writes)."""

    def __init__(self, client: e.EtcdClient, prefix: str) -> None:
        if not prefix.endswith("/"):
            prefix += "/"
        self.client = client
        self.prefix = prefix
        self._p = prefix.encode()
        self.models: dict[str, ModelRecord] = {}
        self.vmodels: dict[str, VModelRecord] = {}
        self.instances: dict[str, InstanceRecord] = {}
        self.copies: dict[str, dict[str, CopyRecord]] = {}
        self.revision = 0
        self._listeners: list[Listener] = []
        self._revision_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._sorted_ids: list[str] | None = None  # cache for paged listing
        self._misses = MissedLookups()

    # -- keys ---------------------------------------------------------------

    def key(self, table: str, *ids: str) -> bytes:
        """The etcd key of a row: the table, then each id escaped (``key_segment``)."""
        return self._p + "/".join((table, *map(key_segment, ids))).encode()

    # -- mirror -------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def load(self) -> int:
        """Fill the mirror from etcd; returns the revision to watch from."""
        kvs, revision = await self.client.get_prefix(self._p)
        self.models.clear()
        self.vmodels.clear()
        self.instances.clear()
        self.copies.clear()
        for kv in kvs:
            self.apply_change(kv.key, kv.value, notify=False)
        self._sorted_ids = None
        self._set_revision(revision)
        return revision

    async def run_watch(self, start_revision: int) -> None:
        """Apply etcd changes to the mirror until cancelled; re-lists after compaction."""
        rev = start_revision
        while True:
            async for batch in self.client.watch_prefix(self._p, rev + 1):
                if isinstance(batch, e.Resync):
                    break
                for ev in batch:
                    value = ev.value if ev.type is e.EventType.PUT else None
                    self.apply_change(ev.key, value)
                self._set_revision(batch[-1].mod_revision)
            rev = await self._resync()

    async def _resync(self) -> int:
        old = (dict(self.models), dict(self.vmodels), dict(self.instances),
               {m: dict(c) for m, c in self.copies.items()})
        rev = await self.load()
        # Tell listeners about what disappeared or changed while history was lost.
        for table, before, after in (
            (MODELS, old[0], self.models),
            (VMODELS, old[1], self.vmodels),
            (INSTANCES, old[2], self.instances),
        ):
            for k in before.keys() | after.keys():
                if before.get(k) != after.get(k):
                    self._notify(Change(table, k, before.get(k), after.get(k)))
        return rev

    def _set_revision(self, revision: int) -> None:
        self.revision = max(self.revision, revision)
        if self._revision_waiters:
            keep = []
            for rev, fut in self._revision_waiters:
                if rev <= self.revision:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    keep.append((rev, fut))
            self._revision_waiters = keep

    async def wait_for(self, revision: int, timeout: float = 5.0) -> None:
        """Wait until the mirror has applied ``revision`` (read-your-writes)."""
        if revision <= self.revision:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._revision_waiters.append((revision, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            log.warning("mirror did not reach revision %d within %.1fs", revision, timeout)

    def _notify(self, change: Change) -> None:
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:  # a faulty listener must not stop the mirror
                log.exception("registry listener failed on %s/%s", change.table, change.key)

    def apply_change(self, raw_key: bytes, value: bytes | None, notify: bool = True) -> None:
        """Apply one etcd key's new value (None: deleted) to the mirror and tell listeners.

        The watch feeds every change through here; so do unit tests that need
        a mirror without etcd.
        """
        rel = raw_key[len(self._p):].decode()
        table, _, segment = rel.partition("/")
        old: Any
        new: Any
        try:
            if table == COPIES:
                model_segment, _, instance_segment = segment.partition("/")
                model_id = from_key_segment(model_segment)
                instance_id = from_key_segment(instance_segment)
                rest = f"{model_id}/{instance_id}"  # Change.key; read the ids from the records
            else:
                rest = from_key_segment(segment)
            if table == MODELS:
                old = self.models.pop(rest, None)
                new = ModelRecord.from_json(value, model_id=rest) if value else None
                if new:
                    self.models[rest] = new
                    self._misses.forget(rest)
                if (old is None) != (new is None):
                    self._sorted_ids = None
            elif table == VMODELS:
                old = self.vmodels.pop(rest, None)
                new = VModelRecord.from_json(value, vmodel_id=rest) if value else None
                if new:
                    self.vmodels[rest] = new
            elif table == INSTANCES:
                old = self.instances.pop(rest, None)
                new = InstanceRecord.from_json(value, instance_id=rest) if value else None
                if new:
                    self.instances[rest] = new
            elif table == COPIES:
                holders = self.copies.setdefault(model_id, {})
                old = holders.pop(instance_id, None)
                new = (
                    CopyRecord.from_json(value, model_id=model_id, instance_id=instance_id)
                    if value else None
                )
                if new:
                    holders[instance_id] = new
                elif not holders:
                    del self.copies[model_id]
            else:
                return
        except (ValueError, TypeError) as exc:
            log.error("ignoring malformed registry entry %s: %s", rel, exc)
            return
        if notify:
            self._notify(Change(table, rest, old, new))

    # -- models ---------------------------------------------------------------

    # -- queries ------------------------------------------------------------

    def list_model_ids(self, prefix: str = "") -> list[str]:
        """Registered model ids in sorted order (from the mirror)."""
        if self._sorted_ids is None:
            self._sorted_ids = sorted(self.models)
        ids = self._sorted_ids
        if prefix:
            lo = bisect.bisect_left(ids, prefix)
            hi = lo
            while hi < len(ids) and ids[hi].startswith(prefix):
                hi += 1
            return ids[lo:hi]
        return ids

    def vmodels_referencing(self, model_id: str) -> Iterable[VModelRecord]:
        return (
            v for v in self.vmodels.values()
            if model_id in (v.active_model, v.target_model)
        )

