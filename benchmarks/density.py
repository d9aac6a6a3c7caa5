"""Density: how many small models one instance holds within its capacity, and at what cost.

One `modelmesh serve` with a 2 GiB capacity (quick mode: 256 MiB) and N distinct
small scikit-learn models registered (N about 1.15x what should fit). The models are
loaded on that instance, a few at a time, until it starts evicting. At checkpoints
the benchmark reads the instance's own accounting from its Prometheus metrics
(models loaded, bytes used, evictions) and its process RSS from /proc.

Reported:
- models held when the first eviction came, and the bytes the mesh accounts per
  model (the sklearn runtime's measurement: pickle stream + array bytes);
- RSS growth per loaded model (least squares over the checkpoints before the first
  eviction, so allocator noise at any one point does not decide it);
- overhead per model = RSS growth per model - accounted bytes per model: what a
  loaded model costs beyond what the accounting sees (Python objects of the
  estimator that a pickle does not show, the cache entry and copy record, malloc
  and pymalloc slack);
- RSS against capacity + the RSS before loading: does the accounting keep the
  process within its budget?

The models are random forests of 8 trees drawn from a pool of 64 (trained once on
random data): every file is a different model, and every load unpickles its own
arrays, so no memory is shared between models.

    .venv/bin/python benchmarks/density.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import sys
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    PYTHON,
    Processes,
    machine,
    mesh_stub,
    register_bulk,
    rss_bytes,
    start_mesh,
    write_result,
)

GIB = 1024**3
MIB = 1024**2
TREES_PER_MODEL = 8
POOL_TREES = 64
IN_FLIGHT = 4  # loads asked for at once (the instance runs 2 at a time)
CHECK_EVERY = 50  # loads between checkpoints
PLAIN_MODELS = {True: 200, False: 600}  # loaded by the bare-process baseline (quick, full)


# ---------------------------------------------------------------- models


def tree_pool(seed: int = 0) -> Any:
    """A fitted random forest whose trees the models are drawn from.

    Fully grown trees on random labels: about 54 KB of node arrays each, so a
    model of 8 trees is about 430 KB, and 2 GiB holds about 5,000.
    """
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1000, 4))
    y = rng.integers(0, 3, len(x))
    return RandomForestClassifier(n_estimators=POOL_TREES, random_state=seed).fit(x, y)


def write_models(root: Path, n: int, prefix: str = "m",
                 trees: int = TREES_PER_MODEL) -> list[Path]:
    """Write ``n`` distinct forests (``trees`` of the pool's each) as pickles under ``root``.

    Plain pickle protocol 5 rather than joblib.dump: ten times faster to write, and
    joblib.load (the runtime's loader) reads it the same way.
    """
    root.mkdir(parents=True, exist_ok=True)
    pool = tree_pool()
    paths = []
    for i in range(n):
        model = copy.copy(pool)
        picks = np.random.default_rng(i).choice(POOL_TREES, trees, replace=False)
        model.estimators_ = [pool.estimators_[j] for j in picks]
        model.n_estimators = trees
        path = root / f"{prefix}{i:05d}.pkl"
        with open(path, "wb") as f:
            pickle.dump(model, f, protocol=5)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- observing the instance


def metrics(port: int) -> dict[str, float]:
    """Every sample of the instance's /metrics, keyed by name plus labels as exposed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest for w in want):
            total += value
    return total


@dataclass(frozen=True)
class Checkpoint:
    """The instance's state after some loads: its accounting and its RSS."""

    seconds: float  # since the loading began
    asked: int  # loads asked for so far
    loaded: int  # models the instance says it holds
    used_bytes: int  # bytes it accounts for them
    evictions: int
    rss_bytes: int


def checkpoint(pid: int, metrics_port: int, asked: int, started: float) -> Checkpoint:
    m = metrics(metrics_port)
    return Checkpoint(
        seconds=time.perf_counter() - started, asked=asked,
        loaded=int(metric(m, "modelmesh_instance_models_total")),
        used_bytes=int(metric(m, "modelmesh_instance_used_bytes")),
        evictions=int(metric(m, "modelmesh_unloadmodel_total", reason="evicted")),
        rss_bytes=rss_bytes(pid),
    )


# ---------------------------------------------------------------- loading


def load_until_evicting(endpoint: str, pid: int, metrics_port: int, ids: list[str],
                        extra: int) -> list[Checkpoint]:
    """Load ``ids`` here, IN_FLIGHT at a time, until evictions start (plus ``extra`` more).

    Checkpoints every CHECK_EVERY loads, and at the end. Stops early when the
    instance has evicted and ``extra`` loads went after that.
    """
    from modelmesh._proto.mmesh import model_mesh_pb2 as mm

    started = time.perf_counter()
    points: list[Checkpoint] = [checkpoint(pid, metrics_port, 0, started)]
    stop_at = len(ids)
    ch, stub = mesh_stub(endpoint)
    with ch:
        pending: deque[Any] = deque()
        for asked, model_id in enumerate(ids, 1):
            if asked > stop_at:
                break
            pending.append(stub.ensureLoaded.future(
                mm.EnsureLoadedRequest(modelId=model_id, sync=True),
                metadata=[("mm-load-here", "1")], timeout=120))
            if len(pending) >= IN_FLIGHT:
                pending.popleft().result()
            if asked % CHECK_EVERY == 0:
                points.append(checkpoint(pid, metrics_port, asked, started))
                if points[-1].evictions and stop_at == len(ids):
                    stop_at = asked + extra
        while pending:
            pending.popleft().result()
    time.sleep(0.5)  # the gauges follow the last load's events
    points.append(checkpoint(pid, metrics_port, min(stop_at, len(ids)), started))
    return points


def fit_line(points: list[Checkpoint]) -> tuple[float, float]:
    """Least-squares RSS = intercept + slope x loaded models; returns (slope, intercept)."""
    if len(points) < 2:
        return float("nan"), float("nan")
    x = np.array([p.loaded for p in points], dtype=float)
    y = np.array([p.rss_bytes for p in points], dtype=float)
    a, b = np.polyfit(x, y, 1)
    return float(a), float(b)


# ---------------------------------------------------------------- the baseline

PLAIN_LOADER = r'''
import json, sys
from pathlib import Path

import joblib

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

files = sys.argv[1:]
held = [joblib.load(files[0])]  # the first load imports scikit-learn: not a model's cost
base = rss()
held += [joblib.load(f) for f in files[1:]]
print(json.dumps({"base": base, "full": rss(), "count": len(files) - 1}))
'''


def plain_footprint(procs: Processes, workdir: Path, paths: list[Path]) -> float:
    """RSS bytes per model when a bare Python process joblib.loads the same files.

    The baseline for the mesh's overhead: what holding one of these estimators costs
    any Python process (its arrays, its Python objects, the allocator's slack), so
    that the mesh's own bookkeeping per model can be told apart from it.
    """
    out = workdir / "plain.json"
    proc = procs.spawn([PYTHON, "-c", PLAIN_LOADER, *map(str, paths)], log=out)
    if proc.wait(300) != 0:
        raise RuntimeError(f"plain loader failed: {out.read_text()[-2000:]}")
    r = json.loads(out.read_text().strip().splitlines()[-1])
    return (r["full"] - r["base"]) / r["count"]


# ---------------------------------------------------------------- the benchmark


def load_rate(points: list[Checkpoint], lo: float, hi: float) -> float:
    """Models loaded per second between the fractions ``lo`` and ``hi`` of the fill.

    Shows whether a load costs more when the instance already holds many models.
    Callers leave out the first checkpoint: the first load imports scikit-learn.
    """
    end = points[-1].loaded
    inside = [p for p in points if lo * end <= p.loaded <= hi * end]
    if len(inside) < 2 or inside[-1].seconds == inside[0].seconds:
        return float("nan")
    return (inside[-1].loaded - inside[0].loaded) / (inside[-1].seconds - inside[0].seconds)


def analyse(points: list[Checkpoint], rss_registered: int, capacity: int) -> dict[str, Any]:
    """The figures, from the checkpoints before the first eviction and the last one.

    The first load imports scikit-learn (and SciPy): a one-time step in RSS that is
    no model's cost, so the per-model slope is fitted over the checkpoints after it,
    and its intercept tells the runtime libraries' share apart.
    """
    before = [p for p in points if not p.evictions]
    full, last = before[-1], points[-1]
    accounted = full.used_bytes / max(full.loaded, 1)
    growth, intercept = fit_line([p for p in before if p.loaded])
    peak = max(p.rss_bytes for p in points)
    libraries = intercept - rss_registered
    return {
        "loads_per_s_first_quarter": load_rate(before[1:], 0.0, 0.25),
        "loads_per_s_last_quarter": load_rate(before[1:], 0.75, 1.0),
        "models_held_at_first_eviction": full.loaded,
        "models_held_at_end": last.loaded,
        "evictions_at_end": last.evictions,
        "used_bytes_full": full.used_bytes,
        "used_bytes_end": last.used_bytes,
        "accounted_bytes_per_model": accounted,
        "rss_growth_per_model_bytes": growth,
        "overhead_per_model_bytes": growth - accounted,
        "overhead_ratio": growth / accounted if accounted else float("nan"),
        "runtime_libraries_bytes": libraries,
        "rss_registered_bytes": rss_registered,
        "rss_full_bytes": full.rss_bytes,
        "rss_end_bytes": last.rss_bytes,
        "rss_peak_bytes": peak,
        "rss_peak_over_capacity_budget": peak / (rss_registered + capacity),
        "rss_peak_over_budget_with_libraries": peak / (intercept + capacity),
        "used_over_capacity_end": last.used_bytes / capacity,
    }


def run(workdir: Path, quick: bool) -> dict:
    capacity = 256 * MIB if quick else 2 * GIB
    n = int(capacity / 430_000 * 1.15)
    t0 = time.perf_counter()
    paths = write_models(workdir / "models", n)
    write_s = time.perf_counter() - t0
    model_bytes = sum(p.stat().st_size for p in paths)
    ids = [f"dense-{i:05d}" for i in range(n)]
    with Processes() as procs:
        etcd = procs.etcd(workdir / "etcd")
        proc, endpoint, metrics_port = start_mesh(
            procs, workdir, etcd, "dense", workdir / "models", capacity=str(capacity),
            mesh_name="density", metrics=True)
        assert metrics_port is not None
        rss_start = rss_bytes(proc.pid)
        register_bulk(endpoint, [(i, "sklearn", p.name) for i, p in zip(ids, paths, strict=True)])
        time.sleep(1.0)
        rss_registered = rss_bytes(proc.pid)
        t0 = time.perf_counter()
        points = load_until_evicting(endpoint, proc.pid, metrics_port, ids,
                                     extra=max(n // 50, CHECK_EVERY))
        load_s = time.perf_counter() - t0
        plain = plain_footprint(procs, workdir, paths[:PLAIN_MODELS[quick]])
    result: dict[str, Any] = {
        "quick": quick, "machine": machine(), "capacity_bytes": capacity,
        "models_written": n, "model_file_bytes_mean": model_bytes / n,
        "write_seconds": write_s, "load_seconds": load_s,
        "loads_per_s": points[-1].asked / load_s,
        "rss_start_bytes": rss_start,
        **analyse(points, rss_registered, capacity),
        "plain_process_bytes_per_model": plain,
        "plain_models": PLAIN_MODELS[quick],
        "checkpoints": [asdict(p) for p in points],
    }
    result["mesh_overhead_per_model_bytes"] = result["rss_growth_per_model_bytes"] - plain
    result["ratios"] = {
        "density_models_per_gib": result["models_held_at_end"] * GIB / capacity,
        "density_overhead_per_model_kb": result["overhead_per_model_bytes"] / 1000,
        "density_mesh_overhead_per_model_kb": result["mesh_overhead_per_model_bytes"] / 1000,
        "density_rss_peak_over_budget": result["rss_peak_over_budget_with_libraries"],
        "density_rss_over_accounted": round(result["overhead_ratio"], 4),
    }
    result["summary"] = summary(result)
    return result


def summary(r: dict[str, Any]) -> str:
    kb, mb = 1000, 1000**2
    cap = r["capacity_bytes"]
    note = (f"Quick mode: capacity {cap / MIB:.0f} MiB instead of 2 GiB.\n\n"
            if r["quick"] else "")
    return (
        f"### Density ({cap / MIB:,.0f} MiB capacity, random forests of {TREES_PER_MODEL} "
        f"trees, {r['model_file_bytes_mean'] / kb:.0f} KB files)\n\n{note}"
        "| measure | figure |\n|---|---|\n"
        f"| models held, full and evicting | {r['models_held_at_end']:,} "
        f"({r['used_over_capacity_end']:.1%} of capacity accounted); first eviction at "
        f"{r['models_held_at_first_eviction']:,} |\n"
        f"| bytes accounted per model (measured at load) | "
        f"{r['accounted_bytes_per_model'] / kb:.0f} KB |\n"
        f"| RSS growth per loaded model (least squares) | "
        f"{r['rss_growth_per_model_bytes'] / kb:.0f} KB |\n"
        f"| overhead per model beyond its accounted bytes | "
        f"{r['overhead_per_model_bytes'] / kb:.1f} KB ({r['overhead_ratio']:.3f}x accounted) |\n"
        f"| RSS per model in a bare Python process that joblib.loads the same files "
        f"({r['plain_models']}) | {r['plain_process_bytes_per_model'] / kb:.0f} KB |\n"
        f"| mesh's own overhead per model (RSS growth - bare process's) | "
        f"{r['mesh_overhead_per_model_bytes'] / kb:.1f} KB |\n"
        f"| one-time RSS step at the first load (scikit-learn and SciPy imported) | "
        f"{r['runtime_libraries_bytes'] / mb:.0f} MB |\n"
        f"| RSS: started / registered / full / peak | {r['rss_start_bytes'] / mb:.0f} / "
        f"{r['rss_registered_bytes'] / mb:.0f} / {r['rss_full_bytes'] / mb:.0f} / "
        f"{r['rss_peak_bytes'] / mb:.0f} MB |\n"
        f"| peak RSS / (RSS with libraries, no models + capacity) | "
        f"{r['rss_peak_over_budget_with_libraries']:.3f} |\n"
        f"| peak RSS / (RSS when registered + capacity) | "
        f"{r['rss_peak_over_capacity_budget']:.3f} |\n"
        f"| loads | {r['checkpoints'][-1]['asked']:,} in {r['load_seconds']:.0f} s "
        f"({r['loads_per_s']:.0f}/s), {r['evictions_at_end']} evictions by the end |\n"
        f"| loads/s while filling the first / last quarter (after the first "
        f"{CHECK_EVERY}) | {r['loads_per_s_first_quarter']:.0f} / "
        f"{r['loads_per_s_last_quarter']:.0f} |\n\n"
        "RSS counts everything resident in the process: the estimators' Python objects "
        "(which a pickle's size does not show), the cache's and registry's bookkeeping, "
        "and malloc/pymalloc slack (freed memory the allocator keeps), so the overhead "
        "above is an upper bound on what the mesh itself adds per model; the bare-process "
        "baseline takes the estimators' own share out of it. The capacity "
        "budgets models only: the runtime's libraries, loaded with the first model, "
        "come on top of it.\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB capacity instead of 2 GiB")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mm-density-") as tmp:
        result = run(Path(tmp), args.quick)
    print(result["summary"])
    write_result("density", result, result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
