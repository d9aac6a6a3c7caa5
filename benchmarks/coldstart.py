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

    .venv/bin/python benchmarks/coldstart.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
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
    head = out["kinds"]["sklearn-forest"]
    out["ratios"] = {"cold_start_overhead_ms_p50": round(head["overhead_ms_p50"], 2),
                     "stampede_loads": out["stampede"]["loads"]}
    out["summary"] = markdown(out)
    return out


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
