"""gRPC server reflection (grpcio-reflection) for the serving port: grpcurl without .proto files.

The stock asyncio servicer over the default descriptor pool, where tritonclient's
``inference`` messages, our ``mmesh`` ones and the health service's all live.
One gap filled: the Python descriptor pool finds no file for a *method*'s full
name (``inference.GRPCInferenceService.ModelInfer``), which ``grpcurl describe``
asks for; such a name is answered with the file of its service.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha.reflection import aio as reflection_aio

#: The reflection service's own name (it lists itself too).
SERVICE_NAME: str = reflection.SERVICE_NAME


class _Reflection(reflection_aio.ReflectionServicer):
    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        answer = super()._file_containing_symbol(request, fully_qualified_name)
        if answer.HasField("error_response"):
            service, _, method = fully_qualified_name.rpartition(".")
            try:
                found = method in self._pool.FindServiceByName(service).methods_by_name
            except KeyError:
                found = False
            if found:
                return super()._file_containing_symbol(request, service)
        return answer


def enable(server: grpc.aio.Server, services: Iterable[str]) -> None:
    """Serve reflection for ``services`` and for itself on ``server``."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        _Reflection((*services, SERVICE_NAME)), server)
