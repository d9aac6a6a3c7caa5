"""Properties every placement policy keeps, for all inputs (hypothesis).

- no instance is over capacity after a decision (place + evict, rebalance + evict);
- a model in use is never evicted;
- placement respects label constraints, exclusions and failure records;
- decisions are deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from placement import (
    POLICIES,
    AddCopy,
    CachedModel,
    ClusterSnapshot,
    CopySnapshot,
    CopyState,
    Device,
    InstanceCache,
    InstanceSnapshot,
    ModelSnapshot,
    Policy,
    RemoveCopy,
    eligible_instances,
    get_policy,
)

MIB = 1 << 20
LABELS = ["gpu", "ssd", "zone-a"]
NAMES = sorted(POLICIES)

# Per test, not a global profile: other test modules keep their own settings.
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class World:
    """A cluster snapshot with the per-instance caches it summarises."""

    cluster: ClusterSnapshot
    caches: dict[str, InstanceCache]
    model: ModelSnapshot
    exclude: frozenset[str]


@st.composite
def caches(draw: st.DrawFn, iid: str, now: float) -> InstanceCache:
    capacity = draw(st.integers(50, 400)) * MIB
    entries = []
    used = 0
    for n in range(draw(st.integers(0, 8))):
        size = draw(st.integers(1, 120)) * MIB
        if used + size > capacity:
            break
        used += size
        entries.append(
            CachedModel(
                model_id=f"{iid}-c{n}",
                size_bytes=size,
                priority=draw(st.floats(0, 1000, allow_nan=False)),
                last_used=draw(st.floats(now - 3000, now, allow_nan=False)),
                in_use=draw(st.booleans()),
            )
        )
    return InstanceCache(iid, capacity, tuple(entries))


@st.composite
def worlds(draw: st.DrawFn) -> World:
    now = draw(st.floats(1000, 100_000, allow_nan=False))
    n = draw(st.integers(1, 6))
    ids = [f"i{k}" for k in range(n)]
    cache_map = {iid: draw(caches(iid, now)) for iid in ids}
    instances = []
    for iid in ids:
        c = cache_map[iid]
        slots = draw(st.integers(1, 4))
        instances.append(
            InstanceSnapshot(
                instance_id=iid,
                cpu=c.memory(),
                model_count=len(c.entries),
                loading=draw(st.integers(0, slots + 1)),
                loading_slots=slots,
                in_flight=draw(st.integers(0, 20)),
                concurrency=draw(st.integers(1, 8)),
                request_rate=draw(st.floats(0, 100, allow_nan=False)),
                labels=frozenset(draw(st.lists(st.sampled_from(LABELS), unique=True))),
                shutting_down=draw(st.booleans()),
            )
        )
    cluster = ClusterSnapshot(tuple(instances), now)
    holders = draw(st.lists(st.sampled_from(ids), unique=True, max_size=n))
    copies = tuple(
        CopySnapshot(
            instance_id=iid,
            state=draw(st.sampled_from([CopyState.LOADED, CopyState.LOADING])),
            since=now - draw(st.floats(0, 5000, allow_nan=False)),
            last_used=now - draw(st.floats(0, 5000, allow_nan=False)),
            in_flight=draw(st.integers(0, 10)),
            request_rate=draw(st.floats(0, 100, allow_nan=False)),
        )
        for iid in holders
    )
    last = now - draw(st.floats(0, 3000, allow_nan=False))
    model = ModelSnapshot(
        model_id="target",
        size_bytes=draw(st.integers(1, 300)) * MIB,
        copies=copies,
        last_used=last,
        earlier_use=last - draw(st.floats(0, 3000, allow_nan=False)),
        request_rate=draw(st.floats(0, 50, allow_nan=False)),
        failed_on=frozenset(draw(st.lists(st.sampled_from(ids), unique=True, max_size=2))),
        required_labels=frozenset(draw(st.lists(st.sampled_from(LABELS), unique=True, max_size=2))),
        load_seconds=draw(st.floats(0.01, 5, allow_nan=False)),
        service_seconds=draw(st.floats(0.001, 0.5, allow_nan=False)),
    )
    exclude = frozenset(draw(st.lists(st.sampled_from(ids), unique=True, max_size=2)))
    return World(cluster, cache_map, model, exclude)


def _assert_fits(policy: Policy, cache: InstanceCache, size: int, below: float | None = None):
    victims = policy.evict(cache, size, below=below)
    if victims is None:
        return None
    by_id = {e.model_id: e for e in cache.entries}
    freed = sum(by_id[v].size_bytes for v in victims)
    assert cache.used_bytes - freed + size <= cache.capacity_bytes
    assert not any(by_id[v].in_use for v in victims)
    return victims


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(world=worlds())
def test_place_then_evict_never_overfills_and_respects_constraints(name: str, world: World):
    policy = get_policy(name, seed=3)
    model = world.model
    target = policy.place(model, world.cluster, world.exclude)
    if target is None:
        if name != "modelmesh":  # modelmesh may also refuse through its churn guard
            assert eligible_instances(model, world.cluster, world.exclude) == []
        return
    inst = world.cluster.instance(target)
    assert inst is not None
    assert target not in world.exclude
    assert target not in model.failed_on
    assert target not in model.holders
    assert model.required_labels <= inst.labels
    victims = _assert_fits(policy, world.caches[target], model.size_bytes)
    assert victims is not None, "placed where the model cannot fit"


@PROPERTY
@given(world=worlds(), need=st.integers(0, 500))
def test_evict_never_takes_models_in_use_and_takes_lowest_first(world: World, need: int):
    policy = get_policy("lru")
    for cache in world.caches.values():
        victims = _assert_fits(policy, cache, need * MIB)
        evictable = [e for e in cache.entries if not e.in_use]
        if victims is None:
            pinned = sum(e.size_bytes for e in cache.entries if e.in_use)
            assert need * MIB > cache.capacity_bytes - pinned
            continue
        order = sorted(evictable, key=lambda e: (e.priority, e.model_id))
        assert victims == [e.model_id for e in order[: len(victims)]]
        if victims:  # minimal: one fewer victim would not have been enough
            by_id = {e.model_id: e for e in cache.entries}
            freed = sum(by_id[v].size_bytes for v in victims[:-1])
            assert cache.free_bytes + freed < need * MIB


@PROPERTY
@given(world=worlds(), need=st.integers(1, 300), below=st.floats(0, 1000, allow_nan=False))
def test_evict_below_only_takes_lower_priorities(world: World, need: int, below: float):
    policy = get_policy("gdsf")
    for cache in world.caches.values():
        victims = _assert_fits(policy, cache, need * MIB, below)
        if victims:
            by_id = {e.model_id: e for e in cache.entries}
            assert all(by_id[v].priority < below for v in victims)


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(world=worlds())
def test_decisions_are_deterministic_for_a_seed(name: str, world: World):
    a, b = get_policy(name, seed=11), get_policy(name, seed=11)
    assert a.place(world.model, world.cluster, world.exclude) == b.place(
        world.model, world.cluster, world.exclude
    )
    assert a.route(world.model, world.cluster) == b.route(world.model, world.cluster)
    now = world.cluster.now
    assert a.rebalance(world.cluster, [world.model], now) == b.rebalance(
        world.cluster, [world.model], now
    )


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(world=worlds())
def test_route_picks_a_copy_on_a_present_instance(name: str, world: World):
    policy = get_policy(name)
    target = policy.route(world.model, world.cluster)
    present = {
        c.instance_id: inst
        for c in world.model.copies
        if (inst := world.cluster.instance(c.instance_id)) is not None
    }
    # ModelMesh forwards to any registered copy; the others skip instances shutting down.
    usable = {iid for iid, inst in present.items() if name == "modelmesh" or not inst.shutting_down}
    if target is None:
        assert not usable
    else:
        assert target in usable
        loaded = {c.instance_id for c in world.model.copies if c.state is CopyState.LOADED}
        if loaded & usable:
            assert target in loaded  # never wait for a load when a loaded copy is there


@pytest.mark.parametrize("name", ["modelmesh", "density"])
@PROPERTY
@given(world=worlds(), when=st.sampled_from([0.0, 5.0]))
def test_rebalance_actions_are_safe(name: str, world: World, when: float):
    policy = get_policy(name, seed=5)
    # Line the call up with the janitor and reaper periods half of the time.
    now = 25200.0 + when
    cluster = ClusterSnapshot(world.cluster.instances, now)
    model = world.model
    unloaded = ModelSnapshot("cold", 10 * MIB, last_used=now - 60, request_rate=0.5)
    actions = policy.rebalance(cluster, [model, unloaded], now)
    planned: dict[str, int] = {}
    for action in actions:
        if isinstance(action, AddCopy):
            m = model if action.model_id == model.model_id else unloaded
            inst = cluster.instance(action.instance_id)
            assert inst is not None
            assert action.instance_id not in m.holders
            assert m.required_labels <= inst.labels
            assert inst.memory(Device.CPU).can_fit(m.size_bytes)
            victims = _assert_fits(policy, world.caches.get(action.instance_id), m.size_bytes)
            del victims  # may be None: the caller then drops the add (fallthrough)
            planned[action.instance_id] = planned.get(action.instance_id, 0) + 1
        else:
            assert isinstance(action, RemoveCopy)
            loaded = [c.instance_id for c in model.copies if c.state is CopyState.LOADED]
            assert action.instance_id in loaded
            assert len(loaded) >= 2
