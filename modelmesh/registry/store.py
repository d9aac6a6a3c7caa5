"""The registry: typed writes to the etcd tables of models, vmodels, instances and copies.

Writes go to etcd in transactions (compare-and-set where a race matters); the
reads come from the watch-fed mirror (``modelmesh.registry.mirror``) that
``Registry`` extends, so the request path never waits on etcd.

Key layout under the mesh prefix (see ARCHITECTURE.md): ``models/<modelId>``,
``vmodels/<vmodelId>``, ``instances/<instanceId>``, ``copies/<modelId>/<instanceId>``,
each id escaped (``key_segment``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from modelmesh.errors import (
    AlreadyExists,
    InvalidArgument,
    MeshError,
    ModelNotFound,
    PreconditionFailed,
)
from modelmesh.registry import etcd as e
from modelmesh.registry.creates import CreateBatcher
from modelmesh.registry.mirror import (
    COPIES,
    INSTANCES,
    MODELS,
    VMODELS,
    Change,
    Listener,
    Mirror,
    from_key_segment,
    key_segment,
)
from modelmesh.registry.records import (
    CopyRecord,
    CopyState,
    InstanceRecord,
    ModelRecord,
    Use,
    VModelRecord,
    replace,
)

__all__ = [
    "COPIES", "INSTANCES", "MODELS", "VMODELS", "Change", "Listener", "Registry",
    "key_segment", "now_ms", "validate_id",
]

log = logging.getLogger(__name__)

#: The most operations one batched write puts in a transaction (etcd refuses more
#: than its ``--max-txn-ops``, 128 by default).
MAX_TXN_OPS = 64


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


class Registry(Mirror):
    """Typed writes to the mesh's etcd tables, over the mirror they feed (``Mirror``)."""

    def __init__(self, client: e.EtcdClient, prefix: str) -> None:
        super().__init__(client, prefix)
        self._creates = CreateBatcher(client)

    # -- models ---------------------------------------------------------------

    async def get_model(self, model_id: str, strict: bool = False) -> ModelRecord | None:
        """The model's record: from the mirror, or from etcd when the mirror may lag.

        The etcd read is only for a registration made elsewhere a moment ago
        that the watch has not delivered yet, so it is kept cheap for names that
        do not exist (``MissedLookups``): an id etcd just said is absent is answered
        from the mirror for a while (the watch drops it from that list the moment
        it is registered), reads are rate-limited, and while etcd does not answer
        the mirror answers at once. ``strict`` (management calls) always reads etcd.
        """
        rec = self.models.get(model_id)
        if rec is not None:
            return rec
        if strict:
            kv = await self.client.get(self.key(MODELS, model_id))
            return ModelRecord.from_json(kv.value, model_id=model_id) if kv else None
        if not self._misses.should_read(model_id):
            return None
        try:
            kv = await asyncio.wait_for(self.client.get(self.key(MODELS, model_id)),
                                        self._misses.read_timeout)
        except (MeshError, TimeoutError) as exc:
            self._misses.etcd_failed(exc)
            return self.models.get(model_id)
        if kv is None:
            self._misses.absent(model_id)
            return None
        return ModelRecord.from_json(kv.value, model_id=model_id)

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

    async def unregister_model(self, model_id: str, unless_referenced: bool = True) -> bool:
        """Delete the model and its copy records; False when it was not registered.

        With ``unless_referenced`` a model that a vmodel names (as active or target
        model) is refused with ``PreconditionFailed``, and the check is part of the
        delete: the transaction also requires that no vmodel changed after the
        mirror revision the check read, so a ``put_vmodel`` naming the model
        either lands first (and the delete is refused) or fails (the model is gone).
        """
        key = self.key(MODELS, model_id)
        deletes = [e.op_delete(key), e.op_delete(self.key(COPIES, model_id) + b"/", prefix=True)]
        for _ in range(20):
            compare = [e.cmp_version(key, ">", 0)]
            if unless_referenced:
                seen = self.revision
                users = sorted(v.vmodel_id for v in self.vmodels_referencing(model_id))
                if users:
                    raise PreconditionFailed(
                        f"model '{model_id}' is used by vmodel(s) {', '.join(users)}; "
                        "delete or retarget them first"
                    )
                vmodels = self._p + VMODELS.encode() + b"/"
                compare.append(e.cmp_mod_revision(vmodels, "<", seen + 1, prefix=True))
            resp = await self.client.txn(compare, deletes, [e.op_get(key, count_only=True)])
            if resp.succeeded:
                await self.wait_for(resp.header.revision)
                return True
            if not resp.responses[0].response_range.count:
                return False
            # A vmodel changed after the mirror's view: catch up and check again.
            await self.wait_for(resp.header.revision)
        raise MeshError(f"model '{model_id}': vmodels are changing concurrently; retry")

    # -- vmodels --------------------------------------------------------------

    async def get_vmodel(self, vmodel_id: str) -> tuple[VModelRecord, int] | None:
        """The vmodel record with its mod revision, read from etcd (for CAS)."""
        kv = await self.client.get(self.key(VMODELS, vmodel_id))
        if kv is None:
            return None
        return VModelRecord.from_json(kv.value, vmodel_id=vmodel_id), kv.mod_revision

    async def put_vmodel(self, record: VModelRecord, expected_revision: int | None) -> bool:
        """Write a vmodel if it is unchanged since ``expected_revision`` (0: must not exist).

        In the same transaction its active and target models must be registered
        (``ModelNotFound`` otherwise): a vmodel never names an unregistered model,
        however it races ``unregister_model``.
        """
        key = self.key(VMODELS, record.vmodel_id)
        if expected_revision is None:
            compare: list[Any] = []
        elif expected_revision == 0:
            compare = [e.cmp_version(key, "==", 0)]
        else:
            compare = [e.cmp_mod_revision(key, "==", expected_revision)]
        models = sorted({record.active_model, record.target_model})
        model_keys = [self.key(MODELS, m) for m in models]
        compare += [e.cmp_version(k, ">", 0) for k in model_keys]
        resp = await self.client.txn(compare, [e.op_put(key, record.to_json())],
                                     [e.op_get(k, count_only=True) for k in model_keys])
        if resp.succeeded:
            await self.wait_for(resp.header.revision)
            return True
        for model_id, r in zip(models, resp.responses, strict=True):
            if not r.response_range.count:
                raise ModelNotFound(model_id)
        return False

    async def delete_vmodel(self, vmodel_id: str, expected_revision: int) -> bool:
        key = self.key(VMODELS, vmodel_id)
        resp = await self.client.txn(
            [e.cmp_mod_revision(key, "==", expected_revision)], [e.op_delete(key)]
        )
        if resp.succeeded:
            await self.wait_for(resp.header.revision)
        return bool(resp.succeeded)

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
            iid = from_key_segment(kv.key[len(prefix):].decode())
            out[iid] = CopyRecord.from_json(kv.value, model_id=model_id, instance_id=iid)
        return out

    async def delete_copy(self, model_id: str, instance_id: str) -> None:
        await self.client.delete(self.key(COPIES, model_id, instance_id))

    async def write_copies(self, instance_id: str, puts: Sequence[CopyRecord],
                           deletes: Sequence[str], lease: int) -> None:
        """Publish several of one instance's copy records, and delete others, in one write.

        One transaction (at most ``MAX_TXN_OPS`` records): each put only while its
        model is registered, as ``put_copy``. When one of those models has gone
        (the transaction refuses them all), each is written on its own instead.
        """
        ops = [e.op_put(self.key(COPIES, r.model_id, instance_id), r.to_json(), lease)
               for r in puts]
        ops += [e.op_delete(self.key(COPIES, m, instance_id)) for m in deletes]
        if not ops:
            return
        resp = await self.client.txn(
            [e.cmp_version(self.key(MODELS, r.model_id), ">", 0) for r in puts], ops)
        if resp.succeeded:
            return
        for r in puts:
            await self.put_copy(r, lease)
        for m in deletes:
            await self.delete_copy(m, instance_id)

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

    async def record_uses(self, uses: Mapping[str, Use]) -> None:
        """Store models' last use and rate, or measured size, in their records: one read
        and one write for all of them (placement elsewhere values unloaded models by them).

        At most ``MAX_TXN_OPS`` models. Each write is a compare-and-set on its
        record's revision; when one record changed between the read and the write
        (the transaction refuses them all), the others are tried again once on
        their own, and that one is left as it now is.
        """
        keys = {m: self.key(MODELS, m) for m in uses}
        read = await self.client.txn([], [e.op_get(k) for k in keys.values()])
        compares, ops, written = [], [], []
        for (model_id, key), got in zip(keys.items(), read.responses, strict=True):
            kvs = got.response_range.kvs
            if not kvs:
                continue  # unregistered meanwhile
            rec = ModelRecord.from_json(kvs[0].value, model_id=model_id)
            new = uses[model_id].applied_to(rec)
            if new != rec:
                compares.append(e.cmp_mod_revision(key, "==", kvs[0].mod_revision))
                ops.append(e.op_put(key, new.to_json()))
                written.append(model_id)
        if not ops:
            return
        resp = await self.client.txn(compares, ops)
        if resp.succeeded or len(written) == 1:
            return
        for model_id in written:
            await self.record_uses({model_id: uses[model_id]})

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
