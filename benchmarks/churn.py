"""Churn: throughput when the working set is 3x the capacity, against everything fitting.

5,000 distinct small scikit-learn models (random forests of 2 trees, ~110 KB; quick
mode: 500) are registered, and one `modelmesh serve` is driven by 16 closed-loop
callers of the unmodified tritonclient (asyncio), each request for a model drawn
from Zipf(0.9) over the 5,000 (a fixed random ranking; both runs walk the same seeded
sequence). Two runs, each on a fresh instance:

- churn: capacity = the models' total bytes / 3, so a third of them fit; the
  instance is driven until it is full and evicting, then measured;
- fitting: capacity = 1.5x the total (room for every model even at the runtime's
  pre-load size estimate); every model is loaded first, then measured.

Reported per run: req/s, p50/p99 latency, hit ratio (requests that found their
model loaded, from the instance's ``modelmesh_cache_miss_milliseconds`` count
against its request count), loads and evictions during the measured window; and
the ratio churn / fitting throughput.

    .venv/bin/python benchmarks/churn.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Processes,
    drive,
    machine,
    mesh_stub,
    register_bulk,
    start_mesh,
    write_result,
)
from density import metric, metrics, write_models  # noqa: E402

ZIPF_S = 0.9
CONCURRENCY = 16
TREES = 2
LOAD_IN_FLIGHT = 4


def zipf_order(n_models: int, n_requests: int, seed: int = 1) -> np.ndarray:
    """Model indices for ``n_requests`` requests: Zipf(ZIPF_S) over a random ranking."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_models + 1) ** ZIPF_S
    ranks = rng.choice(n_models, size=n_requests, p=weights / weights.sum())
    return rng.permutation(n_models)[ranks]


def ideal_hit_ratio(n_models: int, fit: int) -> float:
    """Hit ratio of a cache that always holds the ``fit`` most popular models (the bound)."""
    weights = 1.0 / np.arange(1, n_models + 1) ** ZIPF_S
    return float(weights[:fit].sum() / weights.sum())


async def drive_zipf(endpoint: str, ids: Sequence[str], picks: Iterator[int], seconds: float,
                     concurrency: int = CONCURRENCY) -> dict[str, float]:
    """Closed loop: ``concurrency`` callers, each request for the next model from ``picks``.

    ``picks`` is shared by the callers and carries on across calls, so warm-up and
    measurement walk one Zipf sequence instead of replaying its start.
    """
    x = np.random.default_rng(0).normal(size=(1, 4)).astype(np.float32)
    return await drive(endpoint, lambda: ids[next(picks)], [("input-0", x)], concurrency,
                       seconds, warmup=0)


def cache_counters(metrics_port: int) -> dict[str, float]:
    """The instance's cumulative request, miss, load and eviction counts, and its fill."""
    m = metrics(metrics_port)
    return {
        "requests": metric(m, "modelmesh_api_request_milliseconds_count", method="ModelInfer"),
        "misses": metric(m, "modelmesh_cache_miss_milliseconds_count"),
        "loads": metric(m, "modelmesh_loadmodel_milliseconds_count"),
        "evictions": metric(m, "modelmesh_unloadmodel_total", reason="evicted"),
        "load_failures": metric(m, "modelmesh_loadmodel_failure_total"),
        "loaded": metric(m, "modelmesh_instance_models_total"),
        "used_bytes": metric(m, "modelmesh_instance_used_bytes"),
    }


def load_all(endpoint: str, ids: Sequence[str]) -> None:
    """Load every model on the instance (the fitting run's warm-up), a few at a time."""
    from modelmesh._proto.mmesh import model_mesh_pb2 as mm

    ch, stub = mesh_stub(endpoint)
    with ch:
        pending = []
        for model_id in ids:
            pending.append(stub.ensureLoaded.future(
                mm.EnsureLoadedRequest(modelId=model_id, sync=True),
                metadata=[("mm-load-here", "1")], timeout=120))
            if len(pending) >= LOAD_IN_FLIGHT:
                pending.pop(0).result()
        for fut in pending:
            fut.result()


def measured_run(endpoint: str, metrics_port: int, ids: Sequence[str], picks: Iterator[int],
                 seconds: float) -> dict[str, Any]:
    """Drive for ``seconds`` and take the instance's counters over exactly that window."""
    before = cache_counters(metrics_port)
    load = asyncio.run(drive_zipf(endpoint, ids, picks, seconds))
    time.sleep(0.3)  # let the last requests' metrics land
    after = cache_counters(metrics_port)
    delta = {k: after[k] - before[k] for k in ("requests", "misses", "loads", "evictions",
                                                "load_failures")}
    requests = max(delta["requests"], 1.0)
    return {
        **load, **{f"window_{k}": v for k, v in delta.items()},
        "hit_ratio": 1.0 - delta["misses"] / requests,
        "loads_per_request": delta["loads"] / requests,
        "loaded_at_end": after["loaded"], "used_bytes_at_end": after["used_bytes"],
    }


