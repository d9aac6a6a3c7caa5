"""Where models live: pure placement decisions over immutable snapshots.

No I/O, no clock: time is always an argument. The live mesh and the simulator
call the same code.

Entry point for the mesh::

    from placement import get_policy, ModelSnapshot, ClusterSnapshot, InstanceCache

    policy = get_policy("density")            # or "modelmesh", "lru", "gdsf"
    target = policy.route(model, cluster)     # cache hit: which copy serves
    target = policy.place(model, cluster, exclude=frozenset())  # cache miss: who loads
    victims = policy.evict(cache, bytes_needed)  # who leaves; None if impossible
    prio = policy.priority(now=..., size_bytes=..., request_rate=..., hits_here=...,
                           load_seconds=..., clock=cache.clock)  # store with the copy
    actions = policy.rebalance(cluster, models, now)  # every policy.rebalance_interval_s

Per request the caller also updates the model's usage with
``usage.rate_after_request`` and ``usage.earlier_use_after_request``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from placement.density import DensityPolicy
from placement.gdsf import GDSFPolicy
from placement.lru import LRUPolicy
from placement.model import (
    Action,
    AddCopy,
    CachedModel,
    ClusterSnapshot,
    CopySnapshot,
    CopyState,
    Device,
    InstanceCache,
    InstanceSnapshot,
    Memory,
    ModelSnapshot,
    RemoveCopy,
)
from placement.modelmesh import ModelMeshPolicy
from placement.policy import Policy, eligible_instances
from placement.usage import (
    RATE_HALF_LIFE_S,
    REUSE_GAP_S,
    decayed_rate,
    earlier_use_after_request,
    rate_after_request,
)

#: The policy the mesh uses unless configured otherwise.
DEFAULT_POLICY = "density"

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (DensityPolicy, ModelMeshPolicy, LRUPolicy, GDSFPolicy)
}


def get_policy(name: str = DEFAULT_POLICY, /, **params: Any) -> Policy:
    """The policy registered as ``name``, configured with ``params`` (e.g. ``seed=1``).

    Raises ValueError for an unknown name or parameter, naming the valid ones.
    """
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown placement policy {name!r} (known: {', '.join(POLICIES)})")
    known = policy_params(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(
            f"policy {name!r} has no parameter {', '.join(map(repr, unknown))} "
            f"(it has: {', '.join(known)})"
        )
    defaults = known
    for key, value in params.items():
        default = defaults[key]
        numeric = isinstance(default, int | float) and not isinstance(default, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"policy {name!r} parameter {key!r} must be a number, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"policy {name!r} parameter {key!r} must be an integer")
            params[key] = int(value)
        if isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"policy {name!r} parameter {key!r} must be a string, got {value!r}")
        if numeric and value < 0:
            raise ValueError(f"policy {name!r} parameter {key!r} must not be negative")
    return cls(**params)


def policy_params(name: str) -> dict[str, Any]:
    """The parameters of policy ``name`` with their defaults."""
    cls = POLICIES[name]
    return {f.name: f.default for f in dataclasses.fields(cls)}


__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "RATE_HALF_LIFE_S",
    "REUSE_GAP_S",
    "Action",
    "AddCopy",
    "CachedModel",
    "ClusterSnapshot",
    "CopySnapshot",
    "CopyState",
    "DensityPolicy",
    "Device",
    "GDSFPolicy",
    "InstanceCache",
    "InstanceSnapshot",
    "LRUPolicy",
    "Memory",
    "ModelMeshPolicy",
    "ModelSnapshot",
    "Policy",
    "RemoveCopy",
    "decayed_rate",
    "earlier_use_after_request",
    "eligible_instances",
    "get_policy",
    "policy_params",
    "rate_after_request",
]
