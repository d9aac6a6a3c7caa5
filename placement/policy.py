"""The interface every placement policy implements, and the parts they share.

A policy answers four questions, each a pure function of snapshots:

- ``route(model, cluster)``: a request for a model that has copies; which copy
  serves it (cache hit).
- ``place(model, cluster, exclude)``: a request for a model with no usable copy;
  which instance loads it (cache miss).
- ``evict(cache, bytes_needed)``: which models leave an instance's memory pool
  so that ``bytes_needed`` bytes are free.
- ``rebalance(cluster, models, now)``: periodic copy scaling; returns
  ``AddCopy`` / ``RemoveCopy`` actions.

Eviction is the same for every policy: models leave in increasing order of the
*retention priority* the policy gave them at their last use
(``Policy.priority``), models in use never leave. Keeping eviction generic is
what lets a cache maintain a heap of priorities instead of re-sorting its
models on every load, and lets the simulator prove that its fast path makes
exactly the decisions ``evict`` describes.

Random choices are derived from a stable hash of the seed and the decision's
inputs, so a policy with a given seed makes the same decision for the same
snapshots every time, in every process.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from placement.model import (
    Action,
    ClusterSnapshot,
    CopySnapshot,
    CopyState,
    Device,
    InstanceCache,
    InstanceSnapshot,
    ModelSnapshot,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Policy(ABC):
    """Base of all placement policies. Subclasses are frozen dataclasses of their parameters."""

    seed: int = 0

    #: Registry name (``placement.get_policy(name)``).
    name: ClassVar[str] = ""
    #: One line for listings and reports.
    summary: ClassVar[str] = ""
    #: How often the caller should call ``rebalance``, in seconds; None: never.
    rebalance_interval_s: ClassVar[float | None] = None

    # -- eviction ---------------------------------------------------------------------------

    @abstractmethod
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
        """Retention priority of a model copy just used (or loaded) at ``now``.

        ``request_rate`` is the model's decayed rate including this use,
        ``hits_here`` the uses of this copy since it was loaded (including this
        one) and ``clock`` the pool's ``InstanceCache.clock``. The caller stores
        the value with the copy until its next use; ``evict`` removes the lowest
        first. The value must not depend on anything else, so that it stays
        valid between uses.
        """

    def evict(
        self, cache: InstanceCache, bytes_needed: int, *, below: float | None = None
    ) -> list[str] | None:
        """Models to unload from ``cache`` so that ``bytes_needed`` bytes are free.

        Returns the model ids in eviction order (an empty list when the bytes are
        already free), or None when it cannot be done: the bytes exceed what
        evicting every model not in use would free, or (with ``below``) it would
        take a model whose priority is not below ``below``. Models in use are
        never chosen.
        """
        free = cache.capacity_bytes - cache.used_bytes
        if bytes_needed <= free:
            return []
        if bytes_needed > cache.capacity_bytes:
            return None
        victims: list[str] = []
        for entry in sorted(
            (e for e in cache.entries if not e.in_use), key=lambda e: (e.priority, e.model_id)
        ):
            if below is not None and entry.priority >= below:
                return None
            victims.append(entry.model_id)
            free += entry.size_bytes
            if free >= bytes_needed:
                return victims
        return None

    def clock_after_evict(self, cache: InstanceCache, evicted: Iterable[str]) -> float:
        """The pool's clock once ``evicted`` have left: the highest priority that left."""
        gone = set(evicted)
        return max([cache.clock, *(e.priority for e in cache.entries if e.model_id in gone)])

    # -- routing and placement --------------------------------------------------------------

    def route(self, model: ModelSnapshot, cluster: ClusterSnapshot) -> str | None:
        """The instance whose copy serves a request; None when the model has no usable copy.

        Default: the loaded copy with the fewest requests in flight per unit of
        its instance's concurrency; if none is loaded yet, the copy whose load
        started first (the request waits for it).
        """
        live = _live_copies(model, cluster)
        loaded = [(c, i) for c, i in live if c.state is CopyState.LOADED]
        if loaded:
            best = min(
                loaded,
                key=lambda ci: (
                    ci[0].in_flight / max(1, ci[1].concurrency),
                    ci[0].request_rate,
                    ci[0].instance_id,
                ),
            )
            return best[0].instance_id
        loading = [c for c, _ in live if c.state is CopyState.LOADING]
        if loading:
            return min(loading, key=lambda c: (c.since, c.instance_id)).instance_id
        return None

    @abstractmethod
    def place(
        self,
        model: ModelSnapshot,
        cluster: ClusterSnapshot,
        exclude: frozenset[str] = frozenset(),
    ) -> str | None:
        """The instance that should load ``model``; None when no instance may.

        The chosen instance never already holds the model, is not in ``exclude``
        or ``model.failed_on``, carries every label in ``model.required_labels``
        and can fit the model once its evictable models have left.
        """

    # -- periodic scaling -------------------------------------------------------------------

    def rebalance(
        self, cluster: ClusterSnapshot, models: Sequence[ModelSnapshot], now: float
    ) -> list[Action]:
        """Copies to add and remove. Default: none (one copy per model)."""
        return []

    # -- helpers for subclasses -------------------------------------------------------------

    def _pick(self, items: Sequence[T], *salt: object) -> T:
        """A deterministic pseudo-random choice among ``items`` for this seed and salt."""
        if len(items) == 1:
            return items[0]
        key = "|".join([str(self.seed), *(repr(s) for s in salt)]).encode()
        return items[zlib.crc32(key) % len(items)]


