"""Pooled gRPC channels to the other instances, and raw-bytes calls over them.

One channel per peer endpoint, created on first use and reused by every request
(a channel multiplexes any number of concurrent calls over one HTTP/2
connection). Calls take and return serialized messages: a forwarded request is
never parsed on the way through.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from modelmesh.errors import Code
from modelmesh.headers import INSTANCE

log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str | bytes]]


class PeerError(Exception):
    """A peer answered a forwarded call with a non-OK status (passed on to the client)."""

    def __init__(self, code: Code, details: str, trailing: Metadata,
                 reached: bool) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing = dict((k, v if isinstance(v, str) else v.decode())
                             for k, v in trailing or ())
        #: False when the peer's mesh code never answered (connection refused, reset):
        #: the peer is down or unreachable, so another instance should be tried.
        self.reached = reached


class PeerPool:
    def __init__(self, max_message_bytes: int) -> None:
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.enable_retries", 0),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._calls: dict[tuple[str, str], grpc.aio.UnaryUnaryMultiCallable] = {}

    def _call(self, endpoint: str, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        key = (endpoint, method)
        call = self._calls.get(key)
        if call is None:
            channel = self._channels.get(endpoint)
            if channel is None:
                channel = grpc.aio.insecure_channel(endpoint, options=self._options)
                self._channels[endpoint] = channel
            call = channel.unary_unary(method, request_serializer=None,
                                       response_deserializer=None)
            self._calls[key] = call
        return call

    async def call(self, endpoint: str, method: str, request: bytes, metadata: Metadata,
                   timeout: float | None) -> bytes:
        """Send ``request`` bytes to ``method`` on the peer; returns the response bytes.

        Raises ``PeerError`` for any non-OK status.
        """
        try:
            return await self._call(endpoint, method)(request, metadata=metadata,
                                                      timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            trailing = exc.trailing_metadata() or ()
            reached = any(k == INSTANCE for k, _ in trailing)
            raise PeerError(Code[exc.code().name], exc.details() or "", trailing,
                            reached) from None

    async def forget(self, endpoint: str) -> None:
        """Close the channel to a peer that left the mesh."""
        channel = self._channels.pop(endpoint, None)
        for key in [k for k in self._calls if k[0] == endpoint]:
            del self._calls[key]
        if channel is not None:
            await channel.close()

    def endpoints(self) -> list[str]:
        return list(self._channels)

    async def close(self) -> None:
        for endpoint in list(self._channels):
            await self.forget(endpoint)
