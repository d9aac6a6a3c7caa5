"""``modelmesh``: a faithful baseline of KServe ModelMesh's placement and scaling.

Each rule below cites where ModelMesh defines it. "ModelMesh.java" is
``src/main/java/com/ibm/watson/modelmesh/ModelMesh.java`` in
github.com/kserve/modelmesh; "the scaling docs" is the "Model Auto-Scaling"
section of ``docs/configuration/README.md`` in the same repository.

Cache (per instance)
    A size-weighted LRU: capacity and entries are weighed in bytes (8 KiB units
    in Java) and entries leave in last-used order (``runtimeCache``, a
    ``ConcurrentLinkedHashMap`` with a weigher). The retention priority is
    therefore the last-used time. A copy added by scaling or proactive loading
    carries an older last-used time and is dropped if it would be the oldest
    entry ("cache fallthrough" in ``loadLocal``); callers get that with
    ``evict(..., below=priority)``.

Cache-miss placement (``PLACEMENT_ORDER`` and ``CacheMissForwardingLB``)
    Instances are ordered: not shutting down first; not full before full; among
    full ones the oldest LRU time first; then fewest models; then most free
    bytes; among non-full ones then the oldest LRU time; then idle loading
    threads, fewer loads in progress, larger capacity, lower request rate, id.
    "Full" means free space below ``minSpaceUnits`` = max(2 x default model
    size, min(default model size x loading threads, capacity / 20)).
    A shortlist is taken from the best instance onward: when the best is full,
    those whose LRU time is within 45 s (or a tenth of the best's LRU age) of
    it; otherwise those that are not full, have at least a quarter of the best's
    free space and not many more models. Instances much busier than the least
    busy one are dropped (how much busier depends on how recently the model was
    used), and one is drawn at random from the rest.

Churn guard (``minChurnAgeMs``, cache-miss loop of ``invokeModel``)
    An instance that is full and whose least recently used model was used less
    than ``min_churn_age_s`` ago (default 10 minutes) refuses the load; the
    request tries the next instance, at most 8 times in all (``MAX_ITERATIONS``).
    If every candidate refuses, the request fails. A model with 3 recent load
    failures is not loaded again until they expire (``MAX_LOAD_FAILURES``).

Cache-hit routing (``ForwardingLB``)
    Among loaded copies, the one with the fewest requests in use, ties to the
    one used least recently; if none has finished loading, the oldest load.

Scale-up (``rateTrackingTask``, every 10 s)
    For a model used since the last run: with one copy, a second copy is
    loaded when the model was also used between 7 and 40 minutes ago
    (``SECOND_COPY_MIN_AGE_SECS``/``MAX_AGE_SECS``, the "regular usage"
    heuristic), unless the cluster is more than 90% full and its global LRU is
    younger than max(3 x 10 x 40 minutes, 6 hours). With any number of copies,
    a copy serving at least 2000 requests per minute (the scaling docs;
    ``DEFAULT_SCALEUP_RPM``) triggers rpm / 2000 more copies, capped at the
    free candidates and, above 2, at a third of the instances; not while a copy
    loaded within the last two intervals plus two load times.

Scale-down (``janitorTask`` and ``removeModelCopies``, every 6 minutes)
    Only when the cluster is at least 95% full. A model with 2 copies loses the
    copy on the less desirable instance (by the placement order) once that copy
    has not been used for a tenth of the cluster's LRU age (at most 10 hours,
    ``SECOND_COPY_REMOVE_MAX_AGE_MS``). A model with 3 or more copies loses one
    when no copy was loaded in the last 30 minutes, none was removed in the last
    8 rate-check intervals, and the copy serves at most 2/3 of the scale-up rate.
    Each instance removes at most 5% of its capacity per run. (Java also keeps
    a "last heavy use" timer per copy; this baseline uses the current rate.)

Proactive loading (the leader's reaper task, every 7 minutes)
    Unloaded models (fewer than 2 failures) used more recently than the
    cluster's global LRU, or any when there is free space, are loaded, most
    recently used first: enough to fill half of the free space above 12.5% of
    each instance, and at least 5% of the cluster's capacity per run, the
    latter only for models used after the global LRU time plus max(a third of
    its age, 20 minutes) (``triggerProactiveLoadsForInstanceSubset``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from placement.model import (
    Action,
    AddCopy,
    ClusterSnapshot,
    CopyState,
    Device,
    InstanceSnapshot,
    ModelSnapshot,
    RemoveCopy,
)
from placement.policy import Policy, eligible_instances

_MAX_ITERATIONS = 8  # ModelMesh.java MAX_ITERATIONS
_MAX_LOAD_FAILURES = 3  # ModelMesh.java MAX_LOAD_FAILURES
_MINUTE = 60.0
_HOUR = 3600.0
_DAY = 86400.0


@dataclass(frozen=True)
class ModelMeshPolicy(Policy):
    #: Per-copy request rate that triggers scale-up, requests per minute.
    scale_up_rpm: float = 2000.0
    #: A prior use this long ago (range) triggers a second copy.
    second_copy_min_age_s: float = 420.0
    second_copy_max_age_s: float = 2400.0
    #: Refuse a load on a full instance whose LRU model is younger than this; 0 disables.
    min_churn_age_s: float = 600.0
    #: The runtime's default model size, used for the "full" threshold and estimates.
    default_model_size_bytes: int = 128 << 20
    #: Period of the janitor (scale-down) and of the reaper (proactive loads).
    janitor_interval_s: float = 360.0
    reaper_interval_s: float = 420.0
    #: Upper bound of the 2->1 scale-down age.
    second_copy_remove_max_age_s: float = 36000.0

    name: ClassVar[str] = "modelmesh"
    summary: ClassVar[str] = "KServe ModelMesh baseline: size-weighted LRU, ModelMesh placement"
    rebalance_interval_s: ClassVar[float | None] = 10.0  # RATE_CHECK_INTERVAL_MS

    def __post_init__(self) -> None:
        if self.scale_up_rpm <= 0:
            raise ValueError("modelmesh scale_up_rpm must be greater than 0")
        if self.janitor_interval_s <= 0 or self.reaper_interval_s <= 0:
            raise ValueError("modelmesh janitor_interval_s and reaper_interval_s must be > 0")
        if self.second_copy_min_age_s > self.second_copy_max_age_s:
            raise ValueError(
                "modelmesh second_copy_min_age_s must not exceed second_copy_max_age_s"
            )

    # -- cache ------------------------------------------------------------------------------

    def priority(
        self,
        *,
        now: float,
        size_bytes: int,
        request_rate: float,
        hits_here: int,
        load_seconds: float,
        clock: float,
    ) -> float:
        return now

    # -- placement --------------------------------------------------------------------------

    def full_below_bytes(self, inst: InstanceSnapshot, device: Device = Device.CPU) -> int:
        """Free bytes below which an instance counts as full (``minSpaceUnits``)."""
        default = self.default_model_size_bytes
        low = default * (2 if inst.loading_slots > 1 else 1)
        target = min(default * inst.loading_slots, inst.memory(device).capacity_bytes // 20)
        return max(low, target)

    def _rank(self, inst: InstanceSnapshot, device: Device) -> _Ranked:
        """An instance with its ``PLACEMENT_ORDER`` key and the facts the LB looks at."""
        mem = inst.gpu if device is Device.GPU else inst.cpu
        free = mem.capacity_bytes - mem.used_bytes
        free = free if free > 0 else 0
        full = free < self.full_below_bytes(inst, device)
        lru = math.inf if mem.lru_time is None else mem.lru_time
        key = (
            inst.shutting_down,
            full,
            lru if full else 0.0,
            inst.model_count,
            -free,
            0.0 if full else lru,
            inst.loading - inst.loading_slots,
            inst.loading,
            -mem.capacity_bytes,
            inst.request_rate,
            inst.instance_id,
        )
        return _Ranked(key, inst, free, full, mem.lru_time)

    def _order_key(self, inst: InstanceSnapshot, device: Device) -> tuple:
        return self._rank(inst, device).key

    def _churn_guarded(self, r: _Ranked, now: float) -> bool:
        if self.min_churn_age_s <= 0 or not r.full:
            return False
        return r.lru is not None and now - r.lru < self.min_churn_age_s

    def place(
        self,
        model: ModelSnapshot,
        cluster: ClusterSnapshot,
        exclude: frozenset[str] = frozenset(),
    ) -> str | None:
        if len(model.failed_on) >= _MAX_LOAD_FAILURES:
            return None
        device = model.device
        now = cluster.now
        cands = eligible_instances(model, cluster, exclude, allow_shutting_down=True)
        ranked = [self._rank(i, device) for i in cands]
        guarded = {r.inst.instance_id for r in ranked if self._churn_guarded(r, now)}
        if len(guarded) == len(ranked):
            return None  # every candidate would refuse the load
        ranked.sort(key=_key)
        tried: set[str] = set()
        for attempt in range(_MAX_ITERATIONS):
            remaining = [r for r in ranked if r.inst.instance_id not in tried]
            if not remaining:
                return None
            chosen = self._choose(model, remaining, now, attempt)
            if chosen.instance_id not in guarded:
                return chosen.instance_id
            tried.add(chosen.instance_id)  # the instance refused; the request tries again
        return None

    def _choose(
        self,
        model: ModelSnapshot,
        ordered: list[_Ranked],
        now: float,
        attempt: int,
    ) -> InstanceSnapshot:
        """``CacheMissForwardingLB``: a random pick among the near-best of ``ordered``."""
        best = ordered[0]
        shortlist = [best.inst]
        oldest = best.lru if best.lru is not None else now
        for cur in ordered[1:]:
            if cur.inst.shutting_down and not best.inst.shutting_down:
                break  # those are last in the order and no longer take new models
            if best.full:
                cur_lru = cur.lru if cur.lru is not None else now
                diff = cur_lru - oldest
                if diff > 45.0 and diff > (now - oldest) / 10.0:
                    break
            else:
                if cur.full or cur.free < best.free // 4:
                    break
                count, first = cur.inst.model_count, best.inst.model_count
                if count >= 10 and count > first + first // 4:
                    break
            shortlist.append(cur.inst)
        if len(shortlist) > 1:
            shortlist = self._drop_busy(shortlist, model, now)
        return self._pick(shortlist, model.model_id, now, attempt)

    @staticmethod
    def _drop_busy(
        shortlist: list[InstanceSnapshot], model: ModelSnapshot, now: float
    ) -> list[InstanceSnapshot]:
        # Exclude busy instances, more strictly the more recently the model was used.
        ago = math.inf if model.last_used is None else now - model.last_used
        if ago >= 5 * _DAY:
            return shortlist
        rpms = [int(i.request_rate * 60.0) for i in shortlist]
        min_load = max(100, min(rpms))
        kept: list[InstanceSnapshot] = []
        remaining = len(shortlist)
        for inst, rpm in zip(shortlist, rpms, strict=True):
            busy = rpm >= 100 and (
                (ago < -1.0 and rpm > int(1.1 * min_load))
                or (ago < 5.0 and rpm > int(1.5 * min_load))
                or (ago < 12 * _MINUTE and rpm > min_load * 3)
                or (ago < _DAY and rpm > min_load * 4)
            )
            if busy and remaining > 1:
                remaining -= 1
                continue
            kept.append(inst)
        return kept

    def route(self, model: ModelSnapshot, cluster: ClusterSnapshot) -> str | None:
        live = []
        for c in model.copies:
            inst = cluster.instance(c.instance_id)
            if inst is not None and c.state is not CopyState.FAILED:
                live.append(c)
        loaded = [c for c in live if c.state is CopyState.LOADED]
        if loaded:
            best = min(
                loaded,
                key=lambda c: (
                    c.in_flight,
                    -math.inf if c.last_used is None else c.last_used,
                    c.instance_id,
                ),
            )
            return best.instance_id
        loading = [c for c in live if c.state is CopyState.LOADING]
        if loading:
            return min(loading, key=lambda c: (c.since, c.instance_id)).instance_id
        return None

    # -- periodic scaling -------------------------------------------------------------------

    def rebalance(
        self, cluster: ClusterSnapshot, models: Sequence[ModelSnapshot], now: float
    ) -> list[Action]:
        interval = self.rebalance_interval_s or 10.0
        actions: list[Action] = []
        actions += self._rate_tracking(cluster, models, now, interval)
        if _crossed(now, interval, self.janitor_interval_s):
            actions += self._janitor(cluster, models, now)
        if _crossed(now, interval, self.reaper_interval_s):
            actions += self._reaper(cluster, models, now)
        return actions

    def _rate_tracking(
        self,
        cluster: ClusterSnapshot,
        models: Sequence[ModelSnapshot],
        now: float,
        interval: float,
    ) -> list[Action]:
        if len(cluster.instances) < 2:
            return []
        window_start = now - interval
        capacity = cluster.capacity_bytes()
        free = cluster.free_bytes()
        global_lru = cluster.global_lru_time()
        cache_age = math.inf if global_lru is None else now - global_lru
        # Keeps the scale-down cutoff (a tenth of the LRU age) at least 3x the
        # second-copy window, with a floor of 6 hours.
        second_copy_lru_threshold = max(self.second_copy_max_age_s * 30.0, 6 * _HOUR)
        threshold_rps = self.scale_up_rpm / 60.0
        busy_rps = max(4 * threshold_rps, 0.0)
        actions: list[Action] = []
        for model in models:
            if model.last_used is None or model.last_used < window_start:
                continue  # not used since the last run
            holders = model.holders
            if not holders:
                continue
            suitable = eligible_instances(model, cluster, frozenset(), allow_shutting_down=True)
            candidates = [i for i in suitable if i.instance_id not in holders]
            if not candidates:
                continue
            if len(holders) == 1 and model.earlier_use is not None:
                age = now - model.earlier_use
                if self.second_copy_min_age_s <= age <= self.second_copy_max_age_s:
                    roomy = capacity > 0 and free * 10 >= capacity
                    if roomy or cache_age > second_copy_lru_threshold:
                        target = self.place(model, cluster, frozenset(holders))
                        if target is not None:
                            actions.append(
                                AddCopy(model.model_id, target, "regular use", window_start)
                            )
                        continue
            rates = [c.request_rate for c in model.copies if c.state is CopyState.LOADED]
            rate = max(rates, default=0.0)
            if rate < threshold_rps:
                continue
            recent = now - (2 * interval + 2 * model.load_seconds)
            if any(c.since > recent for c in model.copies):
                continue  # a recent load has not shown its effect on the rate yet
            busy = frozenset(i.instance_id for i in cluster.instances if i.request_rate > busy_rps)
            candidates = [i for i in candidates if i.instance_id not in busy]
            n = min(int(rate / threshold_rps), len(candidates))
            if n > 2:
                n = min(n, len(cluster.instances) // 3)
            taken = set(holders) | busy
            for _ in range(n):
                target = self.place(model, cluster, frozenset(taken))
                if target is None:
                    break
                taken.add(target)
                actions.append(AddCopy(model.model_id, target, "request rate", now + 20.0))
        return actions

    def _janitor(
        self, cluster: ClusterSnapshot, models: Sequence[ModelSnapshot], now: float
    ) -> list[Action]:
        capacity = cluster.capacity_bytes()
        if capacity == 0 or cluster.free_bytes() * 100 > capacity * 5:
            return []  # scale down only when the cluster is nearly full
        global_lru = cluster.global_lru_time()
        cache_age = 0.0 if global_lru is None else now - global_lru
        two_copy_age = min(self.second_copy_remove_max_age_s, cache_age / 10.0)
        min_rate = self.scale_up_rpm * 2 / 3 / 60.0
        by_id = {i.instance_id: i for i in cluster.instances}
        budget = {i.instance_id: i.cpu.capacity_bytes // 20 for i in cluster.instances}
        removed_any: set[str] = set()
        candidates = []
        for model in models:
            loaded = [
                c
                for c in model.copies
                if c.state is CopyState.LOADED
                and c.instance_id in by_id
                and not by_id[c.instance_id].shutting_down
            ]
            if len(loaded) >= 2:
                oldest = min(c.last_used or 0.0 for c in loaded)
                candidates.append((oldest, model.model_id, model, loaded))
        actions: list[Action] = []
        for _, _, model, loaded in sorted(candidates, key=lambda t: (t[0], t[1])):
            # The copy that goes is the one on the least desirable instance.
            worst = max(loaded, key=lambda c: self._order_key(by_id[c.instance_id], model.device))
            if len(loaded) == 2:
                last = worst.last_used if worst.last_used is not None else 0.0
                if now - last <= two_copy_age:
                    continue
            else:
                if model.last_removed is not None and now - model.last_removed < 80.0:
                    continue
                if any(c.since > now - 1800.0 for c in model.copies):
                    continue
                if worst.request_rate > min_rate:
                    continue
            iid = worst.instance_id
            if iid in removed_any and model.size_bytes > budget[iid]:
                continue
            removed_any.add(iid)
            budget[iid] -= model.size_bytes
            actions.append(RemoveCopy(model.model_id, iid, "janitor scale-down"))
        return actions

    def _reaper(
        self, cluster: ClusterSnapshot, models: Sequence[ModelSnapshot], now: float
    ) -> list[Action]:
        capacity = cluster.capacity_bytes()
        if capacity == 0:
            return []
        free = cluster.free_bytes()
        global_lru = cluster.global_lru_time()
        lru_floor = 0.0 if free > 0 or global_lru is None else global_lru
        candidates = [
            m
            for m in models
            if not m.holders
            and len(m.failed_on) < 2
            and m.last_used is not None
            and (lru_floor == 0.0 or m.last_used > lru_floor)
        ]
        if not candidates:
            return []
        copies = sum(i.model_count for i in cluster.instances)
        used = capacity - free
        if copies < 3:
            size_estimate = self.default_model_size_bytes
        elif copies > 10:
            size_estimate = used // copies
        else:
            size_estimate = (used // copies + self.default_model_size_bytes) // 2
        size_estimate = max(1, size_estimate)
        space_to_fill = 0
        for inst in cluster.instances:
            max_loads = inst.loading_slots * 50 - inst.loading
            if max_loads <= 0:
                continue
            avail = inst.cpu.free_bytes - inst.cpu.capacity_bytes // 8
            if avail > 0:
                space_to_fill += min(avail, max_loads * size_estimate)
        free_count = space_to_fill // 2 // size_estimate
        total_count = max(free_count, capacity // (20 * size_estimate)) if free > 0 else 0
        if total_count <= 0:
            return []
        cutoff = (
            0.0 if global_lru is None else global_lru + max((now - global_lru) / 3.0, 20 * _MINUTE)
        )
        chosen = sorted(candidates, key=lambda m: (-(m.last_used or 0.0), m.model_id))
        actions: list[Action] = []
        for model in chosen[:total_count]:
            last = model.last_used or 0.0
            if free_count > 0:
                free_count -= 1
            elif last < cutoff:
                break
            target = self.place(model, cluster)
            if target is not None:
                actions.append(AddCopy(model.model_id, target, "proactive load", last))
        return actions


@dataclass(frozen=True, slots=True)
class _Ranked:
    key: tuple
    inst: InstanceSnapshot
    free: int
    full: bool
    lru: float | None


def _key(r: _Ranked) -> tuple:
    return r.key


def _crossed(now: float, step: float, period: float) -> bool:
    """Whether a periodic task of ``period`` is due in the step ``(now - step, now]``."""
    return math.floor(now / period) != math.floor((now - step) / period)
