"""Pooled gRPC channels to the other instances, and raw-bytes calls over them.

One channel per peer endpoint, created on first use and reused by every request
(a channel multiplexes any number of concurrent calls over one HTTP/2
connection). Calls take and return serialized messages: a forwarded request is
never parsed on the way through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


#: How long a channel to a peer that left is kept for the calls still on it (seconds).
CLOSE_GRACE_S = 30.0


@dataclass(frozen=True)
class PeerSecurity:
    """TLS towards peers: credentials (made per new channel, so a rotated certificate is
    used by the next one) and the name peers' certificates must carry."""

    credentials: Callable[[], grpc.ChannelCredentials]
    server_name: str


class PeerPool:
    def __init__(self, max_message_bytes: int, security: PeerSecurity | None = None) -> None:
        self.security = security
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
                sec = self.security
                if sec is None:
                    channel = grpc.aio.insecure_channel(endpoint, options=self._options)
                else:  # peers are addressed by IP: verify the mesh's own name instead
                    channel = grpc.aio.secure_channel(
                        endpoint, sec.credentials(),
                        options=[*self._options, ("grpc.ssl_target_name_override",
                                                  sec.server_name)])
                self._channels[endpoint] = channel
            call = channel.unary_unary(method, request_serializer=None,
                                       response_deserializer=None)
            self._calls[key] = call
        return call

    async def call(self, endpoint: str, method: str, request: bytes, metadata: Metadata,
                   timeout: float | None) -> bytes:
        """Send ``request`` bytes to ``method`` on the peer; returns the response bytes.

        Raises ``PeerError`` for any non-OK status, and for a call cancelled under
        this request by its channel closing (``reached`` False: try another copy).
        """
        try:
            return await self._call(endpoint, method)(request, metadata=metadata,
                                                      timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            trailing = exc.trailing_metadata() or ()
            reached = any(k == INSTANCE for k, _ in trailing)
            raise PeerError(Code[exc.code().name], exc.details() or "", trailing,
                            reached) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this request itself is being cancelled
            # grpc.aio raises CancelledError in the caller when the *call* was cancelled
            # locally (its channel closed): not the client's doing, so not its answer.
            raise PeerError(Code.CANCELLED, f"the channel to {endpoint} closed during the call",
                            (), reached=False) from None
        except Exception as exc:  # grpc's ExecuteBatchError has no public class
            # The call could not even be sent (metadata gRPC refuses): our mistake, and
            # another peer would refuse it too, so it is not a reason to try elsewhere.
            raise PeerError(Code.INTERNAL, f"could not send {method} to {endpoint}: "
                            f"{type(exc).__name__}: {exc}", (), reached=True) from None

    async def forget(self, endpoint: str, grace: float | None = CLOSE_GRACE_S) -> None:
        """Close the channel to a peer that left the mesh.

        New calls get a new channel at once; the calls already on this one have
        ``grace`` seconds to finish (closing a grpc.aio channel cancels its calls,
        and a peer's record can vanish while its last answers are on the way).
        """
        channel = self._channels.pop(endpoint, None)
        for key in [k for k in self._calls if k[0] == endpoint]:
            del self._calls[key]
        if channel is not None:
            try:
                await channel.close(grace)
            except asyncio.CancelledError:  # shutting down: do not wait for the calls
                await channel.close()
                raise

    def endpoints(self) -> list[str]:
        return list(self._channels)

    async def close(self, grace: float | None = None) -> None:
        for endpoint in list(self._channels):
            await self.forget(endpoint, grace)
