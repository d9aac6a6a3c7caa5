"""The ModelMesh baseline follows the rules of the Java implementation it cites."""

from __future__ import annotations

from placement import (
    AddCopy,
    ClusterSnapshot,
    CopySnapshot,
    CopyState,
    InstanceSnapshot,
    Memory,
    ModelMeshPolicy,
    ModelSnapshot,
    RemoveCopy,
)

MIB = 1 << 20
NOW = 37_800.0  # a multiple of both the janitor (360 s) and reaper (420 s) periods


def inst(
    iid: str,
    *,
    cap: int = 1000,
    used: int = 0,
    lru: float | None = None,
    count: int = 0,
    rpm: float = 0.0,
    loading: int = 0,
    slots: int = 2,
    labels: tuple[str, ...] = (),
    down: bool = False,
) -> InstanceSnapshot:
    return InstanceSnapshot(
        instance_id=iid,
        cpu=Memory(cap * MIB, used * MIB, 0, lru, lru),
        model_count=count,
        loading=loading,
        loading_slots=slots,
        request_rate=rpm / 60.0,
        labels=frozenset(labels),
        shutting_down=down,
    )


def model(mid: str = "m", size: int = 10, **kw) -> ModelSnapshot:
    kw.setdefault("last_used", NOW)
    return ModelSnapshot(mid, size * MIB, **kw)


def policy(**kw) -> ModelMeshPolicy:
    kw.setdefault("default_model_size_bytes", 10 * MIB)
    return ModelMeshPolicy(**kw)


def cluster(*instances: InstanceSnapshot, now: float = NOW) -> ClusterSnapshot:
    return ClusterSnapshot(instances, now)


def test_full_threshold_is_min_space_units():
    p = policy()
    # max(2 x 10 MiB, min(10 MiB x 2 loading threads, 1000 MiB / 20)) = 20 MiB
    assert p.full_below_bytes(inst("a")) == 20 * MIB
    assert p.full_below_bytes(inst("a", slots=8)) == 50 * MIB


def test_placement_order():
    p = policy()
    instances = [
        inst("leaving", down=True),
        inst("full-young", used=990, lru=NOW - 100, count=1),
        inst("full-old", used=990, lru=NOW - 5000, count=7),
        inst("many", used=100, count=9, lru=NOW - 10),
        inst("few-less-free", used=300, count=2, lru=NOW - 10),
        inst("few-more-free", used=200, count=2, lru=NOW - 10),
    ]
    ordered = sorted(instances, key=lambda i: p._order_key(i, model().device))
    assert [i.instance_id for i in ordered] == [
        "few-more-free",  # not full, fewest models, most free bytes
        "few-less-free",
        "many",
        "full-old",  # full ones: oldest LRU first
        "full-young",
        "leaving",  # shutting down: last
    ]


def test_loads_go_to_the_best_unless_others_are_close():
    p = policy()
    full = inst("full", used=990, lru=NOW - 5000, count=3)
    crowded = inst("crowded", used=100, count=20, lru=NOW - 10)  # > 1.25x the best's count
    roomy = inst("roomy", used=300, count=2, lru=NOW - 10)
    picks = {p.place(model(f"m{n}"), cluster(full, crowded, roomy)) for n in range(20)}
    assert picks == {"roomy"}
    close = inst("close", used=400, count=3, lru=NOW - 10)  # in the shortlist
    picks = {p.place(model(f"m{n}"), cluster(full, close, roomy)) for n in range(40)}
    assert picks == {"roomy", "close"}


def test_when_all_full_prefers_the_oldest_lru():
    p = policy(min_churn_age_s=0)
    young = inst("young", used=990, lru=NOW - 100, count=5)
    old = inst("old", used=995, lru=NOW - 20_000, count=9)
    assert p.place(model(), cluster(young, old)) == "old"


def test_shortlist_spreads_loads_over_near_equal_instances():
    p = policy(min_churn_age_s=0)
    instances = [inst(f"i{k}", used=995, lru=NOW - 600 - k, count=5) for k in range(6)]
    picks = {p.place(model(f"m{n}"), cluster(*instances)) for n in range(60)}
    assert len(picks) > 1  # random among the near-best, not always the single best


def test_busy_instances_are_dropped_from_the_shortlist():
    p = policy()
    calm = inst("calm", used=100, count=2, rpm=200)
    hot = inst("hot", used=100, count=2, rpm=5000)
    picks = {p.place(model(f"m{n}"), cluster(calm, hot)) for n in range(30)}
    assert picks == {"calm"}


def test_churn_guard_refuses_loads_on_young_full_instances():
    p = policy()  # 10 minute minimum churn age
    young = [inst(f"y{k}", used=995, lru=NOW - 60, count=5) for k in range(3)]
    assert p.place(model(), cluster(*young)) is None
    old = inst("old", used=995, lru=NOW - 700, count=5)
    assert p.place(model(), cluster(*young, old)) == "old"
    roomy = inst("roomy", used=10, lru=NOW - 1, count=1)
    assert p.place(model(), cluster(*young, roomy)) == "roomy"
    assert policy(min_churn_age_s=0).place(model(), cluster(*young)) is not None


def test_three_recent_load_failures_stop_loading():
    p = policy()
    c = cluster(*(inst(f"i{k}") for k in range(5)))
    assert p.place(model(failed_on=frozenset({"i0", "i1"})), c) not in {"i0", "i1", None}
    assert p.place(model(failed_on=frozenset({"i0", "i1", "i2"})), c) is None


