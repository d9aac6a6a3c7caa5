"""The registry's writes against a real etcd: create, idempotent re-registration,
new copy limits, conflicts and replacement, seen through the registry's own mirror."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from modelmesh.errors import AlreadyExists
from modelmesh.registry.etcd import EtcdClient
from modelmesh.registry.records import CopyRecord, CopyState, ModelRecord
from modelmesh.registry.store import COPIES, Registry

pytestmark = pytest.mark.integration

_MESHES = itertools.count()


async def _registry(etcd_server) -> tuple[Registry, asyncio.Task[None]]:
    registry = Registry(EtcdClient([etcd_server.endpoint]), f"/modelmesh/store-{next(_MESHES)}/")
    revision = await registry.load()
    return registry, asyncio.get_running_loop().create_task(registry.run_watch(revision))


async def _close(registry: Registry, watch: asyncio.Task[None]) -> None:
    watch.cancel()
    await asyncio.gather(watch, return_exceptions=True)
    await registry.client.close()


async def test_same_model_with_new_copy_limits_updates_the_limits(etcd_server):
    registry, watch = await _registry(etcd_server)
    try:
        plain = ModelRecord("m", "identity", "m.json")
        assert await registry.register_model(plain) == plain
        assert await registry.register_model(plain) == plain  # identical: nothing to do
        limited = ModelRecord("m", "identity", "m.json", min_copies=1, max_copies=3)
        stored = await registry.register_model(limited)
        assert (stored.min_copies, stored.max_copies) == (1, 3)
        assert (registry.models["m"].min_copies, registry.models["m"].max_copies) == (1, 3)
    finally:
        await _close(registry, watch)


async def test_a_different_definition_needs_replace(etcd_server):
    registry, watch = await _registry(etcd_server)
    try:
        await registry.register_model(ModelRecord("m", "identity", "m.json"))
        other = ModelRecord("m", "identity", "other.json")
        with pytest.raises(AlreadyExists, match="different definition"):
            await registry.register_model(other)
        assert registry.models["m"].path == "m.json"
        assert await registry.register_model(other, replace_existing=True) == other
        assert registry.models["m"].path == "other.json"
    finally:
        await _close(registry, watch)


async def test_two_holders_letting_go_at_once_keep_one_copy(etcd_server):
    registry, watch = await _registry(etcd_server)
    try:
        await registry.register_model(ModelRecord("m", "identity", "m.json"))
        for iid in ("a", "b"):
            await registry.put_copy(CopyRecord("m", iid, CopyState.LOADED), 0)
        outcomes = await asyncio.gather(registry.release_copy("m", "a", "b"),
                                        registry.release_copy("m", "b", "a"))
        assert sorted(outcomes) == [False, True]
        kvs, _ = await registry.client.get_prefix(registry.key(COPIES, "m") + b"/")
        assert len(kvs) == 1
    finally:
        await _close(registry, watch)


async def test_copy_records_written_together_and_one_by_one_when_a_model_went(etcd_server):
    registry, watch = await _registry(etcd_server)
    try:
        for m in ("a", "b"):
            await registry.register_model(ModelRecord(m, "identity", f"{m}.json"))
        await registry.put_copy(CopyRecord("old", "i1", CopyState.LOADED), 0)  # no model
        await registry.write_copies("i1", [CopyRecord("a", "i1", CopyState.LOADED, 10),
                                           CopyRecord("b", "i1", CopyState.LOADING)], [], 0)
        kvs, _ = await registry.client.get_prefix(registry.key(COPIES))
        assert sorted(kv.key.rsplit(b"/", 2)[-2] for kv in kvs) == [b"a", b"b"]
        # "gone" is not registered: the batch is refused and the others go one by one,
        # the delete included.
        await registry.write_copies("i1", [CopyRecord("a", "i1", CopyState.LOADED, 20),
                                           CopyRecord("gone", "i1", CopyState.LOADED)],
                                    ["b"], 0)
        kvs, _ = await registry.client.get_prefix(registry.key(COPIES))
        assert [kv.key.rsplit(b"/", 2)[-2] for kv in kvs] == [b"a"]
        assert CopyRecord.from_json(kvs[0].value, model_id="a", instance_id="i1").size_bytes == 20
    finally:
        await _close(registry, watch)


async def test_uses_written_back_together_never_over_a_newer_registration(etcd_server):
    from modelmesh.registry.records import Use

    registry, watch = await _registry(etcd_server)
    try:
        for m in ("a", "b", "c"):
            await registry.register_model(ModelRecord(m, "identity", f"{m}.json"))
        await registry.record_uses({"a": Use(1000, 2.5), "b": Use(size_bytes=777),
                                    "missing": Use(5)})

        async def stored(m: str) -> ModelRecord:
            kv = await registry.client.get(registry.key("models", m))
            assert kv is not None
            return ModelRecord.from_json(kv.value, model_id=m)

        a, b = await stored("a"), await stored("b")
        assert (a.last_used_ms, a.request_rate, a.size_estimate) == (1000, 2.5, 0)
        assert (b.last_used_ms, b.size_estimate) == (0, 777)
        assert await registry.client.get(registry.key("models", "missing")) is None
        # An older use changes nothing; merged writes keep the latest use and the size.
        await registry.record_uses({"a": Use(500, 9.0)})
        assert (await stored("a")).request_rate == 2.5
        assert Use(1000, 1.0).merged(Use(900, 3.0, 64)) == Use(1000, 1.0, 64)
    finally:
        await _close(registry, watch)
