"""Turning exceptions into gRPC statuses, in one place for every servicer."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from modelmesh.errors import MeshError, Rejected, status_for

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def grpc_errors(method: str, histogram: Any = None) -> Callable[[F], F]:
    """Decorate an async servicer method: map errors to statuses, time the call.

    ``histogram`` is an attribute name on ``self.metrics`` with labels
    (method, code), or None.
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = "OK"
            try:
                return await fn(self, request, context)
            except MeshError as exc:
                code = exc.code.name
                await context.abort(exc.code, exc.message,
                                    trailing_metadata=_trailer(self, isinstance(exc, Rejected)))
            except grpc.aio.AbortError:
                code = "ABORTED_BY_HANDLER"
                raise
            except Exception as exc:  # last resort: never crash the server on one request
                status, message = status_for(exc)
                code = status.name
                log.exception("%s failed unexpectedly", method)
                await context.abort(status, message, trailing_metadata=_trailer(self, False))
            finally:
                if histogram is not None:
                    getattr(self.metrics, histogram).labels(method, code).observe(
                        (time.perf_counter() - start) * 1000
                    )

        return handler  # type: ignore[return-value]

    return wrap


def _trailer(servicer: Any, reject: bool) -> tuple[tuple[str, str], ...]:
    """Trailing metadata on errors: ``mm-instance`` tells a forwarding instance that the
    error is this instance's answer (not a dead connection); ``mm-reject`` that it should
    try another instance."""
    instance = getattr(servicer, "instance", None)
    md: tuple[tuple[str, str], ...] = (("mm-instance", getattr(instance, "instance_id", "")),)
    return md + (("mm-reject", "1"),) if reject else md


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str:
    return metadata_values(context, key)[0]


def metadata_values(context: grpc.aio.ServicerContext, *keys: str) -> list[str]:
    """The values of ``keys`` in the call's metadata ("" where absent), in one pass."""
    found = dict.fromkeys(keys, "")
    for k, v in context.invocation_metadata() or ():
        if k in found:
            found[k] = v if isinstance(v, str) else v.decode()
    return [found[k] for k in keys]