def eligible_instances(
    model: ModelSnapshot,
    cluster: ClusterSnapshot,
    exclude: frozenset[str] = frozenset(),
    *,
    allow_shutting_down: bool = False,
) -> list[InstanceSnapshot]:
    """Instances that may load ``model``: the hard constraints every policy respects."""
    barred = (
        exclude | model.holders | model.failed_on if model.copies or model.failed_on else exclude
    )
    required = model.required_labels
    size = model.size_bytes
    gpu = model.device is Device.GPU
    out = []
    for inst in cluster.instances:
        mem = inst.gpu if gpu else inst.cpu
        if size > mem.capacity_bytes - mem.pinned_bytes:
            continue
        if barred and inst.instance_id in barred:
            continue
        if inst.shutting_down and not allow_shutting_down:
            continue
        if required and not required <= inst.labels:
            continue
        out.append(inst)
    return out


def _live_copies(
    model: ModelSnapshot, cluster: ClusterSnapshot
) -> list[tuple[CopySnapshot, InstanceSnapshot]]:
    """Copies (loading or loaded) on instances that are present and not shutting down."""
    out = []
    for c in model.copies:
        if c.state is CopyState.FAILED:
            continue
        inst = cluster.instance(c.instance_id)
        if inst is not None and not inst.shutting_down:
            out.append((c, inst))
    return out


def place_lowest_priority(
    policy: Policy,
    model: ModelSnapshot,
    cluster: ClusterSnapshot,
    exclude: frozenset[str],
) -> str | None:
    """Shared cache-miss rule of the single-copy policies.

    If some instance has the model's size free, load there (the one with most
    free bytes). Otherwise load where the lowest-priority evictable model lives,
    so that the cluster as a whole evicts in priority order, as one cache would.
    Instances with an idle loading slot are preferred, as in ModelMesh's
    placement order: a load queued behind others adds to the request's wait.
    """
    cands = eligible_instances(model, cluster, exclude)
    if not cands:
        return None
    cands = [i for i in cands if i.loading < i.loading_slots] or cands
    size, device = model.size_bytes, model.device
    roomy = [i for i in cands if i.memory(device).free_bytes >= size]
    if roomy:
        most = max(i.memory(device).free_bytes for i in roomy)
        best = [i for i in roomy if i.memory(device).free_bytes == most]
    else:
        inf = float("inf")
        floor = min(_min_priority(i, model) for i in cands)
        best = [i for i in cands if _min_priority(i, model) == floor]
        if floor == inf:
            best = cands
    return policy._pick(best, model.model_id, cluster.now).instance_id


def _min_priority(inst: InstanceSnapshot, model: ModelSnapshot) -> float:
    p = inst.memory(model.device).min_priority
    return float("inf") if p is None else p
