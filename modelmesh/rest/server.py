"""The HTTP server of the REST transport: uvicorn (httptools), inside the mesh's event loop.

No second process and no second loop: the server is started with uvicorn's
lower-level API (``startup`` / ``shutdown``) on the running loop, the one
grpc.aio serves on, so REST calls the same router and data plane directly. It
installs no signal handlers and configures no logging (the mesh owns both).
Chosen by measurement: ``benchmarks/http_servers.py``.
"""

from __future__ import annotations

import logging
import ssl

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from modelmesh.rest.app import RestApp

log = logging.getLogger(__name__)


class _TlsIdentityProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the verified client certificate in the scope
    (``scope["extensions"]["tls"]["peercert"]``, ``ssl.SSLSocket.getpeercert``'s dict)."""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        peer = self.transport.get_extra_info("peercert")
        self.scope["extensions"] = {"tls": {"peercert": peer}}  # type: ignore[typeddict-unknown-key]

#: Seconds an idle keep-alive connection stays open.
KEEP_ALIVE_S = 30.0


class RestServer:
    """``await start()`` (returns the bound port), ``await stop(grace)``."""

    def __init__(self, app: RestApp, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.host, self.port = host, port
        self._ssl = ssl_context
        self._config = uvicorn.Config(
            app, host=host, port=port, loop="none",
            http=_TlsIdentityProtocol if ssl_context is not None else "httptools",
            interface="asgi3",
            lifespan="off", log_config=None, access_log=False, proxy_headers=False,
            server_header=False, date_header=False, timeout_keep_alive=int(KEEP_ALIVE_S),
            backlog=2048,
        )
        self._server = uvicorn.Server(self._config)

    async def start(self) -> int:
        """Listen and serve; returns the bound port (``port`` 0: any free one)."""
        config, server = self._config, self._server
        config.load()
        if self._ssl is not None:  # ours: reloaded in place when the files rotate
            config.ssl = self._ssl
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup()
        except SystemExit:  # uvicorn's answer to a port it cannot bind (logged by it)
            raise RuntimeError(f"cannot listen on {self.host}:{self.port} (HTTP)") from None
        sockets = server.servers[0].sockets
        self.port = int(sockets[0].getsockname()[1])
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting, close idle connections, let in-flight requests finish (``grace`` s)."""
        server = self._server
        if not server.started:
            return
        self._config.timeout_graceful_shutdown = grace  # type: ignore[assignment]
        server.started = False
        await server.shutdown()
