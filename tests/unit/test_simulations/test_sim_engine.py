"""The discrete-event simulator: accounting, invariants, and fidelity to placement."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from placement import Device, get_policy
from simulations.config import PolicySpec
from simulations.engine import COLD, FAILED, HIT, Simulator
from simulations.runner import make_policy, run_config
from simulations.traces import Trace, load_workload
from simulations.workload import ModelTable

MIB = 1 << 20
POLICIES = ["modelmesh", "lru", "gdsf", "density"]


def hand_workload(sizes_mib: list[int], requests: list[tuple[float, int]]):
    n = len(sizes_mib)
    sizes = np.array(sizes_mib, dtype=np.int64) * MIB
    models = ModelTable(
        ids=[f"m{i}" for i in range(n)],
        sizes=sizes,
        gpu=np.zeros(n, dtype=bool),
        load_seconds=np.full(n, 0.2),
        service_seconds=np.full(n, 0.01),
        registered_at=np.zeros(n),
    )
    times = np.array([t for t, _ in requests])
    which = np.array([m for _, m in requests], dtype=np.int32)
    return models, Trace(times, which, "hand-made")


def run_one(cfg, models, trace, name, **kw):
    policy = make_policy(PolicySpec(name, name, kw), cfg, models)
    sim = Simulator(cfg, models, trace, policy)
    return sim, sim.run()


@pytest.fixture
def one_instance(tiny_cfg):
    cfg = tiny_cfg(cluster={"instances": 1, "capacity_bytes": "100MiB"})
    # no load jitter, no inference spread: exact arithmetic
    return dataclasses.replace(
        cfg,
        models=dataclasses.replace(cfg.models, load_jitter=0.0, inference_sigma=0.0),
    )


def test_hits_misses_loads_and_evictions_are_counted(one_instance):
    # two 60 MiB models on a 100 MiB instance: they take turns
    models, trace = hand_workload([60, 60], [(0, 0), (10, 0), (20, 1), (30, 0), (40, 0)])
    sim, r = run_one(one_instance, models, trace, "lru")
    assert r.outcome.tolist() == [COLD, HIT, COLD, COLD, HIT]
    m = r.metrics
    assert (m["loads"], m["evictions"], m["hits"], m["cold_starts"]) == (3, 2, 2, 3)
    assert r.latency_s[1] == pytest.approx(0.01)  # a hit: inference only
    assert r.latency_s[0] == pytest.approx(0.21)  # a miss: load, then inference
    sim.check_invariants()


def test_requests_during_a_load_wait_for_it(one_instance):
    models, trace = hand_workload([10], [(0, 0), (0.05, 0), (0.1, 0), (5, 0)])
    _, r = run_one(one_instance, models, trace, "density")
    assert r.outcome.tolist() == [COLD, COLD, COLD, HIT]
    assert r.metrics["loads"] == 1
    # all three waited for the same load, then queued for the request slots
    assert r.latency_s[1] == pytest.approx(0.21 - 0.05)


def test_request_slots_queue_first_come_first_served(one_instance):
    one_slot = dataclasses.replace(
        one_instance, cluster=dataclasses.replace(one_instance.cluster, concurrency=1)
    )
    models, trace = hand_workload([10], [(0, 0), (1, 0), (1, 0), (1, 0)])
    _, r = run_one(one_slot, models, trace, "lru")
    assert r.latency_s[1:].tolist() == pytest.approx([0.01, 0.02, 0.03])


@pytest.mark.parametrize("name", POLICIES)
def test_books_balance_after_every_request(tiny_cfg, name):
    cfg = tiny_cfg(
        cluster={"failures": {"mtbf_s": 20, "restart_s": 5}, "gpu_capacity_bytes": "128MiB"},
        models={"load_failure_rate": 0.05, "gpu_fraction": 0.2},
        trace={
            "zipf": {"requests": 2000, "rate_per_s": 40},
            "bursts": {"mean_on_s": 3, "mean_off_s": 10},
        },
    )
    models, trace = load_workload(cfg)
    policy = make_policy(PolicySpec(name, name, {}), cfg, models)
    sim = Simulator(cfg, models, trace, policy, progress_every=1)
    sim.progress = lambda _n: sim.check_invariants()
    r = sim.run()
    sim.check_invariants()
    m = r.metrics
    assert m["instance_failures"] > 0 and m["load_failures"] > 0
    served = r.outcome != FAILED
    assert np.isfinite(r.latency_s[served]).all()  # every served request has a latency
    assert m["hits"] + m["cold_starts"] + m["failed"] == m["requests"] == len(trace)


@pytest.mark.parametrize("name", POLICIES)
def test_fast_eviction_path_matches_policy_evict(tiny_cfg, name):
    cfg = tiny_cfg(trace={"zipf": {"requests": 1500}})
    models, trace = load_workload(cfg)
    policy = make_policy(PolicySpec(name, name, {}), cfg, models)
    sim = Simulator(cfg, models, trace, policy, progress_every=1)
    rng = random.Random(1)
    compared = []
    times = trace.times.tolist()

    def compare(_n: int) -> None:
        k = len(compared)
        compared.append(None)
        if k % 25:
            return
        now = times[k]
        for inst in sim.instances:
            need = rng.randint(1, 256) * MIB
            snapshot = sim.instance_cache(inst.iid, Device.CPU, now)
            assert sim.victims(inst.iid, Device.CPU, need, now) == policy.evict(snapshot, need)

    sim.progress = compare
    sim.run()
    assert len(compared) == len(trace)


def test_runs_are_deterministic_for_a_seed(tiny_cfg):
    cfg = tiny_cfg(
        cluster={"failures": {"mtbf_s": 30, "restart_s": 5}},
        models={"load_failure_rate": 0.02},
        policies=["modelmesh", "density"],
    )
    _, _, first = run_config(cfg, progress=False)
    _, _, second = run_config(cfg, progress=False)
    for a, b in zip(first, second, strict=True):
        ma = {k: v for k, v in a.metrics.items() if k != "wall_s"}
        mb = {k: v for k, v in b.metrics.items() if k != "wall_s"}
        assert ma == mb
        assert np.array_equal(a.outcome, b.outcome)


def test_modelmesh_churn_guard_fails_requests_when_the_cache_thrashes(tiny_cfg):
    cfg = tiny_cfg(
        models={"count": 400},
        trace={"zipf": {"alpha": 0.6, "requests": 3000}},
        policies=[
            "modelmesh",
            {"policy": "modelmesh", "label": "no-guard", "params": {"min_churn_age_s": 0}},
        ],
    )
    _, _, (guarded, unguarded) = run_config(cfg, progress=False)
    assert guarded.metrics["failed"] > 0
    assert unguarded.metrics["failed"] == 0
    assert unguarded.metrics["loads"] > guarded.metrics["loads"]


def test_density_adds_copies_for_a_model_that_one_copy_cannot_serve(tiny_cfg):
    cfg = tiny_cfg(
        cluster={"instances": 4, "concurrency": 2},
        models={"count": 20, "inference": {"mean_ms": 40}},
        trace={"zipf": {"alpha": 1.6, "requests": 6000, "rate_per_s": 80}},
        policies=["lru", {"policy": "density", "params": {"settle_s": 10}}],
    )
    _, _, (lru, density) = run_config(cfg, progress=False)
    assert density.metrics["copies_added"] > 0
    assert density.metrics["max_copies_per_model"] >= 2
    assert density.metrics["p99_ms"] < lru.metrics["p99_ms"]


def test_warmup_excludes_early_requests(tiny_cfg):
    cfg = tiny_cfg(policies=["lru"])
    _, trace, (full,) = run_config(cfg, progress=False)
    warm = dataclasses.replace(cfg, warmup_s=20.0)
    _, _, (late,) = run_config(warm, progress=False)
    assert late.metrics["requests"] == int(np.count_nonzero(trace.times >= 20.0))
    assert late.metrics["loads"] < full.metrics["loads"]


def test_policy_objects_are_not_changed_by_a_run(tiny_cfg):
    cfg = tiny_cfg(policies=["density"])
    models, trace = load_workload(cfg)
    policy = get_policy("density", seed=cfg.seed)
    before = dataclasses.asdict(policy)
    Simulator(cfg, models, trace, policy).run()
    assert dataclasses.asdict(policy) == before
