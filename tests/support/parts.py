"""One instance's request-path components, wired as the composition root wires them,
over an in-memory mirror (``tests.support.mirror``) and a real ``ModelCache``.

Models come from ``StandInLoader``, a test double for the file loader: it
fabricates models of chosen sizes that echo their input. Nothing here starts a
process or reaches etcd; a test that reaches it fails with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from modelmesh.cache.local import ModelCache
from modelmesh.dataplane import DataPlane
from modelmesh.lifecycle import ModelLifecycle
from modelmesh.metrics import Metrics
from modelmesh.node import Node
from modelmesh.registry.records import InstanceRecord, ModelRecord
from modelmesh.registry.store import Registry
from modelmesh.routing.peers import PeerPool
from modelmesh.routing.router import Router
from modelmesh.runtimes.base import LoadedModel
from modelmesh.runtimes.formats import check_format
from modelmesh.tensor import ModelSignature, Tensor
from modelmesh.view import MeshView
from placement import get_policy
from tests.support.mirror import in_memory_registry, put


class EchoModel(LoadedModel):
    """A fabricated model of a chosen size that returns its inputs."""

    def __init__(self, size: int) -> None:
        self.size_bytes = size
        self.signature = ModelSignature((), ())

    def predict(self, inputs: list[Tensor], parameters: Any) -> list[Tensor]:
        return inputs


class StandInLoader:
    def __init__(self, sizes: dict[str, int] | None = None, default: int = 100) -> None:
        self.sizes = sizes or {}
        self.default = default
        self.loads: dict[str, int] = {}

    def predict_size(self, record: ModelRecord) -> int:
        return self.sizes.get(record.model_id, self.default)

    def load(self, record: ModelRecord) -> LoadedModel:
        self.loads[record.model_id] = self.loads.get(record.model_id, 0) + 1
        return EchoModel(self.predict_size(record))


@dataclass
class Parts:
    node: Node
    registry: Registry
    cache: ModelCache
    dataplane: DataPlane
    view: MeshView
    router: Router
    lifecycle: ModelLifecycle
    loader: StandInLoader
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.router.close()
        await self.cache.close()
        await self.registry.client.close()


def build(me: str = "me", capacity: int = 10_000, policy: str = "density",
          loader: StandInLoader | None = None, executor: ThreadPoolExecutor | None = None,
          peers: tuple[str, ...] = ()) -> Parts:
    """The parts of instance ``me``; ``peers`` get instance records (no server behind them)."""
    node = Node(instance_id=me, concurrency=2)
    registry = in_memory_registry()
    loader = loader or StandInLoader()
    chosen = get_policy(policy)
    cache = ModelCache(capacity, loader, policy=chosen)
    metrics = Metrics()
    dataplane = DataPlane(registry, cache, metrics, executor or ThreadPoolExecutor(2), 5.0)
    view = MeshView(registry, cache, dataplane, node, loading_slots=2, labels={})
    tasks: list[asyncio.Task[Any]] = []

    def spawn(coro: Any, name: str = "") -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name or None)
        tasks.append(task)
        return task

    router = Router(node, registry, cache, dataplane, view, chosen, PeerPool(1 << 20), metrics,
                    spawn, max_hops=2)
    lifecycle = ModelLifecycle(node, registry, cache, view, router, spawn,
                               check_model=check_format, load_timeout=5.0)
    registry.add_listener(lifecycle.on_registry_change)
    put(registry, *(InstanceRecord(iid, f"127.0.0.1:{1 + i}", capacity)
                    for i, iid in enumerate((me, *peers))))
    return Parts(node, registry, cache, dataplane, view, router, lifecycle, loader, tasks)
