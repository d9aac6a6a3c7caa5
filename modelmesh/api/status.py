"""THE table: every domain error to its gRPC status and HTTP code, and the gRPC glue.

Transports call ``status_of`` (or the ``grpc_errors`` decorator); nothing else
in the mesh knows a status code. An error that is not a ``MeshError`` is a bug
of ours: INTERNAL / 500, logged with its traceback (at most once a minute per
method and exception type, ``log_unexpected``).
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from modelmesh.codec import clip
from modelmesh.errors import (
    AlreadyExists,
    CapacityExceeded,
    Code,
    InvalidArgument,
    MeshError,
    ModelLoadFailed,
    ModelNotFound,
    PermissionDenied,
    PreconditionFailed,
    Rejected,
    RequestTooLarge,
    StorageError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UpstreamError,
)
from modelmesh.headers import INSTANCE, REJECT

log = logging.getLogger(__name__)

#: Domain error -> status code, most specific class first (the first match wins).
CODES: tuple[tuple[type[MeshError], Code], ...] = (
    (RequestTooLarge, Code.RESOURCE_EXHAUSTED),  # as gRPC refuses an oversized message
    (InvalidArgument, Code.INVALID_ARGUMENT),
    (ModelNotFound, Code.NOT_FOUND),  # also VModelNotFound, NotLoaded
    (AlreadyExists, Code.ALREADY_EXISTS),
    (PreconditionFailed, Code.FAILED_PRECONDITION),
    (StorageError, Code.FAILED_PRECONDITION),
    (ModelLoadFailed, Code.INTERNAL),
    (CapacityExceeded, Code.RESOURCE_EXHAUSTED),
    (Unavailable, Code.UNAVAILABLE),  # also Rejected
    (Unimplemented, Code.UNIMPLEMENTED),
    (Unauthenticated, Code.UNAUTHENTICATED),
    (PermissionDenied, Code.PERMISSION_DENIED),
)

#: Status code -> HTTP status, as gRPC-HTTP gateways map them.
HTTP: dict[Code, int] = {
    Code.OK: 200, Code.CANCELLED: 499, Code.UNKNOWN: 500, Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504, Code.NOT_FOUND: 404, Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403, Code.RESOURCE_EXHAUSTED: 429, Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409, Code.OUT_OF_RANGE: 400, Code.UNIMPLEMENTED: 501, Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503, Code.DATA_LOSS: 500, Code.UNAUTHENTICATED: 401,
}

#: Domain errors whose HTTP code is more precise than their status code's (first match wins):
#: an oversized body is 413, not 429 (that is load shedding); a model that failed to load is
#: 503 (the client may retry once it is fixed or loads elsewhere), not 500 (a bug of ours).
HTTP_OVERRIDES: tuple[tuple[type[MeshError], int], ...] = (
    (RequestTooLarge, 413),
    (ModelLoadFailed, 503),
)

_GRPC = {c: grpc.StatusCode[c.name] for c in Code}
#: How much of an unexpected exception's text an INTERNAL answer repeats.
_SHOWN_CHARS = 200
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
    # The text may repeat a client's input: keep the message short.
    return Code.INTERNAL, f"internal error: {type(exc).__name__}: {clip(str(exc), _SHOWN_CHARS)}"


def grpc_code(code: Code) -> grpc.StatusCode:
    return _GRPC[code]


def from_grpc(code: grpc.StatusCode) -> Code:
    return _FROM_GRPC.get(code, Code.UNKNOWN)


def http_status(exc: BaseException) -> int:
    """The HTTP code for ``exc``: its status code's, or a more precise one (``HTTP_OVERRIDES``)."""
    for cls, http in HTTP_OVERRIDES:
        if isinstance(exc, cls):
            return http
    return HTTP[code_of(exc)]


