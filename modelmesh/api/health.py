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

from collections.abc import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

#: The health service's own name (it is on the port too; reflection lists it).
SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthService:
    """The health statuses of ``""`` and of each name in ``services``: all NOT_SERVING at first."""

    def __init__(self, services: Iterable[str]) -> None:
        self.services: tuple[str, ...] = ("", *services)
        self._servicer = health_aio.HealthServicer()

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serve ``grpc.health.v1.Health`` on ``server``."""
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    async def set_serving(self, serving: bool) -> None:
        """Report every service SERVING or NOT_SERVING; Watch streams get the change."""
        status = SERVING if serving else NOT_SERVING
        for name in self.services:
            await self._servicer.set(name, status)
