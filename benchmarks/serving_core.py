"""Serving-core figures: ModelInfer throughput/latency and registration time.

Starts a real etcd and a real `modelmesh serve`, plus a bare grpc.aio V2 server
that calls the same model directly (the floor for any Python server), and drives
both with the unmodified tritonclient (asyncio client) at several concurrencies.
Also times registering N models one RPC at a time and through registerModels.

    .venv/bin/python benchmarks/serving_core.py [--seconds 5] [--models 10000]

Prints a Markdown table and writes benchmarks/results/serving_core.json.
Every process it starts is stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dataplane import BARE_SERVER  # noqa: E402 - the floor: the same bare server

from modelmesh.registry.embedded import EmbeddedEtcd, free_port  # noqa: E402


def wait_port(port: int, timeout: float = 60) -> None:
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        while time.monotonic() < deadline:
            try:
                stub.ServerLive(pb.ServerLiveRequest(), timeout=1)
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    return  # answering (the bare server implements ModelInfer only)
                time.sleep(0.1)
    raise TimeoutError(f"port {port} not serving")


async def drive(endpoint: str, model: str, concurrency: int, seconds: float) -> dict:
    import tritonclient.grpc.aio as tc

    from modelmesh.demo import demo_input

    x = demo_input(1).astype(np.float32)
    client = tc.InferenceServerClient(endpoint)
    inp = tc.InferInput("input-0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(50):  # warm up
        await client.infer(model, [inp])
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await client.infer(model, [inp])
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await client.close()
    latencies.sort()
    return {
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "requests": len(latencies),
    }


def time_registration(endpoint: str, n: int, path: str) -> dict:
    from modelmesh._proto.mmesh import mesh_extensions_pb2 as ext
    from modelmesh._proto.mmesh import mesh_extensions_pb2_grpc as ext_grpc
    from modelmesh._proto.mmesh import model_mesh_pb2 as mm
    from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc

    out = {}
    with grpc.insecure_channel(endpoint) as ch:
        ext_stub = ext_grpc.ModelMeshExtensionsStub(ch)
        t0 = time.perf_counter()
        for start in range(0, n, 500):
            reqs = [mm.RegisterModelRequest(modelId=f"bulk-{i:06d}", modelInfo=mm.ModelInfo(
                type="sklearn", path=path)) for i in range(start, min(start + 500, n))]
            res = ext_stub.registerModels(ext.RegisterModelsRequest(requests=reqs), timeout=120)
            assert all(r.code == 0 for r in res.results)
        out["bulk_seconds"] = time.perf_counter() - t0
        single = min(n, 2000)
        stub = mm_grpc.ModelMeshStub(ch)
        t0 = time.perf_counter()
        futures = []
        for i in range(single):
            futures.append(stub.registerModel.future(mm.RegisterModelRequest(
                modelId=f"one-{i:06d}", modelInfo=mm.ModelInfo(type="sklearn", path=path)),
                timeout=120))
            if len(futures) >= 32:
                futures.pop(0).result()
        for f in futures:
            f.result()
        out["single_rpc_per_s"] = single / (time.perf_counter() - t0)
        out["single_rpc_models"] = single
        t0 = time.perf_counter()
        token, listed = "", 0
        while True:
            page = ext_stub.listModels(ext.ListModelsRequest(page_size=5000, page_token=token),
                                       timeout=60)
            listed += len(page.models)
            token = page.next_page_token
            if not token:
                break
        out["list_all_seconds"] = time.perf_counter() - t0
        out["listed"] = listed
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--concurrency", default="1,16,64")
    args = ap.parse_args()
    from modelmesh.demo import write_demo_models

    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="mm-bench-"))
    etcd = EmbeddedEtcd(tmp / "etcd")
    results: dict = {"machine": {"cpus": os.cpu_count()}, "infer": {}}
    try:
        etcd.start()
        models = {m.model_type: m for m in write_demo_models(tmp / "models")}
        sk_path = str(models["sklearn"].path)
        mesh_port, bare_port = free_port(), free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "modelmesh", "serve", "--port", str(mesh_port),
             "--host", "127.0.0.1", "--metrics-port", "-1", "--http-port", "-1",
             "--etcd", etcd.endpoint,
             "--data-dir", str(tmp / "data"), "--models-root", str(tmp / "models"),
             "--capacity", "1GiB", "--log-level", "WARNING"], cwd=REPO))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", BARE_SERVER, str(bare_port), "sklearn",
             str(tmp / "models" / sk_path)], cwd=REPO, stdout=subprocess.DEVNULL))
        wait_port(mesh_port)
        wait_port(bare_port)
        from modelmesh._proto.mmesh import model_mesh_pb2 as mm
        from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc

        with grpc.insecure_channel(f"127.0.0.1:{mesh_port}") as ch:
            mm_grpc.ModelMeshStub(ch).registerModel(mm.RegisterModelRequest(
                modelId="iris", modelInfo=mm.ModelInfo(type="sklearn", path=sk_path),
                loadNow=True, sync=True), timeout=60)
        for c in [int(v) for v in args.concurrency.split(",")]:
            for name, port in (("bare", bare_port), ("mesh", mesh_port)):
                runs = [asyncio.run(drive(f"127.0.0.1:{port}", "iris", c, args.seconds))
                        for _ in range(3)]
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                results["infer"][f"{name}_c{c}"] = med
        results["registry"] = time_registration(f"127.0.0.1:{mesh_port}", args.models, sk_path)
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        etcd.stop()
    lines = ["| path | concurrency | req/s | p50 ms | p99 ms | vs bare req/s |",
             "|---|---|---|---|---|---|"]
    for key, r in results["infer"].items():
        name, c = key.rsplit("_c", 1)
        bare = results["infer"][f"bare_c{c}"]["requests_per_s"]
        lines.append(f"| {name} | {c} | {r['requests_per_s']:.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['requests_per_s'] / bare:.2f}x |")
    reg = results["registry"]
    lines.append("")
    lines.append(f"registerModels (bulk, 500 per call): {args.models} models in "
                 f"{reg['bulk_seconds']:.1f} s; registerModel one at a time (32 in flight): "
                 f"{reg['single_rpc_per_s']:.0f}/s; listModels over {reg['listed']} models: "
                 f"{reg['list_all_seconds']:.2f} s")
    print("\n".join(lines))
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving_core.json").write_text(json.dumps(results, indent=2))
    (out / "serving_core.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
