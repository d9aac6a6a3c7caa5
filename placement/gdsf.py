"""``gdsf``: Greedy-Dual-Size-Frequency, one copy per model.

Each copy gets the priority ``H = L + F * C / S`` when it is used: ``F`` is how
often it was used since it was loaded on this instance, ``S`` its size, ``C``
the cost of a miss (1 by default, which optimises the hit ratio; or the load
time with ``cost="load_time"``) and ``L`` the pool's inflation clock: the
priority of the last model evicted from it. Evicting the lowest ``H`` first
keeps small, often-used models; the rising clock ages models that stopped being
used. Cherkasova, "Improving WWW Proxies Performance with Greedy-Dual-Size-
Frequency Caching Policy" (HP Labs, 1998).

Frequency counts live with the copy, as in the original algorithm: a model
that is evicted and loaded again starts from ``F = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from placement.model import ClusterSnapshot, ModelSnapshot
from placement.policy import Policy, place_lowest_priority

_MIB = float(1 << 20)


@dataclass(frozen=True)
class GDSFPolicy(Policy):
    #: "hits" (every miss costs 1) or "load_time" (a miss costs its load time).
    cost: str = "hits"

    name: ClassVar[str] = "gdsf"
    summary: ClassVar[str] = "Greedy-Dual-Size-Frequency, one copy per model"

    def __post_init__(self) -> None:
        if self.cost not in ("hits", "load_time"):
            raise ValueError(f"gdsf cost must be 'hits' or 'load_time', not {self.cost!r}")

    def priority(
        self,
        *,
        now: float,
        size_bytes: int,
        request_rate: float,
        hits_here: int,
        load_seconds: float,
        clock: float,
    ) -> float:
        cost = load_seconds if self.cost == "load_time" else 1.0
        # Size in MiB keeps the numbers readable; the order is what matters.
        return clock + max(1, hits_here) * cost / max(size_bytes / _MIB, 1e-6)

    def place(
        self,
        model: ModelSnapshot,
        cluster: ClusterSnapshot,
        exclude: frozenset[str] = frozenset(),
    ) -> str | None:
        return place_lowest_priority(self, model, cluster, exclude)
