"""The router's decisions with real parts: a ModelCache, the in-memory mirror, placement.

Peers have instance records but no server (closed ports): forwarding to one
fails as it does to a dead instance. See tests/support/parts.py.
"""

from __future__ import annotations

import pytest

from modelmesh.errors import Rejected
from modelmesh.headers import INFER, CallInfo
from modelmesh.registry.records import CopyRecord, CopyState, ModelRecord
from tests.support.mirror import put
from tests.support.parts import build


def _rec(model_id: str) -> ModelRecord:
    return ModelRecord(model_id, "identity", f"{model_id}.json")


def _answer(record: ModelRecord):
    async def local(rec: ModelRecord) -> bytes:
        assert rec == record
        return b"served here"
    return local


async def test_a_model_loaded_here_is_served_here_and_counted_in_flight():
    parts = build("me", peers=("a",))
    try:
        rec = _rec("m")
        put(parts.registry, rec, CopyRecord("m", "a", CopyState.LOADED))
        parts.cache.release(await parts.cache.acquire(rec))
        seen = []

        async def local(r: ModelRecord) -> bytes:
            seen.append(parts.node.in_flight["me"])
            return b"ok"

        assert await parts.router.invoke(INFER, b"", "m", CallInfo(), local) == b"ok"
        assert seen == [1] and parts.node.in_flight["me"] == 0
    finally:
        await parts.close()


async def test_a_cold_model_goes_where_placement_put_the_first_request():
    parts = build("me", peers=("a", "b"))
    try:
        rec = _rec("cold")
        put(parts.registry, rec)
        target, load = parts.router.choose(rec, frozenset({"me"}))
        assert load and target in ("a", "b")
        # until its copy record appears, every request for it goes to the same target
        for _ in range(5):
            assert parts.router.choose(rec, frozenset({"me"})) == (target, True)
        parts.router.suspect(target)  # an unreachable target is forgotten at once
        other, load = parts.router.choose(rec, frozenset({"me"}))
        assert load and other not in (target, None)
    finally:
        await parts.close()


async def test_the_single_copy_elsewhere_is_chosen_without_loading():
    parts = build("me", peers=("a",))
    try:
        rec = _rec("m")
        put(parts.registry, rec, CopyRecord("m", "a", CopyState.LOADED))
        assert parts.router.choose(rec) == ("a", False)
    finally:
        await parts.close()


async def test_an_unreachable_copy_is_left_out_and_the_model_loads_here():
    parts = build("me", peers=("a",))
    try:
        rec = _rec("m")
        put(parts.registry, rec, CopyRecord("m", "a", CopyState.LOADED))
        answer = await parts.router.invoke(INFER, b"", "m", CallInfo(timeout=5), _answer(rec))
        assert answer == b"served here"
        assert "a" in parts.router._excluded()
    finally:
        await parts.close()


async def test_a_draining_instance_loads_nothing_new():
    parts = build("me")
    try:
        put(parts.registry, _rec("m"))
        parts.node.draining = True
        with pytest.raises(Rejected, match="shutting down"):
            await parts.router.invoke(INFER, b"", "m", CallInfo(load_here=True),
                                      _answer(_rec("m")))
    finally:
        await parts.close()


async def test_a_saturated_copy_hands_requests_to_another_loaded_copy():
    parts = build("me", peers=("a",))
    try:
        rec = _rec("hot")
        put(parts.registry, rec, CopyRecord("hot", "a", CopyState.LOADED))
        held = [await parts.cache.acquire(rec) for _ in range(parts.node.concurrency)]
        entry = parts.cache.get("hot")
        assert entry is not None
        assert parts.router._shed_target(rec, entry) == "a"
        parts.cache.release(held.pop())
        assert parts.router._shed_target(rec, entry) is None  # a thread is free again
        for h in held:
            parts.cache.release(h)
    finally:
        await parts.close()
