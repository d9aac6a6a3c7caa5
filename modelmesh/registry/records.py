"""The records kept in etcd, one frozen dataclass per table, stored as compact JSON.

Unknown JSON fields are ignored on read and defaults fill missing ones, so a
newer instance can add fields without breaking an older one during an upgrade.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from enum import Enum, StrEnum
from typing import Any, Self

# One copy-state enum for the whole mesh: placement's (records, the cache and
# placement's snapshots all speak it; stored in etcd by its value).
from placement import CopyState


class VModelState(StrEnum):
    """Mirrors ModelMesh's VModelStatusInfo.VModelStatus names."""

    DEFINED = "DEFINED"  # active model set and loaded (or loadable)
    TRANSITIONING = "TRANSITIONING"  # target differs from active and is loading
    TRANSITION_FAILED = "TRANSITION_FAILED"  # the target failed to load


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


class _Record:
    """JSON (de)serialisation shared by the record dataclasses.

    Empty slots, so the records (a mirror holds one per registered model) carry no
    per-instance ``__dict__`` or weakref slot. Field names are read once per class:
    ``dataclasses.asdict`` deep-copies every value and was most of the cost of
    writing a record.
    """

    __slots__ = ()

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        names = _FIELD_NAMES.get(cls)
        if names is None:
            names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
        return names

    def to_json(self) -> bytes:
        data = {}
        for k in self._field_names():
            v = getattr(self, k)
            if v is None or v == "" or v == {} or v == []:
                continue
            data[k] = v.value if isinstance(v, Enum) else v
        return _ENCODE(data).encode()

    @classmethod
    def from_json(cls, raw: bytes | str, **keys: Any) -> Self:
        data = json.loads(raw)
        known = _FIELD_SETS.get(cls)
        if known is None:
            known = _FIELD_SETS[cls] = frozenset(cls._field_names())
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs.update(keys)
        return cls(**kwargs)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_FIELD_SETS: dict[type, frozenset[str]] = {}


@dataclass(frozen=True, slots=True)
class ModelRecord(_Record):
    """A registered model (etcd ``models/<model_id>``)."""

    model_id: str
    model_type: str
    path: str
    storage_key: str = ""
    schema_path: str = ""
    size_estimate: int = 0  # bytes, from the runtime's prediction or a measured load
    created_ms: int = 0
    last_used_ms: int = 0  # written back when a copy is evicted (placement's fill uses it)
    request_rate: float = 0.0  # decayed requests/s as of last_used_ms
    auto_delete: bool = False  # owned by a vmodel: deleted when no longer referenced
    min_copies: int = 0
    max_copies: int = 0  # 0 = no limit

    def same_definition(self, other: ModelRecord) -> bool:
        """Whether two registrations describe the same model (type, location, key)."""
        return (self.model_type, self.path, self.storage_key, self.schema_path) == (
            other.model_type, other.path, other.storage_key, other.schema_path
        )


@dataclass(frozen=True, slots=True)
class Use:
    """What an instance writes back into a model's record: its last use, or its size."""

    last_used_ms: int = 0
    request_rate: float = 0.0
    size_bytes: int = 0  # measured at a load; 0: unchanged

    def merged(self, newer: Use) -> Use:
        """Both writes as one: the latest use, the latest measured size."""
        use = newer if newer.last_used_ms >= self.last_used_ms else self
        return Use(use.last_used_ms, use.request_rate, newer.size_bytes or self.size_bytes)

    def applied_to(self, rec: ModelRecord) -> ModelRecord:
        """``rec`` with this use (only if newer than its own) and this size written in."""
        new = rec
        if self.last_used_ms > rec.last_used_ms:
            new = replace(new, last_used_ms=self.last_used_ms,
                          request_rate=round(self.request_rate, 6))
        if self.size_bytes and self.size_bytes != rec.size_estimate:
            new = replace(new, size_estimate=self.size_bytes)
        return new


@dataclass(frozen=True, slots=True)
class VModelRecord(_Record):
    """A virtual model: a stable name whose concrete model can change (``vmodels/<id>``)."""

    vmodel_id: str
    active_model: str
    target_model: str
    owner: str = ""
    state: VModelState = VModelState.DEFINED
    error: str = ""
    updated_ms: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", VModelState(self.state))


@dataclass(frozen=True, slots=True)
class InstanceRecord(_Record):
    """A live mesh instance (``instances/<instance_id>``, bound to its lease)."""

    instance_id: str
    endpoint: str
    capacity_bytes: int
    used_bytes: int = 0
    model_count: int = 0
    loading_count: int = 0
    loading_slots: int = 1
    concurrency: int = 1  # requests it runs at once (inference threads)
    pinned_bytes: int = 0  # of used_bytes: models in use or loading (not evictable now)
    min_priority: float | None = None  # lowest retention priority among evictable models
    lru_time_ms: int = 0
    requests_per_minute: float = 0.0
    in_flight: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    shutting_down: bool = False
    version: str = ""
    started_ms: int = 0
    #: the number of this instance's cache events (loads, evictions) the record reflects;
    #: a copy record carries the number of its own event, so a reader can tell whether
    #: this record's figures already count that copy
    cache_seq: int = 0


@dataclass(frozen=True, slots=True)
class CopyRecord(_Record):
    """A copy of a model on an instance (``copies/<model_id>/<instance_id>``, lease-bound)."""

    model_id: str
    instance_id: str
    state: CopyState
    size_bytes: int = 0
    load_time_ms: int = 0
    error: str = ""
    updated_ms: int = 0
    request_rate: float = 0.0  # requests/s this copy served over the holder's last window
    cache_seq: int = 0  # the holder's cache event this record reports (see InstanceRecord)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", CopyState(self.state))


__all__ = [
    "CopyRecord",
    "CopyState",
    "InstanceRecord",
    "ModelRecord",
    "Use",
    "VModelRecord",
    "VModelState",
    "replace",
]
