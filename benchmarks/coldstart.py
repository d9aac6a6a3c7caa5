"""Cold start: first request to an unloaded model, against the model's raw load time.

1. Raw load time: the same runtime code the mesh uses (``get_runtime(t).load``) in
   this process, on distinct copies of the model file, after one warm-up load so
   importing the library is not counted (the mesh instance has it imported too).
2. Cold request: a mesh instance (warmed by serving one other model of the type)
   gets the first request for each of N registered, unloaded models; time from the
   request to its answer. The overhead is its median minus the raw load median.
   The same is measured through a second instance, where placement decides where
   the model goes and the request is forwarded there.
3. Stampede: 100 concurrent first requests for one unloaded model, half sent to each
   of two instances; the loads counted from both instances' metrics must be one.
4. Load cost, on an instance alone in its mesh (as a single server would be) and the
   small random forests of the churn benchmark (2 trees, ~110 KB): the first
   request of each of N models against the warm request to the same model (latency
   over the warm path, medians), and the CPU a load costs: (CPU of the instance and
   of etcd over the N first requests - over N warm ones) / N, against a bare Python
   process that joblib.loads each file and answers once (CPU of load and first
   answer, less a warm answer: the part a warm request does not pay). CPU from
   /proc/<pid>/task/*/schedstat (nanoseconds, every thread).

    .venv/bin/python benchmarks/coldstart.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    BenchModel,
    Processes,
    machine,
    register_bulk,
    scrape,
    start_mesh,
    write_bench_models,
    write_result,
)

LOADS = "modelmesh_loadmodel_milliseconds_count"

BARE_LOADER = r'''
import json, sys, time
import joblib, numpy as np
files = sys.argv[1:]
x = np.zeros((1, 4), dtype=np.float32)
joblib.load(files[0]).predict(x)  # imports scikit-learn: not a load's cost
loads, predicts = [], []
for f in files[1:]:
    t0 = time.thread_time_ns()
    m = joblib.load(f)
    m.predict_proba(x)  # answering once: a new estimator's first answer costs more
    t1 = time.thread_time_ns()
    m.predict_proba(x)
    t2 = time.thread_time_ns()
    loads.append(t1 - t0 - (t2 - t1))  # less the answer a warm request pays too
    predicts.append(t2 - t1)
print(json.dumps({"load_ns": loads, "predict_ns": predicts}))
'''


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of a process so far, in nanoseconds."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total


def write_copies(model: BenchModel, root: Path, n: int, prefix: str) -> list[str]:
    """``n`` copies of the model file under ``root``; returns their paths relative to it."""
    paths = []
    for i in range(n):
        rel = f"{prefix}/{i:04d}{model.path.suffix}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model.path, root / rel)
        paths.append(rel)
    return paths


def raw_load_ms(model: BenchModel, root: Path, paths: list[str]) -> list[float]:
    from modelmesh.runtimes import get_runtime

    runtime = get_runtime(model.model_type)
    runtime.load(model.path, "warm-up")
    times = []
    for i, rel in enumerate(paths):
        t0 = time.perf_counter()
        loaded = runtime.load(root / rel, f"raw-{i}")
        times.append((time.perf_counter() - t0) * 1000)
        loaded.unload()
    return times


async def first_requests(endpoint: str, model: BenchModel, ids: list[str]) -> list[float]:
    """One request per model, one after the other; milliseconds each."""
    import tritonclient.grpc.aio as tc

    client = tc.InferenceServerClient(endpoint)
    inp = tc.InferInput(model.input_name, list(model.input.shape), "FP32")
    inp.set_data_from_numpy(model.input)
    times = []
    try:
        for model_id in ids:
            t0 = time.perf_counter()
            await client.infer(model_id, [inp], client_timeout=120)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        await client.close()
    return times


async def stampede(endpoints: list[str], model: BenchModel, model_id: str,
                   n: int) -> dict[str, Any]:
    import tritonclient.grpc.aio as tc

    clients = [tc.InferenceServerClient(e) for e in endpoints]
    inp = tc.InferInput(model.input_name, list(model.input.shape), "FP32")
    inp.set_data_from_numpy(model.input)

    async def one(i: int) -> tuple[bool, float]:
        t0 = time.perf_counter()
        try:
            await clients[i % len(clients)].infer(model_id, [inp], client_timeout=120)
            return True, (time.perf_counter() - t0) * 1000
        except Exception:  # noqa: BLE001 - counted below
            return False, (time.perf_counter() - t0) * 1000

    try:
        done = await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for c in clients:
            await c.close()
    ok = [ms for good, ms in done if good]
    return {"requests": n, "succeeded": len(ok),
            "p50_ms": statistics.median(ok) if ok else None,
            "max_ms": max(ok) if ok else None}


def run(workdir: Path, quick: bool) -> dict[str, Any]:
    n = 10 if quick else 40
    root = workdir / "models"
    models = write_bench_models(root)
    # A model with a load time worth measuring: the demo random forest (~0.2 MB).
    from modelmesh.demo import demo_input, write_demo_models

    demo = {m.model_type: m for m in write_demo_models(root / "demo")}
    forest = BenchModel("iris-forest", "sklearn", root / "demo" / demo["sklearn"].path,
                        "input-0", demo_input(1).astype(np.float32))
    kinds = {"sklearn-forest": forest} if quick else {"sklearn-forest": forest,
                                                     "onnx": models["onnx"]}
    out: dict[str, Any] = {"machine": machine(), "models_per_kind": n, "kinds": {}}
    with Processes() as procs:
        etcd = procs.etcd(workdir / "etcd")
        _, a, a_metrics = start_mesh(procs, workdir, etcd, "A", root, metrics=True)
        _, b, b_metrics = start_mesh(procs, workdir, etcd, "B", root, metrics=True)
        assert a_metrics and b_metrics
        for kind, model in kinds.items():
            paths = write_copies(model, root, 2 * n + 2, f"cold-{kind}")
            raw = raw_load_ms(model, root, paths[:n])
            ids = [f"cold-{kind}-{i}" for i in range(len(paths))]
            register_bulk(a, [(i, model.model_type, p) for i, p in zip(ids, paths, strict=True)])
            # Warm each instance's library import with a model of its own.
            asyncio.run(first_requests(a, model, [ids[-1]]))
            asyncio.run(first_requests(b, model, [ids[-2]]))
            local = asyncio.run(first_requests(a, model, ids[:n]))
            anywhere = asyncio.run(first_requests(b, model, ids[n:2 * n]))
            raw_p50 = statistics.median(raw)
            out["kinds"][kind] = {
                "raw_load_ms_p50": raw_p50,
                "raw_load_ms": raw,
                "first_request_ms_p50": statistics.median(local),
                "first_request_ms": local,
                "overhead_ms_p50": statistics.median(local) - raw_p50,
                "first_request_any_instance_ms_p50": statistics.median(anywhere),
                "overhead_any_instance_ms_p50": statistics.median(anywhere) - raw_p50,
            }
        model = forest
        register_bulk(a, [("stampede", model.model_type, "cold-sklearn-forest/0000.joblib")])
        before = scrape(a_metrics, LOADS) + scrape(b_metrics, LOADS)
        crowd = asyncio.run(stampede([a, b], model, "stampede", 100))
        time.sleep(0.5)
        crowd["loads"] = scrape(a_metrics, LOADS) + scrape(b_metrics, LOADS) - before
        out["stampede"] = crowd
        out["load_cost"] = load_cost(procs, workdir, 60 if quick else 200)
    head, cost = out["kinds"]["sklearn-forest"], out["load_cost"]
    out["ratios"] = {"cold_start_overhead_ms_p50": round(head["overhead_ms_p50"], 2),
                     "stampede_loads": out["stampede"]["loads"],
                     "cold_over_warm_ms_p50": round(cost["cold_over_warm_ms_p50"], 2),
                     "load_cpu_vs_bare": round(cost["load_cpu_vs_bare"], 3)}
    out["summary"] = markdown(out)
    return out


def load_cost(procs: Processes, workdir: Path, n: int) -> dict[str, Any]:
    """Section 4: cold over warm latency and CPU per load, alone in a mesh, vs a bare process."""
    import subprocess

    from common import PYTHON
    from density import write_models

    root = workdir / "solo-models"
    paths = write_models(root, n + 2, prefix="s", trees=2)
    etcd = procs.etcd(workdir / "etcd-solo")
    proc, endpoint, _ = start_mesh(procs, workdir, etcd, "solo", root, mesh_name="solo")
    ids = [f"solo-{i:04d}" for i in range(len(paths))]
    register_bulk(endpoint, [(i, "sklearn", p.name) for i, p in zip(ids, paths, strict=True)])
    forest = BenchModel("solo", "sklearn", paths[0], "input-0", np.zeros((1, 4), np.float32))
    asyncio.run(first_requests(endpoint, forest, ids[-2:]))  # imports, channels, threads
    pids = (proc.pid, etcd.process.pid)  # type: ignore[union-attr]
    before = [cpu_ns(p) for p in pids]
    cold = asyncio.run(first_requests(endpoint, forest, ids[:n]))
    middle = [cpu_ns(p) for p in pids]
    warm = asyncio.run(first_requests(endpoint, forest, ids[:n]))
    after = [cpu_ns(p) for p in pids]
    procs.stop(proc)
    bare = json.loads(subprocess.run([PYTHON, "-c", BARE_LOADER, *map(str, paths[:n + 1])],
                                     capture_output=True, text=True, check=True,
                                     timeout=300).stdout.strip().splitlines()[-1])
    mesh_cold, etcd_cold = (middle[i] - before[i] for i in range(2))
    mesh_warm, etcd_warm = (after[i] - middle[i] for i in range(2))
    per_load_ms = ((mesh_cold - mesh_warm) + (etcd_cold - etcd_warm)) / n / 1e6
    bare_ms = statistics.median(bare["load_ns"]) / 1e6
    return {
        "models": n, "cold_ms_p50": statistics.median(cold),
        "warm_ms_p50": statistics.median(warm),
        "cold_over_warm_ms_p50": statistics.median(cold) - statistics.median(warm),
        "cpu_per_load_ms": per_load_ms,
        "cpu_per_load_mesh_ms": (mesh_cold - mesh_warm) / n / 1e6,
        "cpu_per_load_etcd_ms": (etcd_cold - etcd_warm) / n / 1e6,
        "cpu_per_warm_request_ms": mesh_warm / n / 1e6,
        "bare_load_cpu_ms_p50": bare_ms,
        "bare_predict_cpu_ms_p50": statistics.median(bare["predict_ns"]) / 1e6,
        "load_cpu_vs_bare": per_load_ms / bare_ms,
    }


def markdown(out: dict[str, Any]) -> str:
    lines = [f"{out['models_per_kind']} distinct unloaded models per kind, first requests one "
             "after the other; raw load = the mesh's runtime loading the same files in the "
             "benchmark process.", "",
             "| model | raw load p50 ms | first request p50 ms (ingress loads) | overhead ms | "
             "first request p50 ms (placed by a peer) | overhead ms |",
             "|---|---|---|---|---|---|"]
    for kind, k in out["kinds"].items():
        lines.append(f"| {kind} | {k['raw_load_ms_p50']:.1f} | {k['first_request_ms_p50']:.1f} | "
                     f"{k['overhead_ms_p50']:+.1f} | {k['first_request_any_instance_ms_p50']:.1f} "
                     f"| {k['overhead_any_instance_ms_p50']:+.1f} |")
    s = out["stampede"]
    lines += ["", f"100 concurrent first requests for one unloaded model, split over two "
              f"instances: {s['succeeded']} succeeded, loads counted by the instances: "
              f"{s['loads']:.0f}, p50 {s['p50_ms']:.0f} ms, slowest {s['max_ms']:.0f} ms."]
    c = out["load_cost"]
    lines += ["", f"Load cost, one instance alone in its mesh, {c['models']} random forests of "
              "2 trees (~110 KB), first requests one after the other, then the same models "
              "warm:", "", "| measure | figure |", "|---|---|",
              f"| first request p50 / warm request p50 | {c['cold_ms_p50']:.2f} / "
              f"{c['warm_ms_p50']:.2f} ms |",
              f"| cold over warm (p50) | {c['cold_over_warm_ms_p50']:+.2f} ms |",
              f"| CPU per load: instance + etcd | {c['cpu_per_load_mesh_ms']:.2f} + "
              f"{c['cpu_per_load_etcd_ms']:.2f} ms |",
              f"| CPU per load in a bare process (joblib.load, p50) | "
              f"{c['bare_load_cpu_ms_p50']:.2f} ms |",
              f"| CPU per load / bare | {c['load_cpu_vs_bare']:.2f}x |",
              f"| CPU per warm request (instance) | {c['cpu_per_warm_request_ms']:.2f} ms |"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mm-bench-cold-") as tmp:
        result = run(Path(tmp), args.quick)
    print(result["summary"])
    write_result("coldstart", result, "# Cold start\n\n" + result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
