"""The immutable data model that placement decisions are made over.

Everything here is a frozen snapshot: the live mesh builds them from its etcd
mirror and local cache, the simulator from its virtual cluster. A decision never
mutates a snapshot; it returns what should change and the caller applies it.

Times are plain floats in seconds on whatever clock the caller uses (wall clock
in the mesh, virtual time in the simulator). Sizes are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Device(StrEnum):
    """Which memory of an instance a model occupies."""

    CPU = "cpu"
    GPU = "gpu"


class CopyState(StrEnum):
    """State of one copy of a model on one instance."""

    LOADING = "LOADING"
    LOADED = "LOADED"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class Memory:
    """One memory pool (CPU or GPU) of an instance.

    ``pinned_bytes`` is the part of ``used_bytes`` that cannot be evicted right
    now (models loading or serving requests). ``lru_time`` is the last-used time
    of the least recently used model in the pool and ``min_priority`` the lowest
    retention priority (see ``Policy.priority``) of an evictable model in it;
    both are None when nothing in the pool can be evicted.
    """

    capacity_bytes: int = 0
    used_bytes: int = 0
    pinned_bytes: int = 0
    lru_time: float | None = None
    min_priority: float | None = None

    @property
    def free_bytes(self) -> int:
        free = self.capacity_bytes - self.used_bytes
        return free if free > 0 else 0

    def can_fit(self, size_bytes: int) -> bool:
        """Whether a model of this size fits once every evictable model has left."""
        return size_bytes <= self.capacity_bytes - self.pinned_bytes


_NO_MEMORY = Memory()


@dataclass(frozen=True, slots=True)
class InstanceSnapshot:
    """What placement knows about one mesh instance (pod).

    Mirrors the instance record that every instance publishes to etcd:
    capacity and use per device, how many models it holds and is loading,
    how busy it is, its labels and whether it is shutting down.
    """

    instance_id: str
    cpu: Memory
    gpu: Memory = _NO_MEMORY
    model_count: int = 0
    loading: int = 0
    loading_slots: int = 1
    in_flight: int = 0
    concurrency: int = 1
    request_rate: float = 0.0
    labels: frozenset[str] = frozenset()
    shutting_down: bool = False

    def memory(self, device: Device) -> Memory:
        return self.gpu if device is Device.GPU else self.cpu

    @property
    def lru_time(self) -> float | None:
        """Last-used time of the least recently used model in CPU memory."""
        return self.cpu.lru_time


@dataclass(frozen=True, slots=True)
class CopySnapshot:
    """One copy of a model on one instance.

    ``since`` is when its load started; ``request_rate`` is the requests per
    second this copy served over the caller's recent measuring window.
    """

    instance_id: str
    state: CopyState = CopyState.LOADED
    since: float = 0.0
    last_used: float | None = None
    in_flight: int = 0
    request_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """What placement knows about one registered model.

    ``request_rate`` is the model's exponentially decayed request rate as of
    ``last_used`` (maintain it with ``placement.usage.rate_after_request``);
    ``earlier_use`` is the last use before the most recent pause in its traffic
    (``placement.usage.earlier_use_after_request``). ``failed_on`` names the
    instances where a load failed recently; ``last_removed`` is when a copy of
    it was last scaled down anywhere. ``load_seconds`` and ``service_seconds``
    are the expected load time and inference time.
    """

    model_id: str
    size_bytes: int
    device: Device = Device.CPU
    copies: tuple[CopySnapshot, ...] = ()
    last_used: float | None = None
    earlier_use: float | None = None
    request_rate: float = 0.0
    failed_on: frozenset[str] = frozenset()
    required_labels: frozenset[str] = frozenset()
    load_seconds: float = 1.0
    service_seconds: float = 0.01
    last_removed: float | None = None

    @property
    def loaded_copies(self) -> tuple[CopySnapshot, ...]:
        return tuple(c for c in self.copies if c.state is CopyState.LOADED)

    @property
    def holders(self) -> frozenset[str]:
        """Instances that have a loading or loaded copy."""
        return frozenset(c.instance_id for c in self.copies if c.state is not CopyState.FAILED)


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """Every live instance of the mesh, as seen at time ``now``."""

    instances: tuple[InstanceSnapshot, ...]
    now: float = 0.0

    def instance(self, instance_id: str) -> InstanceSnapshot | None:
        for inst in self.instances:
            if inst.instance_id == instance_id:
                return inst
        return None

    def capacity_bytes(self, device: Device = Device.CPU) -> int:
        return sum(i.memory(device).capacity_bytes for i in self.instances)

    def free_bytes(self, device: Device = Device.CPU) -> int:
        return sum(i.memory(device).free_bytes for i in self.instances)

    def global_lru_time(self, device: Device = Device.CPU) -> float | None:
        """Oldest last-used time of any evictable model in the cluster."""
        times = [t for i in self.instances if (t := i.memory(device).lru_time) is not None]
        return min(times) if times else None


@dataclass(frozen=True, slots=True)
class CachedModel:
    """One model held in one memory pool of an instance, as the evictor sees it."""

    model_id: str
    size_bytes: int
    priority: float
    last_used: float = 0.0
    in_use: bool = False


@dataclass(frozen=True, slots=True)
class InstanceCache:
    """The models in one memory pool of one instance.

    ``clock`` is the pool's aging value for policies that need one (GDSF's
    inflation value L); after evicting, the caller sets it with
    ``Policy.clock_after_evict``.
    """

    instance_id: str
    capacity_bytes: int
    entries: tuple[CachedModel, ...] = ()
    device: Device = Device.CPU
    clock: float = 0.0

    @property
    def used_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries)

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes)

    def memory(self) -> Memory:
        """This pool summarised as the ``Memory`` of an instance snapshot."""
        evictable = [e for e in self.entries if not e.in_use]
        return Memory(
            capacity_bytes=self.capacity_bytes,
            used_bytes=self.used_bytes,
            pinned_bytes=sum(e.size_bytes for e in self.entries if e.in_use),
            lru_time=min((e.last_used for e in evictable), default=None),
            min_priority=min((e.priority for e in evictable), default=None),
        )


@dataclass(frozen=True, slots=True)
class AddCopy:
    """Load one more copy of ``model_id`` on ``instance_id``.

    ``as_of`` is the last-used time the new copy should start with (it sets the
    copy's retention priority; None means the model's own last use). The caller
    makes room with ``Policy.evict(..., below=priority)`` and drops the add when
    that is not possible.
    """

    model_id: str
    instance_id: str
    reason: str = ""
    as_of: float | None = None


@dataclass(frozen=True, slots=True)
class RemoveCopy:
    """Unload the copy of ``model_id`` on ``instance_id`` (never its last loaded copy)."""

    model_id: str
    instance_id: str
    reason: str = ""


Action = AddCopy | RemoveCopy
