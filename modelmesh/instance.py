"""The composition root: builds one mesh instance from ``Settings`` and owns its lifetime.

Every component is built here and handed only what it uses; none of them sees
the instance. ``start()`` brings them up in dependency order, ``drain()``
prepares a stop without failing requests (SIGTERM), ``stop()`` takes
everything down in reverse. Background tasks (the registry watch, the lease
keep-alive, record publishers, scaling rounds and what they start) run under
one ``Supervisor`` and are cancelled on stop; nothing runs unowned.

Wiring, bottom up::

    registry (etcd mirror) -> cache (+ loader: embedded or a runtime server)
      -> dataplane -> membership -> view -> router -> lifecycle -> scaling
      -> gRPC servicers (api/), the gRPC health service and reflection
      -> the REST transport (rest/: V2 REST and KServe V1 on the V2 servicer's operations)

Readiness (V2 ServerReady, gRPC health, the metrics port's /ready) changes in one
place, ``_set_readiness``: ready at the end of ``start()``, not ready from the
first moment of ``drain()`` or ``stop()``. A heartbeat task keeps /live honest.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from modelmesh._proto.mmesh import mesh_extensions_pb2 as ext_pb
from modelmesh._proto.mmesh import mesh_extensions_pb2_grpc as ext_grpc
from modelmesh._proto.mmesh import model_mesh_pb2 as mm_pb
from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc
from modelmesh.api import health, reflection
from modelmesh.api.inference import InferenceServicer
from modelmesh.api.ingress import Ingress
from modelmesh.api.management import ExtensionsServicer, ModelMeshServicer
from modelmesh.api.peer import PeerServicer
from modelmesh.api.registered import HotMethodsOnly
from modelmesh.cache.local import CacheEvent, EventKind, ModelCache
from modelmesh.dataplane import DataPlane
from modelmesh.demo import write_demo_models
from modelmesh.errors import MeshError, Unavailable
from modelmesh.lifecycle import ModelLifecycle
from modelmesh.membership import Membership
from modelmesh.metrics import Metrics
from modelmesh.node import Node, heartbeat
from modelmesh.registry.embedded import EmbeddedEtcd
from modelmesh.registry.etcd import EtcdClient
from modelmesh.registry.etcd_security import EtcdSecurity
from modelmesh.registry.store import Registry
from modelmesh.rest import RestApp, RestServer
from modelmesh.routing.peers import PeerPool, PeerSecurity
from modelmesh.routing.router import Router
from modelmesh.runtimes.formats import check_format
from modelmesh.runtimes.loader import EmbeddedLoader
from modelmesh.runtimes.remote import RuntimeBinding, connect_runtime
from modelmesh.scaling import CopyScaling
from modelmesh.security.auth import Authorizer
from modelmesh.security.tls import TlsFiles
from modelmesh.settings import Settings
from modelmesh.storage import ModelFiles, check_model_location
from modelmesh.view import MeshView
from placement import get_policy

log = logging.getLogger(__name__)

#: Seconds between looks at the TLS files for a rotation (REST; gRPC looks per connection).
TLS_CHECK_S = 2.0


class Supervisor:
    """Owns every background task of an instance: started by ``spawn``, ended by ``close``."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "") -> asyncio.Task[Any]:
        """Run ``coro`` as a task owned here; a failure is logged with its traceback."""
        task = asyncio.get_running_loop().create_task(coro, name=name or None)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        """Cancel every task and wait for them to end."""
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class _LongLived:
    """Keeps the collector off objects that live as long as the process.

    A full collection walks every tracked object: under churn one ran every few
    seconds and took 35-120 ms (100-140k objects, nearly all of them the imported
    libraries': scikit-learn, SciPy, NumPy, grpc), a stall of every request at once
    (the churn benchmark's p99). ``gc.freeze`` moves what exists now out of the
    collector's reach (reference counting still frees it): once started, and again
    after a load that imported modules (a runtime's libraries come with its first
    model). Cycles among what it moves are never collected: a few, once per library.
    """

    def __init__(self) -> None:
        self._modules = 0

    def settle(self) -> None:
        if len(sys.modules) != self._modules:
            self._modules = len(sys.modules)
            gc.freeze()


