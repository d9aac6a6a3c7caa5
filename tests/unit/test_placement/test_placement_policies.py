"""The policy registry, the usage helpers and the rules of lru, gdsf and density."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from placement import (
    DEFAULT_POLICY,
    RATE_HALF_LIFE_S,
    REUSE_GAP_S,
    AddCopy,
    CachedModel,
    ClusterSnapshot,
    CopySnapshot,
    DensityPolicy,
    GDSFPolicy,
    InstanceCache,
    InstanceSnapshot,
    Memory,
    ModelSnapshot,
    RemoveCopy,
    decayed_rate,
    earlier_use_after_request,
    get_policy,
    rate_after_request,
)
from placement.density import value_density

MIB = 1 << 20
NOW = 10_000.0


def inst(iid: str, *, cap: int = 1000, used: int = 0, minp: float | None = None, **kw):
    lru = kw.pop("lru", None)
    return InstanceSnapshot(iid, Memory(cap * MIB, used * MIB, 0, lru, minp), **kw)


# -- registry -------------------------------------------------------------------------------


def test_get_policy_names_params_and_errors():
    assert get_policy().name == DEFAULT_POLICY == "density"
    assert get_policy("gdsf", cost="load_time", seed=4) == GDSFPolicy(seed=4, cost="load_time")
    with pytest.raises(ValueError, match="unknown placement policy 'fifo'.*known: density"):
        get_policy("fifo")
    with pytest.raises(ValueError, match="no parameter 'speed'"):
        get_policy("lru", speed=2)
    with pytest.raises(ValueError, match="must be a number"):
        get_policy("modelmesh", scale_up_rpm="fast")
    with pytest.raises(ValueError, match="must not be negative"):
        get_policy("modelmesh", min_churn_age_s=-1)
    with pytest.raises(ValueError, match="cost must be"):
        get_policy("gdsf", cost="bytes")


# -- usage ----------------------------------------------------------------------------------


def test_decayed_rate_converges_to_the_request_rate_and_halves_when_idle():
    rate, last = 0.0, None
    for k in range(20_000):  # 2 requests per second for about 2.8 hours
        t = k * 0.5
        rate = rate_after_request(rate, last, t)
        last = t
    assert rate == pytest.approx(2.0, rel=0.01)
    assert decayed_rate(rate, last, last + RATE_HALF_LIFE_S) == pytest.approx(rate / 2)
    assert decayed_rate(rate, None, 5.0) == 0.0


def test_earlier_use_is_the_use_before_the_last_pause():
    assert earlier_use_after_request(None, None, 100.0) is None
    assert earlier_use_after_request(100.0, None, 100.0 + REUSE_GAP_S / 2) is None
    assert earlier_use_after_request(100.0, 50.0, 100.0 + REUSE_GAP_S) == 100.0


# -- eviction bookkeeping -------------------------------------------------------------------


def test_evict_edge_cases_and_gdsf_clock():
    p = get_policy("gdsf")
    cache = InstanceCache(
        "i",
        100 * MIB,
        (
            CachedModel("a", 40 * MIB, priority=3.0),
            CachedModel("b", 30 * MIB, priority=1.0),
            CachedModel("c", 20 * MIB, priority=2.0, in_use=True),
        ),
        clock=0.5,
    )
    assert p.evict(cache, 10 * MIB) == []  # already free
    assert p.evict(cache, 40 * MIB) == ["b"]
    assert p.evict(cache, 70 * MIB) == ["b", "a"]
    assert p.evict(cache, 90 * MIB) is None  # "c" is in use
    assert p.evict(cache, 101 * MIB) is None  # bigger than the pool
    assert p.evict(cache, 70 * MIB, below=2.5) is None  # would take "a" (priority 3)
    assert p.clock_after_evict(cache, ["b", "a"]) == 3.0
    assert p.clock_after_evict(cache, []) == 0.5


# -- lru and gdsf ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lru", "gdsf"])
def test_single_copy_policies_use_free_space_then_the_cheapest_victim(name: str):
    p = get_policy(name)
    m = ModelSnapshot("m", 50 * MIB)
    roomy = ClusterSnapshot((inst("a", used=900, minp=1.0), inst("b", used=100, minp=9.0)))
    assert p.place(m, roomy) == "b"
    full = ClusterSnapshot((inst("a", used=990, minp=5.0), inst("b", used=990, minp=2.0)))
    assert p.place(m, full) == "b"
    # an instance whose loading slots are all busy is avoided while another can load
    busy = ClusterSnapshot(
        (
            inst("a", used=990, minp=5.0),
            inst("b", used=990, minp=2.0, loading=2, loading_slots=2),
        )
    )
    assert p.place(m, busy) == "a"
    assert p.rebalance(full, [m], NOW) == []


def test_gdsf_priority_is_clock_plus_frequency_per_size():
    p = GDSFPolicy()
    common = dict(now=0.0, request_rate=1.0, load_seconds=2.0)
    small = p.priority(size_bytes=10 * MIB, hits_here=3, clock=5.0, **common)
    big = p.priority(size_bytes=100 * MIB, hits_here=3, clock=5.0, **common)
    assert small == pytest.approx(5.0 + 3 / 10)
    assert big == pytest.approx(5.0 + 3 / 100)
    cost = GDSFPolicy(cost="load_time").priority(
        size_bytes=10 * MIB, hits_here=3, clock=5.0, **common
    )
    assert cost == pytest.approx(5.0 + 3 * 2.0 / 10)


# -- density --------------------------------------------------------------------------------


@given(
    r1=st.floats(1e-4, 100),
    r2=st.floats(1e-4, 100),
    t1=st.floats(0, 5000),
    t2=st.floats(0, 5000),
    s1=st.integers(1, 4000),
    s2=st.integers(1, 4000),
)
def test_density_priorities_compare_like_rates_per_byte_at_any_common_time(r1, r2, t1, t2, s1, s2):
    # Forward decay: comparing priorities assigned at different times is the same as
    # comparing the two decayed rates per byte at a common later time.
    p1 = value_density(r1, s1 * MIB, 1.0, t1, 0.0)
    p2 = value_density(r2, s2 * MIB, 1.0, t2, 0.0)
    later = 6000.0
    v1 = decayed_rate(r1, t1, later) / s1
    v2 = decayed_rate(r2, t2, later) / s2
    if abs(math.log(v1) - math.log(v2)) > 1e-9:
        assert (p1 < p2) == (v1 < v2)


def test_density_keeps_small_busy_models_over_big_idle_ones():
    p = DensityPolicy()
    base = dict(now=NOW, hits_here=1, load_seconds=1.0, clock=0.0)
    small_busy = p.priority(size_bytes=20 * MIB, request_rate=0.5, **base)
    big_idle = p.priority(size_bytes=2000 * MIB, request_rate=0.05, **base)
    assert small_busy > big_idle
    # ... and a model that stopped being used loses out to one in use now
    stale = p.priority(size_bytes=20 * MIB, request_rate=0.5, **{**base, "now": NOW - 7200})
    assert stale < p.priority(size_bytes=20 * MIB, request_rate=0.1, **base)


def test_density_places_in_free_space_then_on_the_cheapest_victim():
    p = DensityPolicy()
    m = ModelSnapshot("m", 50 * MIB)
    assert p.place(m, ClusterSnapshot((inst("a", used=800), inst("b", used=100)))) == "b"
    full = ClusterSnapshot((inst("a", used=990, minp=-3.0), inst("b", used=990, minp=-1.0)))
    assert p.place(m, full) == "a"


def test_density_sizes_copies_from_rate_and_service_time():
    p = DensityPolicy(target_utilization=0.5, settle_s=60)
    instances = tuple(inst(f"i{k}", used=100, concurrency=4) for k in range(4))
    cluster = ClusterSnapshot(instances, NOW)
    # 100 req/s x 20 ms = 2 busy slots; a copy should carry 0.5 x 4 = 2 -> 1 copy
    ok = ModelSnapshot(
        "ok",
        10 * MIB,
        copies=(CopySnapshot("i0", since=0, request_rate=100),),
        service_seconds=0.02,
        last_used=NOW,
    )
    assert p.rebalance(cluster, [ok], NOW) == []
    # 300 req/s -> 3 copies needed: add 2
    hot = ModelSnapshot(
        "hot",
        10 * MIB,
        copies=(CopySnapshot("i0", since=0, request_rate=300),),
        service_seconds=0.02,
        last_used=NOW,
    )
    adds = p.rebalance(cluster, [hot], NOW)
    assert [type(a) for a in adds] == [AddCopy, AddCopy]
    assert len({a.instance_id for a in adds} | {"i0"}) == 3
    # not while a copy is still settling
    settling = ModelSnapshot(
        "hot",
        10 * MIB,
        copies=(CopySnapshot("i0", since=NOW - 10, request_rate=300),),
        service_seconds=0.02,
        last_used=NOW,
    )
    assert p.rebalance(cluster, [settling], NOW) == []
    # 3 copies carrying 30 req/s in all: one goes, the quietest
    cool = ModelSnapshot(
        "cool",
        10 * MIB,
        copies=(
            CopySnapshot("i0", since=0, request_rate=20),
            CopySnapshot("i1", since=0, request_rate=4),
            CopySnapshot("i2", since=0, request_rate=6),
        ),
        service_seconds=0.02,
        last_used=NOW,
    )
    assert p.rebalance(cluster, [cool], NOW) == [RemoveCopy("cool", "i1", "surplus")]


def test_density_fills_free_memory_with_the_most_valuable_unloaded_models():
    p = DensityPolicy(max_fill_loads=2)
    cluster = ClusterSnapshot(
        (inst("a", used=100, loading_slots=4), inst("b", used=995, loading_slots=4)), NOW
    )
    models = [
        ModelSnapshot("hot", 10 * MIB, last_used=NOW - 5, request_rate=1.0),
        ModelSnapshot("warm", 10 * MIB, last_used=NOW - 5, request_rate=0.1),
        ModelSnapshot("lukewarm", 10 * MIB, last_used=NOW - 5, request_rate=0.01),
        ModelSnapshot("never", 10 * MIB),
    ]
    actions = p.rebalance(cluster, models, NOW)
    assert actions == [
        AddCopy("hot", "a", "fill free memory"),
        AddCopy("warm", "a", "fill free memory"),
    ]
    full = ClusterSnapshot((inst("a", used=990), inst("b", used=995)), NOW)
    assert p.rebalance(full, models, NOW) == []
    # speculative loads only take idle loading slots
    one_slot = ClusterSnapshot((inst("a", used=100, loading=1, loading_slots=2),), NOW)
    assert p.rebalance(one_slot, models, NOW) == [AddCopy("hot", "a", "fill free memory")]


def test_density_relieves_an_instance_swamped_by_several_warm_models():
    p = DensityPolicy(target_utilization=0.6)
    instances = tuple(inst(f"i{k}", used=100, concurrency=2) for k in range(3))
    cluster = ClusterSnapshot(instances, NOW)

    def warm(mid: str, where: str, rate: float) -> ModelSnapshot:
        copy = CopySnapshot(where, since=0, request_rate=rate)
        return ModelSnapshot(mid, 10 * MIB, copies=(copy,), service_seconds=0.02, last_used=NOW)

    # each model alone fits one copy (a: 30 req/s x 20 ms = 0.6 busy slots, a copy may
    # carry 0.6 x 2), but together they keep i0's two slots 65% busy
    models = [warm("a", "i0", 30), warm("b", "i0", 25), warm("c", "i0", 10), warm("d", "i1", 5)]
    actions = p.rebalance(cluster, models, NOW)
    assert actions == [AddCopy("a", "i2", "relieve busy instance", NOW)]
    calm = [warm("a", "i0", 10), warm("b", "i1", 10)]
    assert p.rebalance(cluster, calm, NOW) == []


def test_placement_imports_nothing_that_does_io_or_reads_the_clock():
    import ast
    from pathlib import Path

    import placement

    allowed = {
        "__future__",
        "abc",
        "collections",
        "collections.abc",
        "dataclasses",
        "enum",
        "heapq",
        "math",
        "typing",
        "zlib",
    }
    root = Path(placement.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name in allowed or name.startswith("placement"), (path.name, name)