def case(procs: Processes, workdir: Path, etcd: Any, name: str, ids: Sequence[str],
         files: Sequence[str], capacity: int, order: np.ndarray, warm_s: float,
         seconds: float) -> dict[str, Any]:
    """One instance of ``capacity`` bytes: fill it, warm the data path, then measure.

    ``churn`` (a third fits): drive until the instance evicts; ``fitting``: load every
    model first.
    """
    proc, endpoint, port = start_mesh(procs, workdir, etcd, name, workdir / "models",
                                      capacity=str(capacity), mesh_name=name, metrics=True)
    assert port is not None
    register_bulk(endpoint, [(i, "sklearn", f) for i, f in zip(ids, files, strict=True)])
    picks = itertools.cycle(order.tolist())
    t0 = time.perf_counter()
    if name == "fitting":
        load_all(endpoint, ids)
    while name == "churn" and cache_counters(port)["evictions"] == 0:
        if time.perf_counter() - t0 > 240:
            raise RuntimeError("the churn instance never filled up: no eviction in 240 s")
        asyncio.run(drive_zipf(endpoint, ids, picks, 2.0))
    asyncio.run(drive_zipf(endpoint, ids, picks, warm_s))
    warmup_s = time.perf_counter() - t0
    out = measured_run(endpoint, port, ids, picks, seconds)
    procs.stop(proc)
    return {**out, "capacity_bytes": capacity, "warmup_seconds": warmup_s}


def run(workdir: Path, quick: bool) -> dict:
    n = 500 if quick else 5000
    seconds, warm_s = (4.0, 1.0) if quick else (20.0, 5.0)
    paths = write_models(workdir / "models", n, prefix="c", trees=TREES)
    files = [p.name for p in paths]
    total = sum(p.stat().st_size for p in paths)
    ids = [f"churn-{i:05d}" for i in range(n)]
    order = zipf_order(n, 400_000)
    with Processes() as procs:
        etcd = procs.etcd(workdir / "etcd")
        churn = case(procs, workdir, etcd, "churn", ids, files, total // 3, order, warm_s,
                     seconds)
        fitting = case(procs, workdir, etcd, "fitting", ids, files, int(total * 1.5), order,
                               warm_s, seconds)
    held = churn["loaded_at_end"]
    result: dict[str, Any] = {
        "quick": quick, "machine": machine(), "models": n, "zipf_s": ZIPF_S,
        "concurrency": CONCURRENCY, "model_bytes_total": total, "model_bytes_mean": total / n,
        "seconds": seconds, "churn": churn, "fitting": fitting,
        "ideal_hit_ratio_churn": ideal_hit_ratio(n, int(held)),
        "throughput_ratio": churn["requests_per_s"] / fitting["requests_per_s"],
    }
    result["ratios"] = {"churn_vs_fitting_throughput": result["throughput_ratio"],
                        "churn_hit_ratio": churn["hit_ratio"]}
    result["summary"] = summary(result)
    return result


def summary(r: dict[str, Any]) -> str:
    c, f = r["churn"], r["fitting"]
    mb = 1000**2
    note = (f"Quick mode: {r['models']} models, {r['seconds']:.0f} s windows.\n\n"
            if r["quick"] else "")

    def row(name: str, x: dict[str, Any]) -> str:
        return (f"| {name} | {x['capacity_bytes'] / mb:.0f} MB | {x['loaded_at_end']:.0f} | "
                f"{x['requests_per_s']:.0f} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | "
                f"{x['hit_ratio']:.3f} | {x['window_loads']:.0f} | {x['window_evictions']:.0f} "
                f"| {x['errors']} |")

    return (
        f"### Churn (Zipf {r['zipf_s']} over {r['models']:,} models of "
        f"{r['model_bytes_mean'] / 1000:.0f} KB, {r['concurrency']} callers, "
        f"{r['seconds']:.0f} s measured)\n\n{note}"
        "| run | capacity | models held | req/s | p50 ms | p99 ms | hit ratio | loads | "
        "evictions | errors |\n|---|---|---|---|---|---|---|---|---|---|\n"
        f"{row('working set 3x capacity', c)}\n{row('everything fits', f)}\n\n"
        f"Churn / fitting throughput: **{r['throughput_ratio']:.2f}x**. A cache that always "
        f"held the {c['loaded_at_end']:.0f} most popular models would hit "
        f"{r['ideal_hit_ratio_churn']:.3f} of requests.\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="500 models, 4 s windows")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mm-churn-") as tmp:
        result = run(Path(tmp), args.quick)
    print(result["summary"])
    write_result("churn", result, result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
