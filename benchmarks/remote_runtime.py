"""Remote-runtime figures: ModelInfer throughput, embedded runtime vs `modelmesh runtime`.

Starts a real etcd, one `modelmesh runtime` on a unix socket and one on TCP,
and three `modelmesh serve` instances: one with the embedded runtime, one per
runtime (`--runtime mmesh:unix:...`, `--runtime mmesh:HOST:PORT`). The same
light model (a scikit-learn LogisticRegression on iris, so that the data
plane, not the model, dominates) is registered on each, and the unmodified
tritonclient (asyncio client, in this process; every server is its own
process) drives each path at concurrency 1 and 16. The TCP runtime is also
driven directly (no mesh), as the floor of the remote path. Runs are
interleaved (round-robin over the paths, 3 rounds) and the median of the 3
is reported.

    .venv/bin/python benchmarks/remote_runtime.py [--seconds 5] [--concurrency 1,16]

Prints a Markdown table and writes benchmarks/results/remote_runtime.{md,json}.
Every process it starts is stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serving_core import drive, wait_port  # noqa: E402

from modelmesh.registry.embedded import EmbeddedEtcd, free_port  # noqa: E402

MODEL = "lr"


def write_model(root: Path) -> str:
    import joblib
    from sklearn.linear_model import LogisticRegression

    from modelmesh.demo import iris

    x, y = iris()
    (root / "lr").mkdir(parents=True, exist_ok=True)
    joblib.dump(LogisticRegression(max_iter=1000).fit(x, y), root / "lr" / "model.joblib")
    return "lr/model.joblib"


def wait_socket(path: Path, timeout: float = 60) -> None:
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"unix:{path}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        while time.monotonic() < deadline:
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise TimeoutError(f"runtime at unix:{path} not serving")


def register(port: int, path: str) -> None:
    from modelmesh._proto.mmesh import model_mesh_pb2 as mm
    from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        info = mm_grpc.ModelMeshStub(ch).registerModel(mm.RegisterModelRequest(
            modelId=MODEL, modelInfo=mm.ModelInfo(type="sklearn", path=path),
            loadNow=True, sync=True), timeout=60)
    if info.status != mm.ModelStatusInfo.LOADED:
        raise RuntimeError(f"{MODEL} did not load on port {port}: {list(info.errors)}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    concurrencies = [int(v) for v in args.concurrency.split(",")]

    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="mm-bench-rt-", dir="/tmp"))
    etcd = EmbeddedEtcd(tmp / "etcd")
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": os.getloadavg()},
        "model": "sklearn LogisticRegression (iris), 1 row of 4 FP32 features per request",
        "seconds_per_run": args.seconds, "rounds": args.rounds, "infer": {}, "runs": {},
    }
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    try:
        etcd.start()
        models = tmp / "models"
        path = write_model(models)
        sock = tmp / "rt.sock"
        rt_tcp = free_port()
        for listen in (f"unix:{sock}", f"127.0.0.1:{rt_tcp}"):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "modelmesh", "runtime", "--listen", listen,
                 "--models-root", str(models), "--log-level", "WARNING"], cwd=REPO, **quiet))
        wait_socket(sock)
        wait_port(rt_tcp)
        ports = {"embedded": free_port(), "remote-unix": free_port(), "remote-tcp": free_port()}
        runtime_flag = {"embedded": [], "remote-unix": ["--runtime", f"mmesh:unix:{sock}"],
                        "remote-tcp": ["--runtime", f"mmesh:127.0.0.1:{rt_tcp}"]}
        for name, port in ports.items():
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "modelmesh", "serve", "--port", str(port),
                 "--host", "127.0.0.1", "--metrics-port", "-1", "--http-port", "-1",
                 "--etcd", etcd.endpoint,
                 "--mesh-name", name, "--data-dir", str(tmp / f"data-{name}"),
                 "--models-root", str(models), "--capacity", "1GiB", "--log-level", "WARNING",
                 *runtime_flag[name]], cwd=REPO, **quiet))
        for port in ports.values():
            wait_port(port)
            register(port, path)
        # The TCP runtime has "lr" loaded (by its mesh): drive it directly too.
        endpoints = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
        endpoints["runtime-direct-tcp"] = f"127.0.0.1:{rt_tcp}"

        runs: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            for c in concurrencies:
                for name, endpoint in endpoints.items():
                    r = asyncio.run(drive(endpoint, MODEL, c, args.seconds))
                    runs.setdefault(f"{name}_c{c}", []).append(r)
        for key, rs in runs.items():
            results["infer"][key] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            results["runs"][key] = [round(r["requests_per_s"], 1) for r in rs]
        results["machine"]["loadavg_after"] = os.getloadavg()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [f"| path | concurrency | req/s (median of {args.rounds}) | p50 ms | p99 ms | "
             "vs embedded |",
             "|---|---|---|---|---|---|"]
    for c in concurrencies:
        base = results["infer"][f"embedded_c{c}"]["requests_per_s"]
        for name in endpoints:
            r = results["infer"][f"{name}_c{c}"]
            lines.append(f"| {name} | {c} | {r['requests_per_s']:.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['requests_per_s'] / base:.2f}x |")
    m = results["machine"]
    lines += ["", f"{m['cpus']} CPUs shared by client, meshes and runtimes; load average "
              f"{m['loadavg_before'][0]:.1f} before, {m['loadavg_after'][0]:.1f} after. "
              f"Runs of {args.seconds:g} s; per-run req/s in the JSON."]
    print("\n".join(lines))
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "remote_runtime.json").write_text(json.dumps(results, indent=2))
    (out / "remote_runtime.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
