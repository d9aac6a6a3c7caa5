"""Prometheus metrics, named as KServe ModelMesh names them where the meaning matches.

Each instance owns its own ``CollectorRegistry`` so several instances (in tests)
can live in one process.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

_MS_BUCKETS = (0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


class Metrics:
    """The instance's metrics; the API, cache and data plane update them."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.api_request_ms = Histogram(
            "modelmesh_api_request_milliseconds",
            "Time to serve an external inference request, end to end",
            ["method", "code"], buckets=_MS_BUCKETS, registry=r,
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
        self.request_bytes = Histogram(
            "modelmesh_request_size_bytes", "Inference request payload size",
            buckets=(1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8), registry=r,
        )

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; returns its port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def stop(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
