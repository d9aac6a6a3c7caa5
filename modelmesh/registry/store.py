"""The registry: etcd tables for models, vmodels, instances and copies, and their mirror.

Writes go to etcd in transactions (compare-and-set where a race matters).
Reads come from an in-memory mirror of the whole mesh prefix, kept current by
one resumable watch, so the request path never waits on etcd. ``wait_for``
gives read-your-writes where a caller needs it.

Key layout under the mesh prefix (see ARCHITECTURE.md):
``models/<modelId>``, ``vmodels/<vmodelId>``, ``instances/<instanceId>``,
``copies/<modelId>/<instanceId>``.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from modelmesh.errors import (
    AlreadyExists,
    InvalidArgument,
    MeshError,
    ModelNotFound,
)
from modelmesh.registry import etcd as e
from modelmesh.registry.creates import CreateBatcher
from modelmesh.registry.records import (
    CopyRecord,
    CopyState,
    InstanceRecord,
    ModelRecord,
    VModelRecord,
    replace,
)

log = logging.getLogger(__name__)

MODELS, VMODELS, INSTANCES, COPIES = "models", "vmodels", "instances", "copies"


def now_ms() -> int:
    return int(time.time() * 1000)


def validate_id(kind: str, value: str) -> None:
    """Model and instance ids become etcd key segments: refuse the ones that cannot."""
    if not value:
        raise InvalidArgument(f"{kind} must not be empty")
    if len(value) > 512:
        raise InvalidArgument(f"{kind} is longer than 512 characters")
    if any(ord(c) < 32 for c in value):
        raise InvalidArgument(f"{kind} {value!r} contains control characters")


@dataclass(frozen=True, slots=True)
class Change:
    """One change seen by the mirror; ``old``/``new`` are None for create/delete."""

    table: str
    key: str
    old: Any
    new: Any


Listener = Callable[[Change], None]


class Registry:
    """Typed access to the mesh's etcd tables plus a watch-fed mirror of them."""

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
        self._creates = CreateBatcher(client)

    # -- keys ---------------------------------------------------------------

    def key(self, table: str, *parts: str) -> bytes:
        return self._p + "/".join((table, *parts)).encode()

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
        table, _, rest = rel.partition("/")
        old: Any
        new: Any
        try:
            if table == MODELS:
                old = self.models.pop(rest, None)
                new = ModelRecord.from_json(value, model_id=rest) if value else None
                if new:
                    self.models[rest] = new
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
                model_id, _, instance_id = rest.rpartition("/")
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

    async def get_model(self, model_id: str) -> ModelRecord | None:
        """The model's record: from the mirror, or from etcd when the mirror lags."""
        rec = self.models.get(model_id)
        if rec is not None:
            return rec
        kv = await self.client.get(self.key(MODELS, model_id))
        return ModelRecord.from_json(kv.value, model_id=model_id) if kv else None

    async def require_model(self, model_id: str) -> ModelRecord:
        rec = await self.get_model(model_id)
        if rec is None:
            raise ModelNotFound(model_id)
        return rec

    async def register_model(self, record: ModelRecord,
                             replace_existing: bool = False) -> ModelRecord:
        """Create the model, or return the existing one when identical.

        A different definition under the same id is refused with ALREADY_EXISTS
        unless ``replace_existing`` is set. The same definition with new copy
        limits updates the limits.
        """
        validate_id("model id", record.model_id)
        key = self.key(MODELS, record.model_id)
        # The common case, a new id, shares one etcd transaction with the creates
        # that arrive meanwhile; anything else takes the compare-and-set loop below.
        revision = await self._creates.create(key, record.to_json())
        if revision:
            await self.wait_for(revision)
            return record
        for _ in range(10):
            resp = await self.client.txn(
                [e.cmp_version(key, "==", 0)],
                [e.op_put(key, record.to_json())],
                [e.op_get(key)],
            )
            if resp.succeeded:
                await self.wait_for(resp.header.revision)
                return record
            kvs = resp.responses[0].response_range.kvs
            if not kvs:
                continue  # deleted in between: try the create again
            existing = ModelRecord.from_json(kvs[0].value, model_id=record.model_id)
            if existing.same_definition(record):
                limits = (record.min_copies, record.max_copies)
                if limits == (existing.min_copies, existing.max_copies):
                    return existing
                # Same model, new copy limits: update them in place.
                updated = replace(existing, min_copies=limits[0], max_copies=limits[1])
                resp = await self.client.txn(
                    [e.cmp_mod_revision(key, "==", kvs[0].mod_revision)],
                    [e.op_put(key, updated.to_json())],
                )
                if resp.succeeded:
                    await self.wait_for(resp.header.revision)
                    return updated
                continue
            if not replace_existing:
                raise AlreadyExists(
                    f"model '{record.model_id}' is already registered with a different "
                    f"definition (type={existing.model_type}, path={existing.path}); "
                    "unregister it first or ask to replace it"
                )
            replaced = await self.client.txn(
                [e.cmp_mod_revision(key, "==", kvs[0].mod_revision)],
                [e.op_put(key, record.to_json())],
            )
            if replaced.succeeded:
                await self.wait_for(replaced.header.revision)
                return record
        raise MeshError(f"model '{record.model_id}' is being changed concurrently; retry")

    async def register_models(
        self, records: list[ModelRecord], replace_existing: bool = False, batch: int = 100
    ) -> list[MeshError | None]:
        """Register many models; one result per record (None on success).

        New ids go in as batched transactions (one etcd round trip per ``batch``);
        ids that exist take the single-model path to be compared or replaced.
        """
        results: list[MeshError | None] = [None] * len(records)
        pending: list[int] = []
        for i, rec in enumerate(records):
            try:
                validate_id("model id", rec.model_id)
            except MeshError as exc:
                results[i] = exc
                continue
            pending.append(i)
        slow: list[int] = []
        last_rev = 0
        for start in range(0, len(pending), batch):
            chunk = pending[start:start + batch]
            keys = [self.key(MODELS, records[i].model_id) for i in chunk]
            if len(set(keys)) != len(keys):
                slow.extend(chunk)
                continue
            resp = await self.client.txn(
                [e.cmp_version(k, "==", 0) for k in keys],
                [e.op_put(k, records[i].to_json()) for k, i in zip(keys, chunk, strict=True)],
            )
            if resp.succeeded:
                last_rev = resp.header.revision
            else:
                slow.extend(chunk)
        for i in slow:
            try:
                await self.register_model(records[i], replace_existing)
            except MeshError as exc:
                results[i] = exc
        if last_rev:
            await self.wait_for(last_rev, timeout=30)
        return results

    async def update_model(self, record: ModelRecord) -> None:
        """Overwrite fields of an existing model (size estimate, last used)."""
        key = self.key(MODELS, record.model_id)
        await self.client.txn([e.cmp_version(key, ">", 0)], [e.op_put(key, record.to_json())])

    async def unregister_model(self, model_id: str) -> bool:
        """Delete the model and its copy records; False when it was not registered."""
        key = self.key(MODELS, model_id)
        resp = await self.client.txn(
            [e.cmp_version(key, ">", 0)],
            [e.op_delete(key), e.op_delete(self.key(COPIES, model_id) + b"/", prefix=True)],
        )
        if resp.succeeded:
            await self.wait_for(resp.header.revision)
        return bool(resp.succeeded)

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

    # -- vmodels --------------------------------------------------------------

    async def get_vmodel(self, vmodel_id: str) -> tuple[VModelRecord, int] | None:
        """The vmodel record with its mod revision, read from etcd (for CAS)."""
        kv = await self.client.get(self.key(VMODELS, vmodel_id))
        if kv is None:
            return None
        return VModelRecord.from_json(kv.value, vmodel_id=vmodel_id), kv.mod_revision

    async def put_vmodel(self, record: VModelRecord, expected_revision: int | None) -> bool:
        """Write a vmodel if it is unchanged since ``expected_revision`` (0: must not exist)."""
        key = self.key(VMODELS, record.vmodel_id)
        if expected_revision is None:
            compare: list[Any] = []
        elif expected_revision == 0:
            compare = [e.cmp_version(key, "==", 0)]
        else:
            compare = [e.cmp_mod_revision(key, "==", expected_revision)]
        resp = await self.client.txn(compare, [e.op_put(key, record.to_json())])
        if resp.succeeded:
            await self.wait_for(resp.header.revision)
        return bool(resp.succeeded)

    async def delete_vmodel(self, vmodel_id: str, expected_revision: int) -> bool:
        key = self.key(VMODELS, vmodel_id)
        resp = await self.client.txn(
            [e.cmp_mod_revision(key, "==", expected_revision)], [e.op_delete(key)]
        )
        if resp.succeeded:
            await self.wait_for(resp.header.revision)
        return bool(resp.succeeded)

    def vmodels_referencing(self, model_id: str) -> Iterable[VModelRecord]:
        return (
            v for v in self.vmodels.values()
            if model_id in (v.active_model, v.target_model)
        )

    # -- instances and copies -------------------------------------------------

    async def put_instance(self, record: InstanceRecord, lease: int) -> None:
        await self.client.put(self.key(INSTANCES, record.instance_id), record.to_json(), lease)

    async def put_copy(self, record: CopyRecord, lease: int) -> None:
        """Publish a copy's state, but only while its model is still registered."""
        model_key = self.key(MODELS, record.model_id)
        await self.client.txn(
            [e.cmp_version(model_key, ">", 0)],
            [e.op_put(self.key(COPIES, record.model_id, record.instance_id),
                      record.to_json(), lease)],
        )

    async def claim_copy(self, model_id: str, instance_id: str,
                         lease: int) -> dict[str, CopyRecord] | None:
        """Claim the first copy of a model that has none: one load for the whole mesh.

        Atomically writes a LOADING copy record for ``instance_id`` if no copy
        record of the model exists anywhere. Returns None when claimed, else the
        copies that exist (by instance id).
        """
        prefix = self.key(COPIES, model_id) + b"/"
        mine = CopyRecord(model_id, instance_id, CopyState.LOADING, updated_ms=now_ms())
        resp = await self.client.txn(
            [e.cmp_version(prefix, "==", 0, prefix=True),
             e.cmp_version(self.key(MODELS, model_id), ">", 0)],
            [e.op_put(self.key(COPIES, model_id, instance_id), mine.to_json(), lease)],
            [e.op_get(prefix, prefix=True)],
        )
        if resp.succeeded:
            return None
        out = {}
        for kv in resp.responses[0].response_range.kvs:
            iid = kv.key[len(prefix):].decode()
            out[iid] = CopyRecord.from_json(kv.value, model_id=model_id, instance_id=iid)
        return out

    async def delete_copy(self, model_id: str, instance_id: str) -> None:
        await self.client.delete(self.key(COPIES, model_id, instance_id))

    async def release_copy(self, model_id: str, instance_id: str, other: str) -> bool:
        """Delete ``instance_id``'s copy record of the model only while ``other`` holds one.

        One transaction: of two instances that each give up their copy in favour
        of the other at the same moment, only the first succeeds.
        """
        resp = await self.client.txn(
            [e.cmp_version(self.key(COPIES, model_id, other), ">", 0)],
            [e.op_delete(self.key(COPIES, model_id, instance_id))],
        )
        return bool(resp.succeeded)

    # -- usage and leadership ---------------------------------------------------

    async def record_use(self, model_id: str, last_used_ms: int = 0, request_rate: float = 0.0,
                         size_bytes: int = 0) -> None:
        """Store a model's last use and rate, or its measured size, in its record.

        Compare-and-set on the record's revision: a registration that changed
        meanwhile is never overwritten.
        """
        key = self.key(MODELS, model_id)
        kv = await self.client.get(key)
        if kv is None:
            return
        rec = ModelRecord.from_json(kv.value, model_id=model_id)
        new = rec
        if last_used_ms > rec.last_used_ms:
            new = replace(new, last_used_ms=last_used_ms, request_rate=round(request_rate, 6))
        if size_bytes and size_bytes != rec.size_estimate:
            new = replace(new, size_estimate=size_bytes)
        if new == rec:
            return
        await self.client.txn([e.cmp_mod_revision(key, "==", kv.mod_revision)],
                              [e.op_put(key, new.to_json())])

    async def try_lead(self, instance_id: str, lease: int) -> bool:
        """Become the leader if there is none; True while ``instance_id`` is the leader.

        The ``leader`` key is bound to the leader's lease, so it disappears when the
        leader dies and the next instance to ask takes over.
        """
        key = self._p + b"leader"
        resp = await self.client.txn(
            [e.cmp_version(key, "==", 0)],
            [e.op_put(key, instance_id.encode(), lease)],
            [e.op_get(key)],
        )
        if resp.succeeded:
            log.info("this instance (%s) is now the mesh leader", instance_id)
            return True
        kvs = resp.responses[0].response_range.kvs
        return bool(kvs) and kvs[0].value == instance_id.encode()
