"""This instance's identity and state, owned by the composition root.

Components that need to know who they are, whether the instance is draining,
or how many calls are in flight get the ``Node`` (never the instance); those
that start background work get a ``Spawn`` (the root's supervisor).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

#: How often the event loop stamps ``Node.heartbeat`` (``heartbeat()``, under the supervisor).
HEARTBEAT_INTERVAL_S = 1.0
#: Liveness (``GET /live``) fails once the last heartbeat is older than this: the event
#: loop is wedged (a blocking call, a deadlock) and the process cannot serve, so a
#: Kubernetes liveness probe should restart it. Generous, so that a busy machine
#: (a model load holding the GIL for a moment) is not mistaken for a wedged one.
LIVENESS_STALE_S = 10.0


class Spawn(Protocol):
    """Start a background task that the instance's supervisor owns (cancelled on stop)."""

    def __call__(self, coro: Coroutine[Any, Any, Any], name: str = "") -> asyncio.Task[Any]: ...


@dataclass(slots=True)
class Node:
    """Who this instance is and what state it is in (mutable; the root sets it)."""

    instance_id: str = ""
    #: The etcd lease its instance record and copies are bound to (membership renews it).
    lease: int = 0
    #: Requests it runs at once (inference threads).
    concurrency: int = 1
    #: Started and serving (ServerReady).
    ready: bool = False
    #: SIGTERM arrived: it loads nothing new and hands its models to others.
    draining: bool = False
    #: stop() has begun.
    stopping: bool = False
    #: Calls in flight from here, by the instance serving them (this one included).
    in_flight: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: ``time.monotonic()`` of the event loop's last beat (0: not beating yet).
    heartbeat: float = 0.0

    def readiness(self) -> tuple[bool, str]:
        """(ready for traffic, why not): what ServerReady, gRPC health and /ready say.

        Ready only between the end of start-up and the start of a drain or stop.
        """
        if self.stopping:
            return False, "stopping"
        if self.draining:
            return False, "draining"
        if not self.ready:
            return False, "starting"
        return True, ""

    def liveness(self, now: float, stale_after: float = LIVENESS_STALE_S) -> tuple[bool, str]:
        """(alive, why not): false when the event loop has not beaten for ``stale_after``.

        Safe to call from another thread (the metrics HTTP server's).
        """
        beat = self.heartbeat
        if beat and now - beat > stale_after:
            return False, f"event loop stalled for {now - beat:.1f}s"
        return True, ""


async def heartbeat(node: Node, interval: float = HEARTBEAT_INTERVAL_S) -> None:
    """Stamp ``node.heartbeat`` every ``interval`` seconds, for as long as the loop runs."""
    while True:
        node.heartbeat = time.monotonic()
        await asyncio.sleep(interval)
