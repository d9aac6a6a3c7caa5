"""``lru``: one global least-recently-used cache over the whole cluster, one copy per model.

The textbook reference point. Each model has at most one copy. A miss loads
the model where it fits in free memory, or else on the instance holding the
least recently used model in the cluster, evicting in last-use order there.
Taken together the instances behave like a single LRU cache of the cluster's
total memory, split only by the granularity of instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from placement.model import ClusterSnapshot, ModelSnapshot
from placement.policy import Policy, place_lowest_priority


@dataclass(frozen=True)
class LRUPolicy(Policy):
    name: ClassVar[str] = "lru"
    summary: ClassVar[str] = "global least-recently-used, one copy per model"

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
        return now

    def place(
        self,
        model: ModelSnapshot,
        cluster: ClusterSnapshot,
        exclude: frozenset[str] = frozenset(),
    ) -> str | None:
        return place_lowest_priority(self, model, cluster, exclude)
