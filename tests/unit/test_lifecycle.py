"""Registration checks, loading and the registry listener, with real parts (no etcd).

See tests/support/parts.py: a real ModelCache and Registry mirror, a stand-in loader.
"""

from __future__ import annotations

import asyncio

import pytest

from modelmesh.errors import InvalidArgument
from modelmesh.registry.records import CopyRecord, CopyState, ModelRecord
from modelmesh.view import Status
from tests.support.mirror import delete, put
from tests.support.parts import build


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"model_id": ""}, "must not be empty"),
    ({"model_type": ""}, "type is required"),
    ({"model_type": "nosuch"}, "unknown model type 'nosuch'"),
    ({"min_copies": 65}, "between 0 and 64"),
    ({"min_copies": 3, "max_copies": 2}, "exceed max copies"),
])
async def test_bad_registrations_say_what_is_wrong(kwargs, message):
    parts = build()
    try:
        args = {"model_id": "m", "model_type": "identity", "path": "m.json", **kwargs}
        with pytest.raises(InvalidArgument, match=message):
            parts.lifecycle.new_record(**args)
    finally:
        await parts.close()


async def test_ensure_loaded_here_loads_into_this_cache():
    parts = build("me")
    try:
        put(parts.registry, ModelRecord("m", "identity", "m.json"))
        status = await parts.lifecycle.ensure_loaded("m", sync=True, here=True)
        assert status.status is Status.LOADED
        assert parts.loader.loads == {"m": 1}
    finally:
        await parts.close()


async def test_ensure_loaded_leaves_a_model_with_a_live_copy_alone():
    parts = build("me", peers=("a",))
    try:
        put(parts.registry, ModelRecord("m", "identity", "m.json"),
            CopyRecord("m", "a", CopyState.LOADED))
        status = await parts.lifecycle.ensure_loaded("m", sync=True)
        assert status.status is Status.LOADED and parts.loader.loads == {}
    finally:
        await parts.close()


async def test_unregistered_and_redefined_models_leave_the_cache():
    parts = build("me")
    try:
        one = ModelRecord("one", "identity", "1.json")
        two = ModelRecord("two", "identity", "2.json")
        put(parts.registry, one, two)
        for rec in (one, two):
            parts.cache.release(await parts.cache.acquire(rec))
        delete(parts.registry, one)  # unregistered on another instance
        assert parts.cache.get("one") is None
        put(parts.registry, ModelRecord("two", "identity", "other.json"))  # replaced there
        assert parts.cache.get("two") is None
    finally:
        await parts.close()


async def test_an_unknown_vmodel_has_no_state():
    parts = build()
    try:
        status = parts.lifecycle.vmodel_status("nope")
        assert status.state is None and status.active_status.status is Status.NOT_FOUND
    finally:
        await parts.close()


class LaggingPeer:
    """Stand-in for the router as CopyPlacer: places every model on the peer "a", whose
    load finishes before its copy record reaches this instance's mirror (as found by
    deploy/test-kubernetes: the peer answered, the watch event came ~5 ms later)."""

    def __init__(self, registry, delay_s: float) -> None:
        self.registry, self.delay_s = registry, delay_s
        self.tasks: list[asyncio.Task] = []

    def choose(self, record):
        return "a", True

    async def load_on(self, target, model_id, sync=False, timeout=None):
        async def record_arrives() -> None:
            await asyncio.sleep(self.delay_s)
            put(self.registry, CopyRecord(model_id, target, CopyState.LOADED))

        self.tasks.append(asyncio.get_running_loop().create_task(record_arrives()))


async def test_a_sync_load_on_a_peer_waits_for_its_copy_to_be_seen():
    parts = build("me", peers=("a",))
    try:
        put(parts.registry, ModelRecord("m", "identity", "m.json"))
        parts.lifecycle.placer = placer = LaggingPeer(parts.registry, 0.2)
        status = await parts.lifecycle.ensure_loaded("m", sync=True)
        assert status.status is Status.LOADED  # not NOT_LOADED from a lagging view
        await asyncio.gather(*placer.tasks)
    finally:
        await parts.close()
