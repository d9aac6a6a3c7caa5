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
