"""The gRPC ingress: every call's caller decided once, before any servicer runs.

A ``grpc.aio`` server interceptor wraps each method handler: the caller is
recognised from its ``authorization: Bearer`` metadata and its verified client
certificate (``modelmesh.security.auth``), the method's role is required, and
whether the call may use the mesh's internal headers is set for the servicers
(``headers.INTERNAL_HEADERS_TRUSTED``). A refused call is answered
UNAUTHENTICATED or PERMISSION_DENIED from the one status table, without running
the servicer and without keeping the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from modelmesh.api.status import answer_error, status_of
from modelmesh.errors import MeshError
from modelmesh.headers import INTERNAL_HEADERS_TRUSTED
from modelmesh.security.auth import Authorizer, role_of
from modelmesh.security.tls import Identity


def call_identity(context: grpc.aio.ServicerContext) -> Identity | None:
    """The verified client certificate's identity (None without one)."""
    auth = context.auth_context() or {}
    cns = auth.get("x509_common_name") or []
    sans = auth.get("x509_subject_alternative_name") or []
    if not cns and not sans:
        return None
    return Identity(cns[0].decode(errors="replace") if cns else "",
                    frozenset(s.decode(errors="replace") for s in sans))


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == "authorization":
            return v if isinstance(v, str) else v.decode(errors="replace")
    return None


class Ingress(grpc.aio.ServerInterceptor):
    """Authorizes every call. ``tls``: the port uses mutual TLS, so a caller's verified
    certificate can tell a peer from a client (with server-only TLS, or none, nobody
    can be told apart and the internal headers are honoured from every caller)."""

    def __init__(self, authorizer: Authorizer, tls: bool) -> None:
        self.authorizer = authorizer
        self.tls = tls
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def _admit(self, role: str | None, operation: str,
               context: grpc.aio.ServicerContext) -> None:
        """Decide the call (raises Unauthenticated / PermissionDenied) and mark its trust."""
        identity = call_identity(context) if self.tls else None
        if role is None:  # probes, discovery, and carriers (their calls are admitted one by one)
            INTERNAL_HEADERS_TRUSTED.set(not self.tls or self.authorizer.is_peer(identity))
            return
        principal = self.authorizer.principal(_authorization(context), identity)
        # Internal headers: without TLS every caller is trusted (README: Security).
        INTERNAL_HEADERS_TRUSTED.set(principal.peer or not self.tls)
        if not principal.peer:
            self.authorizer.require(principal, role, operation)

    def admit_forwarded(self, context: grpc.aio.ServicerContext) -> None:
        """Admit one ModelInfer call carried by a ``ForwardInferBatch`` call, as it would
        be admitted on its own (``context``: that call's metadata, the batch's connection)."""
        self._admit("infer", "ModelInfer", context)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        # A method's handler is the same object on every call: wrap it once.
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, self._wrap(method, handler))
        return cached[1]

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` behind the admission check: one wrapper for unary responses, one
        for streamed ones, whatever the request side is."""
        admit = self._admit
        service, _, operation = method.lstrip("/").rpartition("/")
        role = role_of(service, operation)  # decided once per method, not per call
        attr, make = next((a, m) for a, m in _KINDS if getattr(handler, a) is not None)
        inner = getattr(handler, attr)

        def refused(context: grpc.aio.ServicerContext) -> bool:
            try:
                admit(role, operation, context)
            except MeshError as exc:
                code, message = status_of(exc)
                answer_error(context, code, message, ())
                return True
            return False

        if handler.response_streaming:
            async def streamed(request: Any, context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[Any]:
                if refused(context):
                    return
                async for item in _iterate(inner(request, context)):
                    yield item

            behaviour: Callable[..., Any] = streamed
        else:
            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if refused(context):
                    return None
                return await inner(request, context)

            behaviour = unary
        return make(behaviour, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


#: (handler attribute, constructor) of the four kinds of gRPC method.
_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


async def _iterate(result: Any) -> AsyncIterator[Any]:
    """A streaming handler's responses, whether it is an async generator or a coroutine
    (a handler may also write with ``context.write`` and return None)."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        value = await result
        if value is not None:
            yield value
