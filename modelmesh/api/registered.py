"""Which gRPC methods a server registers with the core ("registered methods").

A registered method is matched by gRPC's core, with no lookup in Python, but grpc.aio
keeps a pending call for each one and, for every call that arrives, waits on all of
them again: with every service's methods registered (34 on a mesh instance) that
wait cost about a tenth of a small model's request. So only the request path's own
methods are registered; every other method is served by the generic handlers that
generated ``add_*Servicer_to_server`` functions add alongside.
"""

from __future__ import annotations

from typing import Any

import grpc

#: The methods registered with the core (any service that has them: V2 inference).
HOT_METHODS = frozenset({"ModelInfer", "ModelStreamInfer"})


class HotMethodsOnly:
    """``server`` as service set-up code sees it: generic handlers pass through, and of
    registered method handlers only those of ``HOT_METHODS``."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        hot = {name: h for name, h in handlers.items() if name in HOT_METHODS}
        if hot:
            self._server.add_registered_method_handlers(service, hot)
