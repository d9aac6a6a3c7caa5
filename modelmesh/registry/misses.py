"""Which etcd reads for model ids missing from the registry's mirror are worth making."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class MissedLookups:
    """Which etcd reads for ids missing from the mirror are worth making.

    Unknown names are cheap to send and each read costs etcd a range call (and,
    with etcd down, a wait): ids etcd just said are absent are remembered for
    ``absent_ttl`` seconds (bounded), at most ``rate`` reads a second are made
    (a token bucket), and after a failed read none for ``down_s`` seconds.
    """

    def __init__(self, absent_ttl: float = 2.0, rate: float = 50.0, down_s: float = 3.0,
                 read_timeout: float = 1.0, max_absent: int = 10_000) -> None:
        self.absent_ttl = absent_ttl
        self.rate = rate
        self.down_s = down_s
        self.read_timeout = read_timeout
        self.max_absent = max_absent
        self._absent: dict[str, float] = {}  # id -> monotonic expiry, oldest first
        self._tokens = rate
        self._refilled = time.monotonic()
        self._down_until = 0.0
        self.reads = 0  # etcd reads made (for tests and metrics)

    def should_read(self, model_id: str) -> bool:
        now = time.monotonic()
        until = self._absent.get(model_id)
        if until is not None:
            if until > now:
                return False
            del self._absent[model_id]
        if now < self._down_until:
            return False
        self._tokens = min(self.rate, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        self.reads += 1
        return True

    def absent(self, model_id: str) -> None:
        now = time.monotonic()
        self._absent.pop(model_id, None)
        self._absent[model_id] = now + self.absent_ttl
        if len(self._absent) > self.max_absent:
            for key in list(self._absent)[: len(self._absent) - self.max_absent]:
                del self._absent[key]

    def forget(self, model_id: str) -> None:
        self._absent.pop(model_id, None)

    def etcd_failed(self, exc: BaseException) -> None:
        if time.monotonic() >= self._down_until:
            log.info("etcd did not answer a model lookup (%s); answering unknown names from "
                     "the mirror for %.0fs", exc or type(exc).__name__, self.down_s)
        self._down_until = time.monotonic() + self.down_s
