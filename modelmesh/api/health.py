"""The standard gRPC health service (``grpc.health.v1.Health``) on the serving port.

grpcio-health-checking's asyncio servicer, so Kubernetes gRPC probes,
``grpc-health-probe`` and load balancers can tell whether to send traffic here.
The overall status (service ``""``) and each served service's report the same:
SERVING while the instance is ready, NOT_SERVING while it starts, drains or
stops. A name that is not served is NOT_FOUND (Check) or SERVICE_UNKNOWN
(Watch), as the protocol says. The composition root decides when the state
changes (``MeshInstance._set_readiness``); this module only reports it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

#: The health service's own name (it is on the port too; reflection lists it).
SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Servicer(health_aio.HealthServicer):
    """The stock asyncio servicer with Watch fixed for several watchers of one service.

    Upstream (1.81.1) drops a service's condition when any one of its Watch
    streams ends, so the streams still open never hear of a change again. Here
    the condition lives while someone watches.
    """

    def __init__(self) -> None:
        super().__init__()
        self._watching: Counter[str] = Counter()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:  # noqa: N802
        name = request.service
        condition = self._server_watchers[name]
        self._watching[name] += 1
        last = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(
                        name, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    await condition.wait()
        finally:
            self._watching[name] -= 1
            if not self._watching[name]:
                del self._watching[name]
                self._server_watchers.pop(name, None)


class HealthService:
    """The health statuses of ``""`` and of each name in ``services``: all NOT_SERVING at first."""

    def __init__(self, services: Iterable[str]) -> None:
        self.services: tuple[str, ...] = ("", *services)
        self._servicer = _Servicer()

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serve ``grpc.health.v1.Health`` on ``server``."""
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    async def set_serving(self, serving: bool) -> None:
        """Report every service SERVING or NOT_SERVING; Watch streams get the change."""
        status = SERVING if serving else NOT_SERVING
        for name in self.services:
            await self._servicer.set(name, status)
