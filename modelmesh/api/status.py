"""THE table: every domain error to its gRPC status and HTTP code, and the gRPC glue.

Transports call ``status_of`` (or the ``grpc_errors`` decorator); nothing else
in the mesh knows a status code. An error that is not a ``MeshError`` is a bug
of ours: INTERNAL / 500, logged with its traceback.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from modelmesh.errors import (
    AlreadyExists,
    CapacityExceeded,
    Code,
    InvalidArgument,
    MeshError,
    ModelLoadFailed,
    ModelNotFound,
    PreconditionFailed,
    Rejected,
    StorageError,
    Unavailable,
    Unimplemented,
    UpstreamError,
)
from modelmesh.headers import INSTANCE, REJECT

log = logging.getLogger(__name__)

#: Domain error -> status code, most specific class first (the first match wins).
CODES: tuple[tuple[type[MeshError], Code], ...] = (
    (InvalidArgument, Code.INVALID_ARGUMENT),
    (ModelNotFound, Code.NOT_FOUND),  # also VModelNotFound, NotLoaded
    (AlreadyExists, Code.ALREADY_EXISTS),
    (PreconditionFailed, Code.FAILED_PRECONDITION),
    (StorageError, Code.FAILED_PRECONDITION),
    (ModelLoadFailed, Code.INTERNAL),
    (CapacityExceeded, Code.RESOURCE_EXHAUSTED),
    (Unavailable, Code.UNAVAILABLE),  # also Rejected
    (Unimplemented, Code.UNIMPLEMENTED),
)

#: Status code -> HTTP status, as gRPC-HTTP gateways map them.
HTTP: dict[Code, int] = {
    Code.OK: 200, Code.CANCELLED: 499, Code.UNKNOWN: 500, Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504, Code.NOT_FOUND: 404, Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403, Code.RESOURCE_EXHAUSTED: 429, Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409, Code.OUT_OF_RANGE: 400, Code.UNIMPLEMENTED: 501, Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503, Code.DATA_LOSS: 500, Code.UNAUTHENTICATED: 401,
}

_GRPC = {c: grpc.StatusCode[c.name] for c in Code}
_FROM_GRPC = {g: c for c, g in _GRPC.items()}


def code_of(exc: BaseException) -> Code:
    """The status code for ``exc`` (INTERNAL for anything that is not a domain error)."""
    if isinstance(exc, UpstreamError):
        return exc.code
    for cls, code in CODES:
        if isinstance(exc, cls):
            return code
    return Code.INTERNAL


def status_of(exc: BaseException) -> tuple[Code, str]:
    """(code, message) for any exception; unknown ones become INTERNAL."""
    if isinstance(exc, MeshError):
        return code_of(exc), exc.message
    return Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def grpc_code(code: Code) -> grpc.StatusCode:
    return _GRPC[code]


def from_grpc(code: grpc.StatusCode) -> Code:
    return _FROM_GRPC.get(code, Code.UNKNOWN)


def http_status(exc: BaseException) -> int:
    return HTTP[status_of(exc)[0]]


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def grpc_errors(method: str, histogram: str | None = None) -> Callable[[F], F]:
    """Decorate an async servicer method: map errors to statuses, time the call.

    ``histogram`` names a metric on ``self.metrics`` with labels (method, code).
    Error answers carry ``mm-instance`` (the id of ``self.node``, where the
    servicer has one) so a forwarding instance knows the answer is this
    instance's and not a dead connection's, and ``mm-reject`` when the instance
    refused the work (draining) so the forwarder tries another.
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = "OK"
            try:
                return await fn(self, request, context)
            except MeshError as exc:
                status, message = status_of(exc)
                code = status.name
                await context.abort(_GRPC[status], message,
                                    trailing_metadata=_trailer(self, isinstance(exc, Rejected)))
            except grpc.aio.AbortError:
                code = "ABORTED_BY_HANDLER"
                raise
            except Exception as exc:  # last resort: never crash the server on one request
                status, message = status_of(exc)
                code = status.name
                log.exception("%s failed unexpectedly", method)
                await context.abort(_GRPC[status], message, trailing_metadata=_trailer(self, False))
            finally:
                if histogram is not None:
                    getattr(self.metrics, histogram).labels(method, code).observe(
                        (time.perf_counter() - start) * 1000
                    )

        return handler  # type: ignore[return-value]

    return wrap


def trailing_metadata(instance_id: str, reject: bool = False) -> tuple[tuple[str, str], ...]:
    """Trailing metadata on every error an instance returns (tells a forwarder it was reached)."""
    md: tuple[tuple[str, str], ...] = ((INSTANCE, instance_id),)
    return md + ((REJECT, "1"),) if reject else md


def _trailer(servicer: Any, reject: bool) -> tuple[tuple[str, str], ...]:
    node = getattr(servicer, "node", None)
    return trailing_metadata(node.instance_id if node is not None else "", reject)
