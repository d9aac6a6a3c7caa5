"""Mesh figures: forwarded vs local serving, and failover time after kill -9.

Starts a real etcd and three `modelmesh serve` instances (A, B, C) on one mesh.

1. Forwarding: a light model (scikit-learn LogisticRegression on iris) is
   loaded on B only. The unmodified tritonclient (asyncio) drives B directly
   (local path) and A (which forwards the request bytes to B), at each
   concurrency, three runs each; medians are reported with the ratio
   forwarded / local measured in the same run.
2. Failover: 30 models spread over the three instances; four client workers
   send requests through A (retrying only on UNAVAILABLE, as the issue allows);
   C is killed with SIGKILL. Reported: for each model C held, the time from the
   kill to its first successful response, the requests that failed after
   retries, and when C's record left etcd (its lease expiring).

    .venv/bin/python benchmarks/mesh.py [--seconds 4] [--concurrency 1,16]

Prints Markdown and writes benchmarks/results/mesh.{md,json}. Every process it
starts is stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serving_core import drive, wait_port  # noqa: E402

from modelmesh.registry.embedded import EmbeddedEtcd, free_port  # noqa: E402


def start_instance(tmp: Path, etcd: EmbeddedEtcd, name: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelmesh", "serve", "--port", str(port), "--host", "127.0.0.1",
         "--metrics-port", "-1", "--http-port", "-1", "--etcd", etcd.endpoint,
         "--mesh-name", "bench",
         "--instance-id", name, "--data-dir", str(tmp / f"data-{name}"),
         "--models-root", str(tmp / "models"), "--capacity", "1GiB", "--lease-ttl", "3",
         "--log-level", "WARNING"], cwd=REPO)
    return proc, port


def write_models(root: Path) -> None:
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    root.mkdir(parents=True, exist_ok=True)
    x, y = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=500).fit(x, y), root / "iris-lr.joblib")
    spec = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "memory_bytes": 1_000_000}
    (root / "fo.json").write_text(json.dumps(spec))


def mesh_stubs(port: int):
    from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc

    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    return ch, mm_grpc.ModelMeshStub(ch)


def forwarding(ports: dict[str, int], concurrencies: list[int], seconds: float) -> dict:
    from modelmesh._proto.mmesh import model_mesh_pb2 as mm

    ch, stub = mesh_stubs(ports["A"])
    stub.registerModel(mm.RegisterModelRequest(
        modelId="iris-lr", modelInfo=mm.ModelInfo(type="sklearn", path="iris-lr.joblib")),
        timeout=30)
    ch.close()
    ch, stub = mesh_stubs(ports["B"])
    stub.ensureLoaded(mm.EnsureLoadedRequest(modelId="iris-lr", sync=True),
                      metadata=[("mm-load-here", "1")], timeout=60)
    ch.close()
    time.sleep(0.5)  # the copy record reaching A's mirror
    out: dict = {}
    for c in concurrencies:
        for path, port in (("local", ports["B"]), ("forwarded", ports["A"])):
            runs = [asyncio.run(drive(f"127.0.0.1:{port}", "iris-lr", c, seconds))
                    for _ in range(3)]
            out[f"{path}_c{c}"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return out


def failover(procs: dict[str, subprocess.Popen], ports: dict[str, int]) -> dict:
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    from modelmesh._proto.mmesh import mesh_extensions_pb2 as ext
    from modelmesh._proto.mmesh import mesh_extensions_pb2_grpc as ext_grpc
    from modelmesh._proto.mmesh import model_mesh_pb2 as mm

    models = [f"fo-{i:02d}" for i in range(30)]
    ch = grpc.insecure_channel(f"127.0.0.1:{ports['A']}")
    ext_grpc.ModelMeshExtensionsStub(ch).registerModels(ext.RegisterModelsRequest(requests=[
        mm.RegisterModelRequest(modelId=m, modelInfo=mm.ModelInfo(type="identity", path="fo.json"))
        for m in models]), timeout=30)
    x = np.ones((1, 4), dtype=np.float32)

    def call(client, model: str) -> None:
        inp = triton.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        client.infer(model, [inp], client_timeout=30)

    with triton.InferenceServerClient(f"127.0.0.1:{ports['A']}") as client:
        for m in models:
            call(client, m)
    stub = mm.ModelStatusInfo
    from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc

    mstub = mm_grpc.ModelMeshStub(ch)
    on_c = [m for m in models if any(
        c.location == "C" and c.copyStatus == stub.LOADED
        for c in mstub.getModelStatus(mm.GetStatusRequest(modelId=m), timeout=10).modelCopyInfos)]

    log: list[tuple[float, str, bool, int]] = []  # (finished at, model, ok, client retries)
    stop = threading.Event()

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with triton.InferenceServerClient(f"127.0.0.1:{ports['A']}") as client:
            while not stop.is_set():
                model = models[int(rng.integers(len(models)))]
                ok, retries = False, 0
                for retries in range(6):  # noqa: B007 - read after the loop
                    try:
                        call(client, model)
                        ok = True
                        break
                    except InferenceServerException as exc:
                        if "UNAVAILABLE" not in str(exc.status()):
                            break
                        time.sleep(0.2)
                log.append((time.monotonic(), model, ok, retries))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    killed = time.monotonic()
    procs["C"].send_signal(signal.SIGKILL)
    procs["C"].wait()
    lease_gone = None
    ext_stub = ext_grpc.ModelMeshExtensionsStub(ch)
    while time.monotonic() - killed < 12:
        ids = {i.instanceId for i in ext_stub.clusterStatus(ext.ClusterStatusRequest(),
                                                            timeout=5).instances}
        if lease_gone is None and "C" not in ids:
            lease_gone = time.monotonic() - killed
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(30)
    ch.close()
    first_ok: dict[str, float] = {}
    for t, model, ok, _ in log:
        if ok and t > killed and model in on_c and model not in first_ok:
            first_ok[model] = t - killed
    after = [r for r in log if r[0] > killed]
    return {
        "models_on_killed_instance": len(on_c),
        "recovered": len(first_ok),
        "failover_seconds_max": max(first_ok.values()) if first_ok else None,
        "failover_seconds_median": statistics.median(first_ok.values()) if first_ok else None,
        "requests_after_kill": len(after),
        "failed_after_retries": sum(1 for r in after if not r[2]),
        "needed_client_retry": sum(1 for r in after if r[3] > 0),
        "record_gone_after_seconds": lease_gone,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--concurrency", default="1,16")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mm-bench-mesh-"))
    etcd = EmbeddedEtcd(tmp / "etcd")
    procs: dict[str, subprocess.Popen] = {}
    ports: dict[str, int] = {}
    results: dict = {"machine": {"cpus": os.cpu_count()}}
    try:
        etcd.start()
        write_models(tmp / "models")
        for name in "ABC":
            procs[name], ports[name] = start_instance(tmp, etcd, name)
        for port in ports.values():
            wait_port(port)
        results["forwarding"] = forwarding(
            ports, [int(c) for c in args.concurrency.split(",")], args.seconds)
        results["failover"] = failover(procs, ports)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        etcd.stop()
    fwd = results["forwarding"]
    lines = ["| path | concurrency | req/s | p50 ms | p99 ms | vs local req/s |",
             "|---|---|---|---|---|---|"]
    ratios = {}
    for key, r in fwd.items():
        path, c = key.rsplit("_c", 1)
        local = fwd[f"local_c{c}"]
        ratio = r["requests_per_s"] / local["requests_per_s"]
        if path == "forwarded":
            ratios[f"forward_vs_local_throughput_c{c}"] = round(ratio, 3)
            ratios[f"forward_minus_local_p50_ms_c{c}"] = round(r["p50_ms"] - local["p50_ms"], 3)
        lines.append(f"| {path} | {c} | {r['requests_per_s']:.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {ratio:.2f}x |")
    fo = results["failover"]
    results["ratios"] = ratios
    lines += ["", f"Failover after kill -9 of one of 3 instances (it held "
              f"{fo['models_on_killed_instance']} of 30 models): served again after "
              f"{fo['failover_seconds_median']:.2f} s median, {fo['failover_seconds_max']:.2f} s "
              f"max; {fo['failed_after_retries']} of {fo['requests_after_kill']} requests failed "
              f"after client retries on UNAVAILABLE ({fo['needed_client_retry']} needed one); "
              f"its record left etcd after {fo['record_gone_after_seconds']:.1f} s "
              "(lease TTL 3 s)."]
    print("\n".join(lines))
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "mesh.json").write_text(json.dumps(results, indent=2))
    (out / "mesh.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
