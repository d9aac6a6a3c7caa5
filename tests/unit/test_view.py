"""The read-only mesh view: live copies, model status, the single-copy shortcut.

Real ``ModelCache`` and ``Registry`` (its mirror fed in memory), see tests/support.
"""

from __future__ import annotations

import time

import pytest

from modelmesh.registry.records import CopyRecord, CopyState, InstanceRecord, ModelRecord
from modelmesh.view import Status
from tests.support.mirror import put
from tests.support.parts import build


def _rec(model_id: str) -> ModelRecord:
    return ModelRecord(model_id, "identity", f"{model_id}.json")


@pytest.mark.parametrize(("state", "where", "draining", "cached", "excluded", "expected"), [
    ("LOADED", "peer", False, False, frozenset(), "peer"),
    ("LOADING", "peer", False, False, frozenset(), None),  # waits are placement's business
    ("LOADED", "peer", True, False, frozenset(), None),  # shutting down: ask placement
    ("LOADED", "peer", False, True, frozenset(), None),  # an entry here: not this shortcut
    ("LOADED", "peer", False, False, frozenset({"peer"}), None),  # tried or suspect
    ("LOADED", "me", False, False, frozenset(), None),
])
async def test_single_loaded_copy_elsewhere_is_taken_directly(state, where, draining, cached,
                                                              excluded, expected):
    parts = build("me", peers=("other",))
    try:
        put(parts.registry, InstanceRecord(where, "127.0.0.1:9", 1000, shutting_down=draining),
            _rec("m"), CopyRecord("m", where, CopyState[state]))
        if cached:
            parts.cache.release(await parts.cache.acquire(_rec("m")))
        assert parts.view.only_copy("m", excluded) == expected
        put(parts.registry, CopyRecord("m", "other", CopyState.LOADED))
        assert parts.view.only_copy("m", frozenset()) is None
    finally:
        await parts.close()


async def test_live_copies_leave_out_gone_and_shutting_down_instances():
    parts = build("me", peers=("a", "b"))
    try:
        put(parts.registry, _rec("m"), InstanceRecord("b", "127.0.0.1:3", 1000, shutting_down=True),
            CopyRecord("m", "a", CopyState.LOADED), CopyRecord("m", "b", CopyState.LOADED),
            CopyRecord("m", "gone", CopyState.LOADED), CopyRecord("m", "me", CopyState.FAILED))
        # this instance's own copy comes from its cache (none here), not from its record
        assert parts.view.copy_states("m") == {"a": CopyState.LOADED}
        held = await parts.cache.acquire(_rec("m"))
        assert parts.view.live_copies("m") == ["a", "me"]
        assert parts.view.live_copies("m", include_self=False) == ["a"]
        parts.node.draining = True
        assert parts.view.live_copies("m") == ["a"]
        parts.cache.release(held)
    finally:
        await parts.close()


async def test_model_status_prefers_the_local_cache_and_collects_errors():
    parts = build("me", peers=("a",))
    try:
        assert parts.view.model_status("m").status is Status.NOT_FOUND
        put(parts.registry, _rec("m"))
        assert parts.view.model_status("m").status is Status.NOT_LOADED
        put(parts.registry, CopyRecord("m", "a", CopyState.FAILED, error="bad file"))
        status = parts.view.model_status("m")
        assert (status.status, status.errors) == (Status.LOADING_FAILED, ("bad file",))
        parts.cache.release(await parts.cache.acquire(_rec("m")))
        status = parts.view.model_status("m")
        assert status.status is Status.LOADED
        assert {(c.instance_id, c.state) for c in status.copies} == {
            ("a", Status.LOADING_FAILED), ("me", Status.LOADED)}
    finally:
        await parts.close()


def _promised(parts) -> dict[str, tuple[int, int]]:
    return {i.instance_id: (i.cpu.used_bytes, i.model_count)
            for i in parts.view.cluster_snapshot().instances}


async def test_cluster_snapshot_counts_a_promised_model_until_the_targets_record_does():
    parts = build("me", peers=("a",))
    try:
        put(parts.registry, _rec("cold"), InstanceRecord("a", "127.0.0.1:9", 1000, cache_seq=4))
        parts.view.pending.add("cold", "a", 300, until=float("inf"))
        assert _promised(parts) == {"me": (0, 0), "a": (300, 1)}
        put(parts.registry, CopyRecord("cold", "a", CopyState.LOADING, cache_seq=5))
        assert _promised(parts) == {"me": (0, 0), "a": (300, 1)}  # loading: not in its figures
        # Loaded, but the target's instance record was written before that load.
        put(parts.registry, CopyRecord("cold", "a", CopyState.LOADED, 300, cache_seq=6))
        assert _promised(parts) == {"me": (0, 0), "a": (300, 1)}
        put(parts.registry, InstanceRecord("a", "127.0.0.1:9", 1000, used_bytes=300,
                                           model_count=1, cache_seq=6))
        assert _promised(parts) == {"me": (0, 0), "a": (300, 1)}  # counted once, by the record
        assert parts.view.pending.get("cold") is None  # and the promise is settled
    finally:
        await parts.close()


async def test_a_promise_ends_with_a_failed_load_or_its_deadline():
    parts = build("me", peers=("a",))
    try:
        put(parts.registry, _rec("bad"), _rec("late"),
            InstanceRecord("a", "127.0.0.1:9", 1000, cache_seq=1))
        parts.view.pending.add("bad", "a", 300, until=float("inf"))
        parts.view.pending.add("late", "a", 50, until=time.monotonic() + 3600)
        assert _promised(parts)["a"] == (350, 2)
        put(parts.registry, CopyRecord("bad", "a", CopyState.FAILED, cache_seq=2))
        assert _promised(parts)["a"] == (50, 1)  # the record is older, but nothing was added
        assert parts.view.pending.get("bad") is None
        parts.view.pending.add("late", "a", 50, until=time.monotonic() - 1)
        assert _promised(parts)["a"] == (0, 0)
        assert parts.view.pending.get("late") is None
    finally:
        await parts.close()


async def test_records_from_instances_that_do_not_number_their_events_count_a_loaded_copy():
    """An instance of an older version writes no ``cache_seq``: a loaded copy record then
    counts as reflected, as it did before the numbering."""
    parts = build("me", peers=("a",))
    try:
        parts.view.pending.add("cold", "a", 300, until=float("inf"))
        put(parts.registry, _rec("cold"), CopyRecord("cold", "a", CopyState.LOADED, 300))
        assert _promised(parts)["a"] == (0, 0)
    finally:
        await parts.close()
