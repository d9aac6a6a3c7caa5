"""The offline optimum (Belady) and the size-aware upper bound."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.config import parse_config
from simulations.optimal import belady, interval_bound, next_use
from simulations.runner import run_config

seqs = st.lists(st.integers(0, 7), min_size=1, max_size=80)


def lru_hits(seq: list[int], slots: int) -> int:
    cache: list[int] = []
    hits = 0
    for m in seq:
        if m in cache:
            hits += 1
            cache.remove(m)
        elif len(cache) >= slots:
            cache.pop(0)
        cache.append(m)
    return hits


def brute_force_min_misses(seq: list[int], slots: int) -> int:
    """Fewest misses of any demand-loading cache, by trying every eviction choice."""
    best = len(seq)

    def go(k: int, cache: frozenset[int], misses: int) -> None:
        nonlocal best
        if misses >= best:
            return
        if k == len(seq):
            best = misses
            return
        m = seq[k]
        if m in cache:
            go(k + 1, cache, misses)
        elif len(cache) < slots:
            go(k + 1, cache | {m}, misses + 1)
        else:
            for victim in cache:
                go(k + 1, (cache - {victim}) | {m}, misses + 1)

    go(0, frozenset(), 0)
    return best


def test_next_use():
    assert next_use(np.array([3, 1, 3, 3, 1, 2])).tolist() == [2, 4, 3, 6, 6, 6]


def test_belady_on_a_textbook_sequence():
    seq = np.array([1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5])
    hits, evictions, _ = belady(seq, 3)
    assert int((~hits).sum()) == 7  # the known optimum: 7 faults with 3 frames
    assert evictions == 4


@settings(max_examples=40, deadline=None)
@given(seq=st.lists(st.integers(0, 4), min_size=1, max_size=12), slots=st.integers(1, 3))
def test_belady_is_optimal(seq, slots):
    hits, _, _ = belady(np.array(seq), slots)
    assert int((~hits).sum()) == brute_force_min_misses(seq, slots)


@settings(max_examples=80, deadline=None)
@given(seq=seqs, slots=st.integers(1, 5))
def test_bound_is_at_least_belady_which_is_at_least_lru(seq, slots):
    arr = np.array(seq)
    min_hits = int(belady(arr, slots)[0].sum())
    bound = int(interval_bound(arr, np.ones(8, dtype=np.int64), slots).sum())
    assert bound >= min_hits >= lru_hits(seq, slots)


def test_optimum_beats_every_policy_on_equal_and_unequal_sizes(tiny):
    for size in ({"fixed": "24MiB"}, None):
        cfg_map = tiny()
        if size:
            cfg_map["models"]["size"] = size
        _, _, results = run_config(parse_config(cfg_map), progress=False)
        by = {r.label: r.metrics for r in results}
        method = by["optimal"]["method"]
        assert method == ("belady" if size else "interval-knapsack upper bound")
        for name, m in by.items():
            assert by["optimal"]["hit_ratio"] >= m["hit_ratio"], name
