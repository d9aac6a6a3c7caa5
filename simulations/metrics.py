"""Summary figures of a run, computed the same way for every policy and the optimum."""

from __future__ import annotations

from typing import Any

import numpy as np

HIT, COLD, FAILED = 0, 1, 2


def summarize(
    times: np.ndarray,
    outcome: np.ndarray,
    latency_s: np.ndarray,
    *,
    start: float,
    end: float,
    counts: dict[str, Any],
) -> dict[str, Any]:
    """Figures over the requests that arrived at or after ``start``.

    ``outcome`` is HIT, COLD (waited for a load) or FAILED per request;
    ``latency_s`` the time from arrival to the end of inference (NaN for failed
    requests). ``counts`` (loads, evictions, ...) are added as they are, with
    per-minute rates for loads and evictions.
    """
    mask = times >= start
    o = outcome[mask]
    lat = latency_s[mask]
    n = int(mask.sum())
    hits = int(np.count_nonzero(o == HIT))
    cold = int(np.count_nonzero(o == COLD))
    failed = int(np.count_nonzero(o == FAILED))
    served = lat[o != FAILED] * 1000.0
    cold_lat = lat[o == COLD] * 1000.0
    minutes = max(end - start, 1e-9) / 60.0

    def pct(a: np.ndarray, q: float) -> float | None:
        return float(np.percentile(a, q)) if len(a) else None

    out: dict[str, Any] = {
        "requests": n,
        "hits": hits,
        "hit_ratio": hits / n if n else 0.0,
        "miss_ratio": 1.0 - hits / n if n else 0.0,
        "cold_starts": cold,
        "failed": failed,
        "p50_ms": pct(served, 50),
        "p95_ms": pct(served, 95),
        "p99_ms": pct(served, 99),
        "mean_ms": float(served.mean()) if len(served) else None,
        "cold_p50_ms": pct(cold_lat, 50),
        "cold_p99_ms": pct(cold_lat, 99),
    }
    out.update(counts)
    for key in ("loads", "evictions"):
        value = counts.get(key)
        out[f"{key}_per_min"] = value / minutes if isinstance(value, int | float) else None
    return out


def hit_ratio_curve(
    times: np.ndarray, outcome: np.ndarray, buckets: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Hit ratio per time bucket: (bucket mid-times, ratios; NaN where no requests)."""
    if not len(times):
        return np.empty(0), np.empty(0)
    edges = np.linspace(float(times[0]), float(times[-1]) + 1e-9, buckets + 1)
    total, _ = np.histogram(times, edges)
    hits, _ = np.histogram(times, edges, weights=(outcome == HIT).astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(total > 0, hits / np.maximum(total, 1), np.nan)
    return (edges[:-1] + edges[1:]) / 2, ratio