def _observe(metrics: Metrics, cache: ModelCache, ev: CacheEvent) -> None:
    """The cache's events as metrics."""
    if ev.kind is EventKind.LOADED:
        metrics.load_model_ms.observe(ev.load_ms)
        metrics.model_size_bytes.observe(ev.size_bytes)
    elif ev.kind is EventKind.FAILED:
        metrics.load_failures.inc()
    elif ev.kind is EventKind.UNLOADED:
        metrics.unloads.labels(ev.reason).inc()
    metrics.used_bytes.set(cache.used_bytes)
    metrics.models_total.set(cache.loaded_count)


class MeshInstance:
    """A mesh instance. Use ``await start()`` then ``await stop()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.node = Node()
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self.metrics = Metrics(per_model=settings.per_model_metrics)
        self.supervisor = Supervisor()
        self.embedded_etcd: EmbeddedEtcd | None = None
        self.runtime: RuntimeBinding | None = None  # a runtime server (--runtime), if any
        self.client: EtcdClient | None = None
        self.cache: ModelCache | None = None
        self.router: Router | None = None
        self.executor: ThreadPoolExecutor | None = None
        self._server: grpc.aio.Server | None = None
        self._rest: RestServer | None = None
        self._tls: TlsFiles | None = None
        self._authorizer = Authorizer(None)
        self._health: health.HealthService | None = None
        self._membership: Membership | None = None

    @property
    def instance_id(self) -> str:
        return self.node.instance_id

    # -- start ----------------------------------------------------------------------

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
        node, metrics, spawn = self.node, self.metrics, self.supervisor.spawn
        # Probes first: /live answers (and /ready says "starting") while etcd is reached.
        spawn(heartbeat(node), "heartbeat")
        if s.metrics_port >= 0:
            self.metrics_port = metrics.serve(
                s.metrics_port, host=s.metrics_host,
                live=lambda: node.liveness(time.monotonic()),
                ready=node.readiness)

        self._secure_from_settings()

        self.client = client = EtcdClient(endpoints, timeout=10.0,
                                          security=EtcdSecurity.from_settings(s))
        registry = Registry(client, s.etcd_prefix)
        try:
            revision = await registry.load()
        except Unavailable as exc:
            raise RuntimeError(f"cannot reach etcd at {','.join(endpoints)}: {exc}") from exc
        spawn(registry.run_watch(revision), "registry-watch")

        node.concurrency = s.inference_threads or 2 * (os.cpu_count() or 1)
        self.executor = ThreadPoolExecutor(max_workers=node.concurrency,
                                           thread_name_prefix="mm-infer")
        loader = EmbeddedLoader(ModelFiles.from_settings(s, metrics))
        if s.runtime != "embedded":  # models run in a runtime server, within its limits
            self.runtime = await asyncio.to_thread(connect_runtime, s, loader)
            s = self.settings = self.runtime.apply(s)
        name, params = s.placement
        policy = get_policy(name, **params)
        membership: Membership | None = None

        long_lived = _LongLived()

        def on_cache_event(ev: CacheEvent) -> None:
            _observe(metrics, cache, ev)
            if ev.kind is EventKind.LOADED:
                long_lived.settle()
            if membership is not None:
                membership.on_cache_event(ev)

        self.cache = cache = ModelCache(
            s.capacity, self.runtime.loader if self.runtime is not None else loader,
            max_concurrent_loads=s.max_concurrent_loads, failure_ttl=s.load_failure_ttl,
            space_wait=s.load_timeout, on_event=on_cache_event, policy=policy,
        )
        dataplane = DataPlane(registry, cache, metrics, self.executor, s.load_timeout,
                              inline_infer_ms=s.inline_infer_ms, max_batch_rows=s.max_batch_rows,
                              max_batch_delay_ms=s.max_batch_delay_ms)
        self._membership = membership = Membership(
            node, registry, client, cache, metrics, spawn, lease_ttl=s.lease_ttl,
            loading_slots=s.max_concurrent_loads, labels=s.labels,
            request_rate=dataplane.request_rate)
        view = MeshView(registry, cache, dataplane, node, loading_slots=s.max_concurrent_loads,
                        labels=s.labels)
        self.router = router = Router(node, registry, cache, dataplane, view, policy,
                                      PeerPool(s.max_message_bytes, self._peer_security(),
                                               metrics),
                                      metrics, spawn,
                                      max_hops=s.max_hops)
        lifecycle = ModelLifecycle(
            node, registry, cache, view, router, spawn,
            check_model=self._registration_check(), load_timeout=s.load_timeout,
            accepted_types=frozenset(s.accepted_model_types))
        self.scaling = scaling = CopyScaling(
            node, registry, cache, view, policy, router, lifecycle, membership, metrics, spawn,
            interval=s.rebalance_interval, load_failure_ttl=s.load_failure_ttl)
        registry.add_listener(lifecycle.on_registry_change)
        registry.add_listener(router.on_registry_change)
        metrics.capacity_bytes.set(s.capacity)

        inference = InferenceServicer(node, registry, cache, dataplane, router, lifecycle, view,
                                      metrics)
        if self._tls is not None:
            spawn(self._watch_tls(self._tls), "tls-files")
        self._server = await self._serve(inference, ModelMeshServicer(node, lifecycle, metrics),
                                         ExtensionsServicer(node, registry, lifecycle, metrics))
        if s.http_port >= 0:  # same loop, same router: a REST request costs no extra hop
            self._rest = RestServer(
                RestApp(node, inference, metrics, s.max_message_bytes,
                        authorizer=self._authorizer if self._secured() else None),
                s.host, s.http_port,
                ssl_context=self._tls.server_context() if self._tls is not None else None)
            self.http_port = await self._rest.start()
        node.instance_id = s.resolved_instance_id(self.port)
        await membership.start(s.advertise or f"127.0.0.1:{self.port}")
        spawn(scaling.run(), "scaling")
        if s.demo:
            await self._register_demo_models(lifecycle)
        long_lived.settle()
        await self._set_readiness(ready=True)
        log.info("instance %s serving on port %d (HTTP %s, etcd %s, capacity %d bytes)",
                 node.instance_id, self.port, self.http_port if self._rest else "off",
                 ",".join(endpoints), s.capacity)

    def _registration_check(self) -> Callable[[str, str, str], None]:
        """What a registration's (type, path, key) must satisfy where models run.

        The embedded runtimes need a format they know and a location the mesh can
        read. A runtime server (or an MLServer / Triton behind the repository
        adapter) gets them untouched, as ModelMesh passes them to its runtime: its
        loadModel accepts or refuses them (a refusal is LOADING_FAILED).
        """
        s = self.settings
        if s.runtime != "embedded":
            return lambda model_type, path, key: None

        def check(model_type: str, path: str, key: str) -> None:
            check_format(model_type, path, key)
            check_model_location(s, path, key)  # refuses escapes and unknown storage

        return check

    async def _serve(self, inference: InferenceServicer, management: ModelMeshServicer,
                     extensions: ExtensionsServicer) -> grpc.aio.Server:
        s = self.settings
        ingress = Ingress(self._authorizer, self._tls is not None and self._tls.mutual) \
            if self._secured() else None
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ], interceptors=[ingress] if ingress is not None else None)
        service, handlers = inference.generic_handler()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        # Batches of forwarded ModelInfer calls from other instances (``api.peer``).
        server.add_generic_rpc_handlers((PeerServicer(
            inference, ingress.admit_forwarded if ingress is not None else None
        ).generic_handler(),))
        # Generated set-up registers every method of a service with gRPC's core: through
        # ``hot`` only ModelInfer and ModelStreamInfer are (``api.registered``).
        hot = HotMethodsOnly(server)
        if ingress is None:  # registered methods would bypass the ingress's interceptor
            hot.add_registered_method_handlers(service, handlers)
        mm_grpc.add_ModelMeshServicer_to_server(management, hot)
        ext_grpc.add_ModelMeshExtensionsServicer_to_server(extensions, hot)
        served = (service, mm_pb.DESCRIPTOR.services_by_name["ModelMesh"].full_name,
                  ext_pb.DESCRIPTOR.services_by_name["ModelMeshExtensions"].full_name)
        self._health = health.HealthService(served)
        await self._health.set_serving(False)  # until start-up ends (_set_readiness)
        self._health.add_to(hot)
        if s.grpc_reflection:
            reflection.enable(hot, (*served, health.SERVICE_NAME))
        address = f"{s.host}:{s.port}"
        self.port = server.add_secure_port(address, self._tls.server_credentials()) \
            if self._tls is not None else server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {s.host}:{s.port}")
        await server.start()
        return server

    def _secure_from_settings(self) -> None:
        """TLS material and the auth rules; a bad file fails the start, naming it."""
        s = self.settings
        try:
            if s.tls_cert:
                self._tls = TlsFiles(Path(s.tls_cert), Path(s.tls_key),
                                     Path(s.tls_ca) if s.tls_ca else None)
            self._authorizer = Authorizer(Path(s.auth_file) if s.auth_file else None,
                                          self._tls.identity if self._tls else None)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"security settings: {exc}") from None
        if not s.auth_file and s.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("no --auth-file: anyone who can reach %s may register, unregister and "
                        "infer (README: Security)", s.host)

    def _peer_security(self) -> PeerSecurity | None:
        """How this instance calls its peers: TLS with its own certificate, when it has one."""
        tls = self._tls
        if tls is None:
            return None
        return PeerSecurity(tls.channel_credentials, tls.peer_name())

    def _secured(self) -> bool:
        """Whether calls go through the ingress (TLS, or an auth file)."""
        return self._tls is not None or self._authorizer.enabled

    async def _watch_tls(self, tls: TlsFiles) -> None:
        """Re-read rotated certificate files (REST's context; gRPC checks per connection)."""
        while True:
            await asyncio.sleep(TLS_CHECK_S)
            await asyncio.to_thread(tls.refresh)

    async def _register_demo_models(self, lifecycle: ModelLifecycle) -> None:
        models = await asyncio.to_thread(write_demo_models, Path(self.settings.models_root))
        for m in models:
            record = lifecycle.new_record(m.model_id, m.model_type, str(m.path))
            await lifecycle.register(record, replace=True, load_now=True)
        log.info("demo models registered: %s", ", ".join(m.model_id for m in models))

    # -- readiness ----------------------------------------------------------------------

    async def _set_readiness(self, *, ready: bool = False, draining: bool = False,
                             stopping: bool = False) -> None:
        """The one place readiness changes: the node's flags, then the gRPC health statuses.

        ``Node.readiness()`` turns the flags into what V2 ServerReady, /ready and
        the health service report; Watch streams see the change at once.
        """
        node = self.node
        if ready:
            node.ready = True
        if draining:
            node.draining = True
        if stopping:
            node.stopping, node.ready = True, False
        if self._health is not None:
            await self._health.set_serving(node.readiness()[0])

    # -- drain and stop ---------------------------------------------------------------

    async def drain(self) -> None:
        """Prepare to stop without failing requests (SIGTERM).

        Marks this instance shutting down (others stop routing and placing here),
        refuses new loads, has each recently used model that has no other copy
        loaded where placement says (``CopyScaling.evacuate``), and waits at most
        ``--drain-timeout`` for those loads. Requests keep being served here
        meanwhile; ``stop()`` then finishes the ones in flight.
        """
        node = self.node
        if node.draining or not node.ready or self.cache is None or self._membership is None:
            return
        await self._set_readiness(draining=True)  # out of rotation before anything else
        self.cache.refuse_loads = "this instance is shutting down"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        try:
            await asyncio.wait_for(self._membership.publish_instance(), 2.0)
        except (TimeoutError, MeshError) as exc:
            log.warning("could not publish shutting-down state: %s", exc)
        await self.scaling.evacuate(deadline)
        # Give the other instances' mirrors a moment to see the new copies.
        await asyncio.sleep(min(0.5, max(deadline - loop.time(), 0)))

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving (gRPC and REST), finish in-flight requests (up to ``grace``), release
        everything."""
        node = self.node
        if node.stopping:
            return
        await self._set_readiness(stopping=True)
        # Both transports stop accepting at once and finish what is in flight (up to grace).
        stops = [t.stop(grace) for t in (self._server, self._rest) if t is not None]
        await asyncio.gather(*stops)
        await self.supervisor.close()
        if self.router is not None:
            await self.router.close()
        if self.cache is not None:
            await self.cache.close()
        if self.runtime is not None:
            await self.runtime.close()
        if self._membership is not None:
            await self._membership.leave()
        if self.client is not None:
            await self.client.close()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.stop()
        if self.embedded_etcd is not None:
            await asyncio.to_thread(self.embedded_etcd.stop)
        log.info("instance %s stopped", node.instance_id)
