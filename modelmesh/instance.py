"""One mesh instance: wires registry, cache, data plane and servers, and owns their lifetime.

``start()`` brings everything up in dependency order; ``stop()`` takes it down
in reverse. Background chores (the registry watch, the lease keep-alive, copy
and instance publishing) are tasks owned here and cancelled on stop; nothing
runs unowned.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelmesh import __version__
from modelmesh._proto.mmesh import mesh_extensions_pb2_grpc as ext_grpc
from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc
from modelmesh.cache.local import CacheEvent, ModelCache
from modelmesh.dataplane import DataPlane
from modelmesh.errors import MeshError, Unavailable
from modelmesh.lifecycle import ModelLifecycle
from modelmesh.metrics import Metrics
from modelmesh.registry.embedded import EmbeddedEtcd
from modelmesh.registry.etcd import EtcdClient
from modelmesh.registry.records import CopyRecord, CopyState, InstanceRecord
from modelmesh.registry.store import Registry, now_ms
from modelmesh.settings import Settings
from modelmesh.storage import LocalModelLoader

log = logging.getLogger(__name__)

_INSTANCE_REFRESH_S = 5.0


class MeshInstance:
    """A mesh instance. Use ``await start()`` then ``await stop()`` (or ``run_until``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ready = False
        self.port = 0
        self.metrics_port = 0
        self.instance_id = ""
        self.metrics = Metrics()
        self.embedded_etcd: EmbeddedEtcd | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lease = 0
        self._copies: dict[str, CopyRecord | None] = {}  # desired copy records, by model
        self._dirty: set[str] = set()
        self._publish = asyncio.Event()
        self._instance_dirty = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._stopping = False
        self._started_ms = now_ms()

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        endpoints = list(s.etcd)
        if not endpoints:
            self.embedded_etcd = EmbeddedEtcd(Path(s.data_dir) / "etcd")
            endpoints = [await asyncio.to_thread(self.embedded_etcd.start)]
        try:
            await self._start(endpoints)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, endpoints: list[str]) -> None:
        s = self.settings
        self.client = EtcdClient(endpoints, timeout=10.0)
        self.registry = Registry(self.client, s.etcd_prefix)
        try:
            revision = await self.registry.load()
        except Unavailable as exc:
            raise RuntimeError(f"cannot reach etcd at {','.join(endpoints)}: {exc}") from exc
        self.spawn(self.registry.run_watch(revision), name="registry-watch")

        threads = s.inference_threads or 2 * (os.cpu_count() or 1)
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mm-infer")
        self.cache = ModelCache(
            s.capacity, LocalModelLoader(Path(s.models_root)),
            max_concurrent_loads=s.max_concurrent_loads, failure_ttl=s.load_failure_ttl,
            space_wait=s.load_timeout, on_event=self._on_cache_event,
        )
        self.dataplane = DataPlane(self.registry, self.cache, self.metrics, self.executor,
                                   s.load_timeout)
        self.lifecycle = ModelLifecycle(self)
        self.metrics.capacity_bytes.set(s.capacity)

        await self._start_server()
        self.instance_id = s.resolved_instance_id(self.port)
        self._lease = await self.client.lease_grant(max(int(s.lease_ttl), 2))
        await self._put_instance()
        self.spawn(self._keepalive(), name="lease-keepalive")
        self.spawn(self._publish_copies(), name="copy-publisher")
        self.spawn(self._refresh_instance(), name="instance-refresh")
        if s.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(s.metrics_port)
        if s.demo:
            await self._register_demo_models()
        self.ready = True
        log.info("instance %s serving on port %d (etcd %s, capacity %d bytes)",
                 self.instance_id, self.port, ",".join(endpoints), s.capacity)

    async def _start_server(self) -> None:
        from modelmesh.api.inference import InferenceServicer
        from modelmesh.api.management import ExtensionsServicer, ModelMeshServicer

        s = self.settings
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self), server)
        mm_grpc.add_ModelMeshServicer_to_server(ModelMeshServicer(self), server)
        ext_grpc.add_ModelMeshExtensionsServicer_to_server(ExtensionsServicer(self), server)
        self.port = server.add_insecure_port(f"{s.host}:{s.port}")
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {s.host}:{s.port}")
        await server.start()
        self._server = server

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving, finish in-flight requests (up to ``grace``), release everything."""
        if self._stopping:
            return
        self._stopping = True
        self.ready = False
        if self._server is not None:
            await self._server.stop(grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if hasattr(self, "cache"):
            await self.cache.close()
        if self._lease:
            try:
                await self.client.lease_revoke(self._lease)  # drops our record and copies
            except MeshError as exc:
                log.warning("could not revoke lease on shutdown: %s", exc)
        if hasattr(self, "client"):
            await self.client.close()
        if hasattr(self, "executor"):
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.stop()
        if self.embedded_etcd is not None:
            await asyncio.to_thread(self.embedded_etcd.stop)
        log.info("instance %s stopped", self.instance_id)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "") -> asyncio.Task[Any]:
        """Run a background task owned by this instance (cancelled on stop)."""
        task = asyncio.get_running_loop().create_task(coro, name=name or None)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task %s failed", t.get_name(), exc_info=t.exception())

        task.add_done_callback(done)
        return task

    # -- publishing state to etcd -----------------------------------------------------

    def _on_cache_event(self, ev: CacheEvent) -> None:
        m = self.metrics
        if ev.kind == "loading":
            rec: CopyRecord | None = CopyRecord(ev.model_id, self.instance_id, CopyState.LOADING,
                                                updated_ms=now_ms())
        elif ev.kind == "loaded":
            m.load_model_ms.observe(ev.load_ms)
            m.model_size_bytes.observe(ev.size_bytes)
            rec = CopyRecord(ev.model_id, self.instance_id, CopyState.LOADED, ev.size_bytes,
                             int(ev.load_ms), updated_ms=now_ms())
        elif ev.kind == "failed":
            m.load_failures.inc()
            rec = CopyRecord(ev.model_id, self.instance_id, CopyState.FAILED, error=ev.error,
                             updated_ms=now_ms())
        else:
            m.unloads.labels(ev.reason).inc()
            rec = None
        m.used_bytes.set(self.cache.used_bytes)
        m.models_total.set(self.cache.loaded_count)
        self._copies[ev.model_id] = rec
        self._dirty.add(ev.model_id)
        self._publish.set()
        self._instance_dirty.set()

    async def _publish_copies(self) -> None:
        while True:
            await self._publish.wait()
            self._publish.clear()
            while self._dirty:
                model_id = self._dirty.pop()
                rec = self._copies.get(model_id)
                try:
                    if rec is None:
                        self._copies.pop(model_id, None)
                        await self.registry.delete_copy(model_id, self.instance_id)
                    else:
                        await self.registry.put_copy(rec, self._lease)
                except Unavailable:
                    self._dirty.add(model_id)
                    await asyncio.sleep(0.5)

    def instance_record(self) -> InstanceRecord:
        lru = self.cache.lru_time()
        lru_ms = int((time.time() - (time.monotonic() - lru)) * 1000) if lru else 0
        return InstanceRecord(
            instance_id=self.instance_id,
            endpoint=self.settings.advertise or f"127.0.0.1:{self.port}",
            capacity_bytes=self.settings.capacity, used_bytes=self.cache.used_bytes,
            model_count=self.cache.loaded_count, loading_count=self.cache.loading_count,
            lru_time_ms=lru_ms, labels=self.settings.labels, shutting_down=self._stopping,
            version=__version__, started_ms=self._started_ms,
        )

    async def _put_instance(self) -> None:
        await self.registry.put_instance(self.instance_record(), self._lease)

    async def _refresh_instance(self) -> None:
        last: InstanceRecord | None = None
        while True:
            try:
                await asyncio.wait_for(self._instance_dirty.wait(), _INSTANCE_REFRESH_S)
            except TimeoutError:
                pass
            self._instance_dirty.clear()
            rec = self.instance_record()
            self.metrics.registered_models.set(len(self.registry.models))
            lru = self.cache.lru_time()
            self.metrics.lru_age_seconds.set(time.monotonic() - lru if lru else 0)
            if last is not None and rec == last:
                continue
            try:
                await self.registry.put_instance(rec, self._lease)
                last = rec
            except Unavailable:
                await asyncio.sleep(1.0)

    async def _keepalive(self) -> None:
        """Keep the lease alive; after losing it (etcd down too long) re-create and republish."""
        interval = max(self.settings.lease_ttl / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
            try:
                ttl = await self.client.lease_keepalive_once(self._lease)
                if ttl > 0:
                    continue
                log.warning("etcd lease %x expired; re-registering this instance", self._lease)
                self._lease = await self.client.lease_grant(max(int(self.settings.lease_ttl), 2))
                await self._put_instance()
                for model_id in list(self._copies):
                    self._dirty.add(model_id)
                self._publish.set()
            except Unavailable as exc:
                log.debug("lease keep-alive: %s", exc)

    # -- demo -------------------------------------------------------------------------

    async def _register_demo_models(self) -> None:
        from modelmesh.demo import write_demo_models

        root = Path(self.settings.models_root)
        models = await asyncio.to_thread(write_demo_models, root)
        for m in models:
            record = self.lifecycle.new_record(m.model_id, m.model_type, str(m.path))
            await self.lifecycle.register(record, replace=True, load_now=True)
        log.info("demo models registered: %s", ", ".join(m.model_id for m in models))
