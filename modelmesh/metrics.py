"""Prometheus metrics, named as KServe ModelMesh names them where the meaning matches.

Each instance owns its own ``CollectorRegistry`` so several instances (in tests)
can live in one process. The metrics port also answers the HTTP probes:
``/metrics`` (prometheus_client's own WSGI app: content negotiation, gzip),
``/live`` and ``/ready`` (200 or 503 with a small JSON body), 404 elsewhere.
It runs in its own thread, so it answers even while the event loop is busy,
and a wedged loop shows as a failing ``/live`` (``Node.liveness``).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

#: A probe: () -> (ok, reason when not ok). Called from the HTTP server's threads.
Probe = Callable[[], tuple[bool, str]]
_WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _always() -> tuple[bool, str]:
    return True, ""

_MS_BUCKETS = (0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


class Metrics:
    """The instance's metrics; the API, cache and data plane update them."""

    def __init__(self, per_model: bool = False) -> None:
        self.registry = r = CollectorRegistry()
        self._children: dict[tuple[str, ...], Any] = {}  # see labelled()
        #: ``--per-model-metrics`` (as ModelMesh's ``per_model_metrics``): a series per
        #: model id, dropped when the model is unregistered. Off by default: with tens of
        #: thousands of models the series would swamp Prometheus.
        self.model_request_ms: Histogram | None = Histogram(
            "modelmesh_model_request_milliseconds",
            "Time to serve an inference request on the instance holding the model, per model",
            ["modelid", "code"], buckets=_MS_BUCKETS, registry=r,
        ) if per_model else None
        self.api_request_ms = Histogram(
            "modelmesh_api_request_milliseconds",
            "Time to serve an external inference request, end to end (protocol: grpc or rest)",
            ["method", "code", "protocol"], buckets=_MS_BUCKETS, registry=r,
        )
        self.invoke_model_ms = Histogram(
            "modelmesh_invoke_model_milliseconds",
            "Time spent in the model runtime for one inference",
            ["method", "code"], buckets=_MS_BUCKETS, registry=r,
        )
        self.cache_miss_ms = Histogram(
            "modelmesh_cache_miss_milliseconds",
            "Time a request waited for its model to load",
            buckets=_MS_BUCKETS, registry=r,
        )
        self.load_model_ms = Histogram(
            "modelmesh_loadmodel_milliseconds",
            "Time to load a model into memory",
            buckets=_MS_BUCKETS, registry=r,
        )
        self.load_failures = Counter(
            "modelmesh_loadmodel_failure", "Model loads that failed", registry=r
        )
        self.unloads = Counter(
            "modelmesh_unloadmodel", "Models unloaded (evicted or unregistered)", ["reason"],
            registry=r,
        )
        self.model_size_bytes = Histogram(
            "modelmesh_loaded_model_size_bytes", "Measured size of loaded models",
            buckets=(1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10), registry=r,
        )
        self.capacity_bytes = Gauge(
            "modelmesh_instance_capacity_bytes", "Model memory capacity of this instance",
            registry=r,
        )
        self.used_bytes = Gauge(
            "modelmesh_instance_used_bytes", "Model memory in use on this instance", registry=r
        )
        self.models_total = Gauge(
            "modelmesh_instance_models_total", "Models loaded on this instance", registry=r
        )
        self.lru_age_seconds = Gauge(
            "modelmesh_instance_lru_age_seconds",
            "Seconds since the least recently used loaded model was used", registry=r,
        )
        self.registered_models = Gauge(
            "modelmesh_models_with_registration_total", "Models registered in the mesh",
            registry=r,
        )
        self.forwarded = Counter(
            "modelmesh_forwarded_requests", "Requests this instance forwarded to another",
            ["code"], registry=r,
        )
        self.forward_batches = Counter(
            "modelmesh_forward_batches",
            "Calls that carried several forwarded requests for one model to one peer",
            registry=r,
        )
        self.forwarded_in_batches = Counter(
            "modelmesh_forwarded_in_batches",
            "Forwarded requests that went to their peer in a batch with others", registry=r,
        )
        self.forward_ms = Histogram(
            "modelmesh_forward_request_milliseconds",
            "Time to forward a request to another instance and get its answer",
            buckets=_MS_BUCKETS, registry=r,
        )
        self.copy_changes = Counter(
            "modelmesh_copy_changes", "Copies added or removed by periodic rebalancing",
            ["action"], registry=r,
        )
        self.batched_requests = Counter(
            "modelmesh_batched_requests",
            "Requests served by a prediction merged with other requests' (modelmesh.batching)",
            registry=r,
        )
        self.batches = Counter(
            "modelmesh_batches", "Predictions that served several requests at once", registry=r,
        )
        self.request_bytes = Histogram(
            "modelmesh_request_size_bytes",
            "Inference request payload size (protocol: grpc or rest)",
            ["protocol"], buckets=(1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8), registry=r,
        )
        # Storage: models pulled from object storage, and the local disk cache below memory.
        self.storage_downloads = Counter(
            "modelmesh_storage_downloads", "Models downloaded from storage (all their files)",
            ["scheme"], registry=r,
        )
        self.storage_download_failures = Counter(
            "modelmesh_storage_download_failures", "Model downloads from storage that failed",
            ["scheme"], registry=r,
        )
        self.storage_downloaded_bytes = Counter(
            "modelmesh_storage_downloaded_bytes", "Bytes downloaded from storage", registry=r,
        )
        self.storage_download_seconds = Histogram(
            "modelmesh_storage_download_seconds", "Time to download one model from storage",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r,
        )
        self.disk_cache_hits = Counter(
            "modelmesh_disk_cache_hits", "Remote model loads served from the local disk cache",
            registry=r,
        )
        self.disk_cache_misses = Counter(
            "modelmesh_disk_cache_misses", "Remote model loads that had to download", registry=r,
        )
        self.disk_cache_used_bytes = Gauge(
            "modelmesh_disk_cache_used_bytes", "Bytes of models in the local disk cache",
            registry=r,
        )
        self.disk_cache_capacity_bytes = Gauge(
            "modelmesh_disk_cache_capacity_bytes", "Byte budget of the local disk cache",
            registry=r,
        )
        self.disk_cache_evictions = Gauge(
            "modelmesh_disk_cache_evictions",
            "Models evicted from the local disk cache since start", registry=r,
        )

    def labelled(self, name: str, *labels: str) -> Any:
        """The child of metric ``name`` (an attribute) for ``labels``, looked up once: the
        request path calls this per request, and prometheus' ``labels()`` (validation,
        a lock) costs more than the observation itself. Only for metrics whose series
        are never removed (not ``model_request_ms``); a series still appears on first use.
        """
        key = (name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = getattr(self, name).labels(*labels)
        return child

    def observe_model(self, model_id: str, code: str, ms: float) -> None:
        """One request served here for ``model_id`` (only with per-model metrics)."""
        if self.model_request_ms is not None:
            self.model_request_ms.labels(model_id, code).observe(ms)

    def forget_model(self, model_id: str) -> None:
        """Drop an unregistered model's series (only with per-model metrics)."""
        hist = self.model_request_ms
        if hist is None:
            return
        for code in ("OK", "ERROR"):
            try:
                hist.remove(model_id, code)
            except KeyError:
                pass

    def serve(self, port: int, host: str = "0.0.0.0", live: Probe = _always,
              ready: Probe = _always) -> int:
        """Start the metrics and probe HTTP server in a daemon thread; returns its port."""
        family, addr = _family(host, port)
        server_class = type("ProbeServer", (ThreadingWSGIServer,), {"address_family": family})
        app = probe_app(make_wsgi_app(self.registry), live, ready)
        server: WSGIServer = make_server(addr, port, app, server_class,
                                         handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="mm-metrics-http", daemon=True).start()
        self._server = server
        return int(server.server_port)

    def stop(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()


def probe_app(metrics_app: _WSGIApp, live: Probe, ready: Probe) -> _WSGIApp:
    """The metrics port's WSGI app: /metrics, /live, /ready (GET and HEAD); 404 elsewhere."""
    probes = {"/live": ("live", live), "/ready": ("ready", ready)}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return _answer(start_response, "405 Method Not Allowed",
                           [("Allow", "GET, HEAD")], b"", head)
        if path == "/metrics":
            if not head:
                return metrics_app(environ, start_response)
            seen: dict[str, Any] = {}

            def keep(status: str, headers: list[tuple[str, str]], *_: Any) -> None:
                seen.update(status=status, headers=headers)

            body = b"".join(metrics_app({**environ, "REQUEST_METHOD": "GET"}, keep))
            return _answer(start_response, seen["status"], seen["headers"], body, head)
        if path in probes:
            key, probe = probes[path]
            ok, reason = probe()
            doc: dict[str, Any] = {key: ok} if ok else {key: ok, "reason": reason}
            return _answer(start_response, "200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json")],
                           json.dumps(doc).encode() + b"\n", head)
        return _answer(start_response, "404 Not Found", [("Content-Type", "text/plain")],
                       b"not found: use /metrics, /live or /ready\n", head)

    return app


def _answer(start_response: Callable[..., Any], status: str, headers: list[tuple[str, str]],
            body: bytes, head: bool) -> list[bytes]:
    """Answer with ``body``; to HEAD, the same headers (its length too) and no body."""
    headers = [h for h in headers if h[0].lower() != "content-length"]
    start_response(status, [*headers, ("Content-Length", str(len(body)))])
    return [b""] if head else [body]


def _family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The address family for ``host`` (IPv6 hosts too), as prometheus_client picks it."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = info[0]
    return family, str(sockaddr[0])


class _QuietHandler(WSGIRequestHandler):
    """No log line per request (probes come every few seconds)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass
