"""The registry's mirror: etcd changes applied to the tables, listeners told, bad entries
skipped. Fed in memory through ``Registry.apply_change`` (the watch's path)."""

from __future__ import annotations

from modelmesh.registry.records import (
    CopyRecord,
    CopyState,
    InstanceRecord,
    ModelRecord,
    VModelRecord,
)
from modelmesh.registry.store import COPIES, MODELS, Change
from tests.support.mirror import delete, in_memory_registry, put


async def test_each_table_is_mirrored_and_listeners_see_old_and_new():
    registry = in_memory_registry()
    seen: list[Change] = []
    registry.add_listener(seen.append)
    try:
        model = ModelRecord("m", "identity", "m.json", min_copies=1)
        put(registry, model, VModelRecord("v", "m", "m"), InstanceRecord("i", "h:1", 100),
            CopyRecord("m", "i", CopyState.LOADING))
        assert registry.models == {"m": model}
        assert registry.vmodels["v"].active_model == "m"
        assert registry.instances["i"].endpoint == "h:1"
        assert registry.copies == {"m": {"i": CopyRecord("m", "i", CopyState.LOADING)}}
        loaded = CopyRecord("m", "i", CopyState.LOADED, size_bytes=7)
        put(registry, loaded)
        assert seen[-1] == Change(COPIES, "m/i", CopyRecord("m", "i", CopyState.LOADING), loaded)
        delete(registry, loaded)
        assert registry.copies == {}  # the model's holder table goes with its last copy
        delete(registry, model)
        assert seen[-1] == Change(MODELS, "m", model, None) and registry.models == {}
    finally:
        await registry.client.close()


async def test_a_malformed_entry_is_skipped_and_a_failing_listener_stops_nothing():
    registry = in_memory_registry()

    def broken(change: Change) -> None:
        raise RuntimeError("listener bug")

    registry.add_listener(broken)
    try:
        registry.apply_change(registry.key(MODELS, "bad"), b"{not json")
        assert registry.models == {}
        put(registry, ModelRecord("good", "identity", "g.json"))
        assert list(registry.models) == ["good"]
    finally:
        await registry.client.close()


async def test_model_ids_are_listed_sorted_and_by_prefix():
    registry = in_memory_registry()
    try:
        put(registry, *(ModelRecord(i, "identity", "x.json") for i in ("b2", "a", "b1", "c")))
        assert registry.list_model_ids() == ["a", "b1", "b2", "c"]
        assert registry.list_model_ids("b") == ["b1", "b2"]
        put(registry, ModelRecord("b0", "identity", "x.json"))
        assert registry.list_model_ids("b") == ["b0", "b1", "b2"]
    finally:
        await registry.client.close()
