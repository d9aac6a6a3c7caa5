"""This instance's identity and state, owned by the composition root.

Components that need to know who they are, whether the instance is draining,
or how many calls are in flight get the ``Node`` (never the instance); those
that start background work get a ``Spawn`` (the root's supervisor).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol


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