def test_shutting_down_instances_only_as_last_resort():
    p = policy()
    assert p.place(model(), cluster(inst("leaving", down=True), inst("staying", used=500))) == (
        "staying"
    )
    assert p.place(model(), cluster(inst("leaving", down=True))) == "leaving"


def test_route_fewest_in_flight_then_least_recently_used():
    p = policy()
    c = cluster(inst("a"), inst("b"), inst("c"))
    copies = (
        CopySnapshot("a", in_flight=3, last_used=NOW - 1),
        CopySnapshot("b", in_flight=1, last_used=NOW - 1),
        CopySnapshot("c", in_flight=1, last_used=NOW - 50),
    )
    assert p.route(model(copies=copies), c) == "c"
    loading = (
        CopySnapshot("a", CopyState.LOADING, since=NOW - 2),
        CopySnapshot("b", CopyState.LOADING, since=NOW - 5),
    )
    assert p.route(model(copies=loading), c) == "b"


def one_copy(iid: str = "a", rate_rpm: float = 0.0, since: float = NOW - 10_000) -> tuple:
    return (CopySnapshot(iid, since=since, last_used=NOW - 1, request_rate=rate_rpm / 60),)


def test_second_copy_for_use_between_7_and_40_minutes_ago():
    p = policy()
    c = cluster(inst("a", used=400, count=4), inst("b", used=300, count=3))
    now = NOW + 15  # not a janitor or reaper tick

    def acts(earlier_ago: float, last_ago: float = 2.0):
        m = model(copies=one_copy(), last_used=now - last_ago, earlier_use=now - earlier_ago)
        return p.rebalance(ClusterSnapshot(c.instances, now), [m], now)

    (add,) = acts(600)
    assert isinstance(add, AddCopy) and add.instance_id == "b" and add.reason == "regular use"
    assert add.as_of == now - 10  # the time of the previous rate check
    assert acts(120) == []  # used again too soon: a burst, not regular use
    assert acts(3000) == []  # too long ago
    assert acts(600, last_ago=30) == []  # not used since the last check


def test_no_second_copy_in_a_full_cluster_with_a_young_cache():
    p = policy()
    now = NOW + 15
    c = ClusterSnapshot(
        (inst("a", used=995, lru=now - 100, count=9), inst("b", used=995, lru=now - 90)), now
    )
    m = model(copies=one_copy(), last_used=now - 2, earlier_use=now - 600)
    assert p.rebalance(c, [m], now) == []


def test_scale_up_by_request_rate_per_copy():
    p = policy()
    now = NOW + 15
    instances = tuple(inst(f"i{k}", used=100) for k in range(9))
    c = ClusterSnapshot(instances, now)
    hot = model(copies=one_copy("i0", rate_rpm=2500), last_used=now - 1)
    adds = p.rebalance(c, [hot], now)
    assert [type(a) for a in adds] == [AddCopy] and adds[0].reason == "request rate"
    hotter = model(copies=one_copy("i0", rate_rpm=8000), last_used=now - 1)
    # 8000 / 2000 = 4 copies, capped at a third of the 9 instances
    assert len(p.rebalance(c, [hotter], now)) == 3
    calm = model(copies=one_copy("i0", rate_rpm=1500), last_used=now - 1)
    assert p.rebalance(c, [calm], now) == []
    fresh = model(copies=one_copy("i0", rate_rpm=8000, since=now - 5), last_used=now - 1)
    assert p.rebalance(c, [fresh], now) == []  # a load just happened; wait for its effect


def test_janitor_scales_two_copies_down_only_in_a_nearly_full_cluster():
    p = policy()
    two = (
        CopySnapshot("a", since=NOW - 9000, last_used=NOW - 5000),
        CopySnapshot("b", since=NOW - 9000, last_used=NOW - 5000),
    )
    m = model(copies=two, last_used=NOW - 5000)
    full = cluster(
        inst("a", used=985, lru=NOW - 20_000, count=9),
        inst("b", used=990, lru=NOW - 20_000, count=1),
    )
    (rm,) = p.rebalance(full, [m], NOW)
    assert isinstance(rm, RemoveCopy)
    # the copy on the less desirable instance goes: equal LRU, "a" holds more models
    assert rm.instance_id == "a"
    roomy = cluster(inst("a", used=500, lru=NOW - 20_000), inst("b", used=500, lru=NOW - 20_000))
    assert p.rebalance(roomy, [m], NOW) == []
    recent = model(
        copies=(
            CopySnapshot("a", since=NOW - 9000, last_used=NOW - 10),
            CopySnapshot("b", since=NOW - 9000, last_used=NOW - 10),
        ),
        last_used=NOW - 10,
    )
    assert p.rebalance(full, [recent], NOW) == []
    # not at a janitor tick: nothing
    assert p.rebalance(ClusterSnapshot(full.instances, NOW + 15), [m], NOW + 15) == []


def test_reaper_loads_recently_used_models_into_free_space():
    p = policy()
    c = cluster(inst("a", used=100, count=2, lru=NOW - 50), inst("b", used=200, count=3))
    cold = model("cold", last_used=NOW - 30)
    never = ModelSnapshot("never", 10 * MIB)
    actions = p.rebalance(c, [cold, never], NOW)
    assert [(type(a), a.model_id) for a in actions] == [(AddCopy, "cold")]
    assert actions[0].as_of == NOW - 30  # the copy keeps the model's own recency
