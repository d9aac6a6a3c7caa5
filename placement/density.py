"""``density``: our default policy. Keep the models worth the most per byte.

The idea
    Memory is the scarce resource and requests are what it buys, so a model
    copy is worth its request rate per byte of memory it occupies, optionally
    times what a miss on it costs (its load time). ModelMesh and LRU rank
    models by recency alone: one request to a rarely used 2 GiB model evicts
    dozens of small models that are each used every minute. GDSF ranks by
    frequency per byte but forgets a model's frequency when it is evicted, so a
    hot model that was pushed out once starts again from the bottom.

    This policy ranks by a *decayed request rate per byte* that belongs to the
    model, not to the copy, so it survives evictions. The rate is an
    exponentially decayed count (``placement.usage``, half-life 15 minutes),
    which gives recency and frequency in one number: a burst fades, a steady
    model keeps its value, a drifting popularity is followed within a few
    half-lives.

    The retention priority of a copy used at time t is

        log(rate(t)) - log(size) + w * log(load_seconds) + t * ln 2 / half_life

    The last term is forward decay: every rate decays by the same factor per
    second, so comparing rates at different times is the same as comparing
    these values, and a copy's priority stays valid until its next use. That is
    what lets eviction keep one heap per instance instead of rescoring all
    models on every miss. ``w`` (``cost_weight``, default 0) trades hit ratio
    (w = 0) for fewer seconds spent waiting on loads (w = 1).

Placement
    A miss goes where the model fits in free memory (most free first), else to
    the instance whose lowest-priority evictable model is the cheapest, so the
    cluster evicts in one global value order. Instances whose request slots or
    loading slots are all busy are avoided while others can take the load,
    because a queued load or request adds directly to the latency.

Copies
    Copies follow measured demand instead of usage patterns: a model needs
    ceil(rate x service time / (target utilisation x concurrency)) copies,
    so a copy is added when the existing ones would be more than
    ``target_utilization`` busy, and removed (one at a time, after the last
    change has settled) when the rest could carry the load at half that and
    their instances would stay below the target. Several warm models sharing
    an instance can swamp it although none needs a copy on its own, so an
    instance busier than the target gets a copy of its busiest model on a
    quiet instance; routing then splits the traffic. In a full cluster an extra
    copy of a lukewarm model costs far more hits than it saves in queueing, so
    there is no "second copy for regular use" rule.

Proactive loading
    When an instance has free memory (after a restart, after scale-out), the
    most valuable unloaded models that fit are loaded into it ahead of demand,
    without evicting anything and only on idle loading slots, so a speculative
    load never delays one that a request is waiting for.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from placement.model import (
    Action,
    AddCopy,
    ClusterSnapshot,
    CopySnapshot,
    CopyState,
    Device,
    InstanceSnapshot,
    ModelSnapshot,
    RemoveCopy,
)
from placement.policy import Policy, eligible_instances
from placement.usage import RATE_HALF_LIFE_S, decayed_rate

_LN2 = math.log(2.0)
_DECAY_PER_S = _LN2 / RATE_HALF_LIFE_S
_MIB = float(1 << 20)
_TINY_RATE = 1e-12


def value_density(
    rate: float, size_bytes: int, load_seconds: float, as_of: float, cost_weight: float
) -> float:
    """Log of (decayed rate per MiB x load cost^w), forward-decayed to a common epoch."""
    return (
        math.log(max(rate, _TINY_RATE))
        - math.log(max(size_bytes / _MIB, 1e-6))
        + cost_weight * math.log(max(load_seconds, 1e-6))
        + as_of * _DECAY_PER_S
    )


@dataclass(frozen=True)
class DensityPolicy(Policy):
    #: Weight of the load time in a model's value (0: hit ratio only).
    cost_weight: float = 0.0
    #: A copy should be at most this busy (fraction of its instance's concurrency).
    target_utilization: float = 0.6
    #: No copy changes for a model within this many seconds of its last copy change.
    settle_s: float = 120.0
    #: Fill an instance ahead of demand when this fraction of it is free.
    fill_free_fraction: float = 0.05
    #: At most this many proactive loads per rebalance.
    max_fill_loads: int = 16

    name: ClassVar[str] = "density"
    summary: ClassVar[str] = "ours: decayed request rate per byte, demand-sized copies"
    rebalance_interval_s: ClassVar[float | None] = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.target_utilization <= 1:
            raise ValueError("density target_utilization must be in (0, 1]")
        if self.max_fill_loads < 0 or self.settle_s < 0 or not 0 <= self.fill_free_fraction <= 1:
            raise ValueError(
                "density settle_s, max_fill_loads must be >= 0, fill_free_fraction in [0, 1]"
            )

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
        return value_density(request_rate, size_bytes, load_seconds, now, self.cost_weight)

    def model_value(self, model: ModelSnapshot) -> float:
        """The priority a copy of ``model`` would have, from its last use."""
        as_of = model.last_used if model.last_used is not None else 0.0
        return value_density(
            model.request_rate, model.size_bytes, model.load_seconds, as_of, self.cost_weight
        )

    # -- placement --------------------------------------------------------------------------

    def place(
        self,
        model: ModelSnapshot,
        cluster: ClusterSnapshot,
        exclude: frozenset[str] = frozenset(),
    ) -> str | None:
        cands = eligible_instances(model, cluster, exclude)
        if not cands:
            return None
        size = model.size_bytes
        gpu = model.device is Device.GPU
        # Avoid instances whose request slots or loading slots are all taken.
        pool = [i for i in cands if i.in_flight < i.concurrency] or cands
        pool = [i for i in pool if i.loading < i.loading_slots] or pool
        roomy: list[tuple[tuple[float, float], InstanceSnapshot]] = []
        full: list[tuple[tuple[float, float], InstanceSnapshot]] = []
        for inst in pool:
            mem = inst.gpu if gpu else inst.cpu
            free = mem.capacity_bytes - mem.used_bytes
            if free >= size:
                roomy.append(((-free, inst.request_rate), inst))
            elif not roomy:
                # The victim is the cheapest model there (None: nothing evictable).
                p = mem.min_priority
                full.append(((math.inf if p is None else p, inst.request_rate), inst))
        keyed = roomy or full
        best = min(k for k, _ in keyed)
        chosen = [i for k, i in keyed if k == best]
        return self._pick(chosen, model.model_id, cluster.now).instance_id

    # -- periodic scaling -------------------------------------------------------------------

    def copies_needed(self, model: ModelSnapshot, concurrency: int, utilization: float) -> int:
        """Copies that keep each one at most ``utilization`` busy at the current rate."""
        rate = sum(c.request_rate for c in model.copies if c.state is CopyState.LOADED)
        per_copy = utilization * max(1, concurrency) / max(model.service_seconds, 1e-6)
        return max(1, math.ceil(rate / per_copy - 1e-9))

    def rebalance(
        self, cluster: ClusterSnapshot, models: Sequence[ModelSnapshot], now: float
    ) -> list[Action]:
        by_id = {i.instance_id: i for i in cluster.instances}
        # Busy request slots per instance, and the model that keeps each busiest.
        load = dict.fromkeys(by_id, 0.0)
        hottest: dict[str, tuple[float, ModelSnapshot]] = {}
        live: list[tuple[ModelSnapshot, list[CopySnapshot]]] = []
        unloaded: list[ModelSnapshot] = []
        for model in models:
            copies = [
                c
                for c in model.copies
                if c.state is not CopyState.FAILED and c.instance_id in by_id
            ]
            if not copies:
                if model.last_used is not None and model.request_rate > 0.0:
                    unloaded.append(model)
                continue
            live.append((model, copies))
            for c in copies:
                busy = c.request_rate * model.service_seconds
                load[c.instance_id] += busy
                if busy > hottest.get(c.instance_id, (0.0, model))[0]:
                    hottest[c.instance_id] = (busy, model)

        def utilization(iid: str) -> float:
            return load[iid] / max(1, by_id[iid].concurrency)

        target_u = self.target_utilization
        actions: list[Action] = []
        unsettled: set[str] = set()  # models not to touch again this round
        loading = {
            model.model_id
            for model, copies in live
            if any(c.state is CopyState.LOADING for c in copies)
        }
        for model, copies in live:
            if any(c.since > now - self.settle_s for c in copies) or (
                model.last_removed is not None and now - model.last_removed < self.settle_s
            ):
                unsettled.add(model.model_id)
                continue
            loaded = [c for c in copies if c.state is CopyState.LOADED]
            if not loaded:
                continue
            concurrency = min(by_id[c.instance_id].concurrency for c in loaded)
            need = self.copies_needed(model, concurrency, target_u)
            if need > len(loaded):
                taken = set(model.holders)
                for _ in range(min(need - len(loaded), 2)):
                    target = self.place(model, cluster, frozenset(taken))
                    if target is None:
                        break
                    taken.add(target)
                    actions.append(AddCopy(model.model_id, target, "demand", now))
                unsettled.add(model.model_id)
            elif len(loaded) > 1:
                keep = self.copies_needed(model, concurrency, target_u / 2)
                quiet = min(loaded, key=lambda c: (c.request_rate, c.instance_id))
                moved = quiet.request_rate * model.service_seconds / (len(loaded) - 1)
                others_ok = all(
                    (load[c.instance_id] + moved) / max(1, by_id[c.instance_id].concurrency)
                    <= target_u
                    for c in loaded
                    if c is not quiet
                )
                if keep < len(loaded) and others_ok:
                    actions.append(RemoveCopy(model.model_id, quiet.instance_id, "surplus"))
                    unsettled.add(model.model_id)

        # Several warm models on one instance can swamp it although none needs a
        # second copy on its own: give the busiest of them a copy on a quiet instance.
        for iid in sorted(by_id, key=utilization, reverse=True):
            if utilization(iid) <= target_u or iid not in hottest:
                break
            busy, model = hottest[iid]
            if model.model_id in unsettled or model.model_id in loading:
                continue
            if busy < 0.1 * by_id[iid].concurrency:
                continue
            calm = [
                i
                for i in eligible_instances(model, cluster, frozenset(model.holders))
                if (load[i.instance_id] + busy / 2) / max(1, i.concurrency) <= target_u
            ]
            if not calm:
                continue
            dest = min(calm, key=lambda i: (utilization(i.instance_id), i.instance_id))
            actions.append(AddCopy(model.model_id, dest.instance_id, "relieve busy instance", now))
            unsettled.add(model.model_id)
            load[dest.instance_id] += busy / 2
            load[iid] -= busy / 2
        actions += self._fill(cluster, unloaded, now)
        return actions

    def _fill(
        self, cluster: ClusterSnapshot, unloaded: list[ModelSnapshot], now: float
    ) -> list[Action]:
        fillable = [
            i
            for i in cluster.instances
            if not i.shutting_down
            and i.cpu.capacity_bytes > 0
            and i.cpu.free_bytes >= i.cpu.capacity_bytes * self.fill_free_fraction
        ]
        if not fillable or not unloaded:
            return []
        free = {(i.instance_id, d): i.memory(d).free_bytes for i in fillable for d in Device}
        # Only idle loading slots: a speculative load must never delay one a request waits for.
        slots = {i.instance_id: i.loading_slots - i.loading for i in fillable}

        def worth(m: ModelSnapshot) -> tuple[float, str]:
            rate = decayed_rate(m.request_rate, m.last_used, now)
            size_mib = max(m.size_bytes / _MIB, 1e-6)
            return (-math.log(max(rate, _TINY_RATE)) + math.log(size_mib), m.model_id)

        actions: list[Action] = []
        for model in heapq.nsmallest(4 * self.max_fill_loads, unloaded, key=worth):
            if len(actions) >= self.max_fill_loads:
                break
            fits = [
                i
                for i in fillable
                if slots[i.instance_id] > 0
                and free[(i.instance_id, model.device)] >= model.size_bytes
                and i.instance_id not in model.failed_on
                and model.required_labels <= i.labels
            ]
            if not fits:
                continue
            target = max(fits, key=lambda i: (free[(i.instance_id, model.device)], i.instance_id))
            free[(target.instance_id, model.device)] -= model.size_bytes
            slots[target.instance_id] -= 1
            actions.append(AddCopy(model.model_id, target.instance_id, "fill free memory"))
        return actions