def http_answer(exc: BaseException) -> tuple[int, str]:
    """(HTTP code, message) for any exception, as the REST transport answers it."""
    return http_status(exc), status_of(exc)[1]


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def grpc_errors(method: str, histogram: str | None = None) -> Callable[[F], F]:
    """Decorate an async unary servicer method: map errors to statuses, time the call.

    ``histogram`` names a metric on ``self.metrics`` with labels (method, code, protocol).
    Error answers carry ``mm-instance`` (the id of ``self.node``, where the
    servicer has one) so a forwarding instance knows the answer is this
    instance's and not a dead connection's, and ``mm-reject`` when the instance
    refused the work (draining) so the forwarder tries another.

    An error is answered with ``set_code`` / ``set_details`` and no response
    (grpc.aio sends no response on a non-OK call) rather than by raising
    ``context.abort``'s exception, and the error's frames are freed first
    (``drop_frames``): kept, they held each failed call's request and what was
    decoded of it (measured, issue 11 item 1: 20 requests with a 15 MiB BYTES
    flood took a server from 62 MiB to 1 GiB; with the frames freed, abort or
    not, 100 more left it within 10-25 MiB).
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = "OK"
            try:
                try:
                    return await fn(self, request, context)
                except MeshError as exc:
                    status, message = status_of(exc)
                    reject = isinstance(exc, Rejected)
                    drop_frames(exc)
                except grpc.aio.AbortError:
                    code = "ABORTED_BY_HANDLER"
                    raise
                except Exception as exc:  # last resort: never crash the server on one request
                    status, message = status_of(exc)
                    reject = False
                    log_unexpected(method, exc)
                    drop_frames(exc)
                del request  # nothing here keeps the request past its answer
                code = status.name
                answer_error(context, status, message, _trailer(self, reject))
                return None
            finally:
                if histogram is not None:
                    self.metrics.labelled(histogram, method, code, "grpc").observe(
                        (time.perf_counter() - start) * 1000
                    )

        return handler  # type: ignore[return-value]

    return wrap


def answer_error(context: grpc.aio.ServicerContext, code: Code, message: str,
                 trailing: tuple[tuple[str, str], ...]) -> None:
    """Make a unary call's answer an error; the handler then returns None."""
    context.set_code(_GRPC[code])
    context.set_details(message)
    context.set_trailing_metadata(trailing)


def drop_frames(exc: BaseException) -> None:
    """Free the frames of ``exc`` and of the exceptions chained to it (after logging it).

    A traceback holds every frame it passed through, and a frame holds its
    locals (a request, its decoded tensors). Whatever keeps the exception or
    its traceback a little longer (a log record, a reference cycle, a future)
    would keep them all; so the finished frames' locals are cleared and the
    tracebacks forgotten. A logged traceback still formats (it needs no locals).
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)  # skips frames still running
            e.__traceback__ = None
        todo += (e.__cause__, e.__context__)


#: A full traceback for an unexpected error at most once per this many seconds per
#: (method, exception type); the others are counted and the count is logged with the
#: next traceback: a client that can trigger one must not be able to flood the log.
TRACEBACK_EVERY_S = 60.0


class _TracebackLimiter:
    def __init__(self, every_s: float = TRACEBACK_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._skipped: dict[tuple[str, str], int] = {}

    def log(self, method: str, exc: BaseException) -> None:
        key = (method, f"{type(exc).__module__}.{type(exc).__qualname__}")
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._skipped.pop(key, 0)
        also = (f" ({skipped} more {key[1]} in {method} since the last traceback)"
                if skipped else "")
        log.error("%s failed unexpectedly%s", method, also, exc_info=exc)


_limiter = _TracebackLimiter()


def log_unexpected(method: str, exc: BaseException) -> None:
    """Log an error that is not a ``MeshError`` (a bug of ours): rate-limited tracebacks."""
    _limiter.log(method, exc)


def trailing_metadata(instance_id: str, reject: bool = False) -> tuple[tuple[str, str], ...]:
    """Trailing metadata on every error an instance returns (tells a forwarder it was reached)."""
    md: tuple[tuple[str, str], ...] = ((INSTANCE, instance_id),)
    return md + ((REJECT, "1"),) if reject else md


def _trailer(servicer: Any, reject: bool) -> tuple[tuple[str, str], ...]:
    node = getattr(servicer, "node", None)
    return trailing_metadata(node.instance_id if node is not None else "", reject)
