"""One mesh instance: wires registry, cache, data plane and servers, and owns their lifetime.

``start()`` brings everything up in dependency order; ``stop()`` takes it down
in reverse. Background chores (the registry watch, the lease keep-alive, copy
and instance publishing) are tasks owned here and cancelled on stop; nothing
runs unowned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

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
from modelmesh.registry.store import INSTANCES, Change, Registry, now_ms
from modelmesh.routing.chores import Chores
from modelmesh.routing.router import Router
from modelmesh.runtimes.remote import RuntimeBinding, connect_runtime
from modelmesh.settings import Settings
from modelmesh.storage import LocalModelLoader
from placement import get_policy

log = logging.getLogger(__name__)

_INSTANCE_MIN_GAP_S = 0.02
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
        self.runtime: RuntimeBinding | None = None  # a runtime server (--runtime), if any
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lease = 0
        self._copies: dict[str, CopyRecord | None] = {}  # desired copy records, by model
        self._dirty: set[str] = set()
        self._publish = asyncio.Event()
        self._instance_dirty = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._stopping = False
        self.draining = False
        self._started_ms = now_ms()
        self._rate = (time.monotonic(), 0, 0.0)  # (sampled at, requests served, per second)

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
        self.concurrency = threads
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mm-infer")
        name, params = s.placement
        files = LocalModelLoader.from_settings(s, self.metrics)
        if s.runtime != "embedded":  # models run in a runtime server, within its limits
            self.runtime = await asyncio.to_thread(connect_runtime, s, files)
            s = self.settings = self.runtime.apply(s)
        self.cache = ModelCache(
            s.capacity, self.runtime.loader if self.runtime is not None else files,
            max_concurrent_loads=s.max_concurrent_loads, failure_ttl=s.load_failure_ttl,
            space_wait=s.load_timeout, on_event=self._on_cache_event,
            policy=get_policy(name, **params),
        )
        self.dataplane = DataPlane(self.registry, self.cache, self.metrics, self.executor,
                                   s.load_timeout, inline_infer_ms=s.inline_infer_ms,
                                   max_batch_rows=s.max_batch_rows,
                                   max_batch_delay_ms=s.max_batch_delay_ms)
        self.router = Router(self)
        self.lifecycle = ModelLifecycle(self)
        self.chores = Chores(self)
        self.registry.add_listener(self._on_registry_change)
        self.metrics.capacity_bytes.set(s.capacity)

        await self._start_server()
        self.instance_id = s.resolved_instance_id(self.port)
        self._lease = await self.client.lease_grant(max(int(s.lease_ttl), 2))
        await self._put_instance()
        self.spawn(self._keepalive(), name="lease-keepalive")
        self.spawn(self._publish_copies(), name="copy-publisher")
        self.spawn(self._refresh_instance(), name="instance-refresh")
        self.spawn(self.chores.run(), name="chores")
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
        service, handlers = InferenceServicer(self).generic_handler()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)
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
        if hasattr(self, "router"):
            await self.router.close()
        if hasattr(self, "cache"):
            await self.cache.close()
        if self.runtime is not None:
            await self.runtime.close()
        if self._lease:
            try:  # drops our record and copies at once (else they expire with the lease)
                await asyncio.wait_for(self.client.lease_revoke(self._lease), 3.0)
            except (MeshError, TimeoutError) as exc:
                log.warning("could not revoke lease on shutdown: %s", exc or "timed out")
        if hasattr(self, "client"):
            await self.client.close()
        if hasattr(self, "executor"):
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.stop()
        if self.embedded_etcd is not None:
            await asyncio.to_thread(self.embedded_etcd.stop)
        log.info("instance %s stopped", self.instance_id)

    async def drain(self) -> None:
        """Prepare to stop without failing requests (SIGTERM).

        Marks this instance shutting down (others stop routing and placing here),
        refuses new loads, asks placement where each recently used model that has
        no other copy should go and has it loaded there, and waits (at most
        ``--drain-timeout``) for those loads. Requests keep being served here
        meanwhile; ``stop()`` then finishes the ones in flight.
        """
        if self.draining or not self.ready:
            return
        self.draining = True
        self.cache.refuse_loads = "this instance is shutting down"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        try:
            await asyncio.wait_for(self._put_instance(), 2.0)
        except (TimeoutError, MeshError) as exc:
            log.warning("could not publish shutting-down state: %s", exc)
        recent = time.time() - 3600
        entries = sorted(
            (e for e in self.cache.entries() if e.state.value == "LOADED"),
            key=lambda e: e.priority, reverse=True,
        )
        cluster = self.router.cluster_snapshot()
        moves = []
        for entry in entries:
            usage = self.cache.usage.get(entry.model_id)
            record = self.registry.models.get(entry.model_id)
            if record is None or usage is None or (usage.last_used or 0) < recent:
                continue
            live = self.registry.instances
            elsewhere = [iid for iid, c in self.registry.copies.get(entry.model_id, {}).items()
                         if iid != self.instance_id and iid in live
                         and not live[iid].shutting_down and c.state is not CopyState.FAILED]
            if elsewhere:
                continue
            model = self.router.model_snapshot(record)
            target = self.router.policy.place(model, cluster, frozenset({self.instance_id}))
            if target is None:
                continue
            moves.append(self.spawn(
                self.router.load_on(target, entry.model_id, sync=True,
                                    timeout=max(deadline - loop.time(), 0.1)),
                name=f"drain:{entry.model_id}"))
        if moves:
            log.info("draining: moving %d model(s) to other instances", len(moves))
            await asyncio.wait(moves, timeout=max(deadline - loop.time(), 0.1))
        # Give the other instances' mirrors a moment to see the new copies.
        await asyncio.sleep(min(0.5, max(deadline - loop.time(), 0)))

    def request_rate(self) -> float:
        """Requests per second served here, over the last few seconds."""
        t, n, rate = self._rate
        now = time.monotonic()
        served = sum(st.execution_count for st in self.dataplane.stats.values())
        if now - t >= 2.0:
            rate = (served - n) / (now - t)
            self._rate = (now, served, rate)
        return rate

    @property
    def lease(self) -> int:
        return self._lease

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
            known = self.registry.models.get(ev.model_id)
            if known is not None and abs(known.size_estimate - ev.size_bytes) > \
                    0.1 * ev.size_bytes:
                self.spawn(self._record_use(ev.model_id, 0, 0.0, ev.size_bytes))
        elif ev.kind == "failed":
            m.load_failures.inc()
            rec = CopyRecord(ev.model_id, self.instance_id, CopyState.FAILED, error=ev.error,
                             updated_ms=now_ms())
        else:
            m.unloads.labels(ev.reason).inc()
            rec = None
            usage = self.cache.usage.get(ev.model_id)
            if ev.reason == "evicted" and usage is not None and usage.last_used:
                self.spawn(self._record_use(ev.model_id, usage.last_used, usage.rate))
        m.used_bytes.set(self.cache.used_bytes)
        m.models_total.set(self.cache.loaded_count)
        self._copies[ev.model_id] = rec
        self._dirty.add(ev.model_id)
        self._publish.set()
        self._instance_dirty.set()

    async def _record_use(self, model_id: str, last_used: float, rate: float,
                          size: int = 0) -> None:
        try:
            await self.registry.record_use(model_id, int(last_used * 1000), rate, size)
        except MeshError as exc:
            log.debug("could not record use of %s: %s", model_id, exc)

    def republish_copy(self, model_id: str, request_rate: float) -> None:
        """Publish the copy record again with a new request rate."""
        rec = self._copies.get(model_id)
        if rec is None:
            return
        self._copies[model_id] = dataclasses.replace(rec, request_rate=round(request_rate, 3))
        self._dirty.add(model_id)
        self._publish.set()

    def _on_registry_change(self, change: Change) -> None:
        if change.table == INSTANCES and change.new is None and change.old is not None:
            if change.key != self.instance_id:
                self.spawn(self.router.peers.forget(change.old.endpoint), name="peer-forget")

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
        mem = self.cache.memory()
        return InstanceRecord(
            instance_id=self.instance_id,
            endpoint=self.settings.advertise or f"127.0.0.1:{self.port}",
            capacity_bytes=self.cache.capacity_bytes, used_bytes=self.cache.used_bytes,
            model_count=self.cache.loaded_count, loading_count=self.cache.loading_count,
            loading_slots=self.settings.max_concurrent_loads, concurrency=self.concurrency,
            pinned_bytes=mem.pinned_bytes,
            min_priority=round(mem.min_priority, 6) if mem.min_priority is not None else None,
            lru_time_ms=int(mem.lru_time * 1000) if mem.lru_time else 0,
            requests_per_minute=round(self.request_rate() * 60, 1),
            in_flight=self.router.outstanding[self.instance_id],
            labels=self.settings.labels, shutting_down=self.draining or self._stopping,
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
            # Under churn every load and eviction marks the record dirty: coalesce
            # bursts, but briefly, since placement elsewhere reads used bytes from it.
            await asyncio.sleep(_INSTANCE_MIN_GAP_S)

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
