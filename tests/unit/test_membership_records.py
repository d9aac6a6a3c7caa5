"""What the instance's copy and instance records say of its cache events.

A real ``ModelCache`` (with the stand-in loader) feeds ``Membership``; nothing is
written to etcd here: the records are read as they would be written.
"""

from __future__ import annotations

from modelmesh.cache.local import ModelCache
from modelmesh.membership import Membership
from modelmesh.metrics import Metrics
from modelmesh.node import Node
from modelmesh.registry.records import CopyState, ModelRecord
from tests.support.mirror import in_memory_registry
from tests.support.parts import StandInLoader


async def test_an_instance_record_counts_exactly_the_copies_numbered_up_to_its_seq() -> None:
    """Placement elsewhere trusts an instance record's figures for a copy once the
    record's ``cache_seq`` has reached the copy record's: check that promise holds."""
    holder: list[Membership] = []
    cache = ModelCache(10_000, StandInLoader(default=100),
                       on_event=lambda ev: holder[0].on_cache_event(ev))
    registry = in_memory_registry()
    membership = Membership(Node(instance_id="me"), registry, registry.client, cache, Metrics(),
                            lambda coro, name="": None, lease_ttl=10, loading_slots=1,
                            labels={}, request_rate=lambda: 0.0)
    holder.append(membership)
    try:
        before = membership.instance_record()
        assert (before.cache_seq, before.model_count) == (0, 0)
        cache.release(await cache.acquire(ModelRecord("a", "identity", "a.json")))
        copy = membership._copies["a"]
        assert copy is not None and copy.state is CopyState.LOADED and copy.cache_seq > 0
        after = membership.instance_record()
        assert after.cache_seq >= copy.cache_seq
        assert (after.model_count, after.used_bytes) == (1, 100)

        cache.release(await cache.acquire(ModelRecord("b", "identity", "b.json")))
        second = membership._copies["b"]
        assert second is not None and second.cache_seq > copy.cache_seq
        assert after.cache_seq < second.cache_seq  # the older record does not count "b"
        assert membership.instance_record().model_count == 2
    finally:
        await cache.close()
