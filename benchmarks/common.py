"""What every benchmark shares: processes stopped by pid, a load driver, the models.

Each benchmark module exposes ``run(workdir: Path, quick: bool) -> dict`` and can be
run alone; ``benchmarks/suite.py`` (behind ``benchmarks/run``) runs them all in one
process tree and writes benchmarks/results/results.{md,json}.

Rules kept here so every figure is comparable:
- the load comes from the unmodified ``tritonclient.grpc`` (its asyncio client) in
  the benchmark process, servers run in child processes;
- a figure is the median over ``reps`` runs, and a headline is a ratio against a
  baseline measured in the same run;
- every process started goes through :class:`Processes`, which stops it by its pid
  (SIGTERM, then SIGKILL) also when the benchmark fails.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from modelmesh.registry.embedded import EmbeddedEtcd, free_port  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PYTHON = sys.executable


# ---------------------------------------------------------------- processes


@dataclass
class Processes:
    """Child processes of one benchmark; ``stop_all`` stops each by its pid.

    Use as a context manager: everything started inside is stopped on exit, also
    when an exception is on its way out.
    """

    started: list[subprocess.Popen] = field(default_factory=list)
    etcds: list[EmbeddedEtcd] = field(default_factory=list)

    def spawn(self, args: Sequence[str], log: Path | None = None, **kw: Any) -> subprocess.Popen:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - child owns it
        try:
            proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT,
                                    cwd=kw.pop("cwd", REPO), **kw)
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        self.started.append(proc)
        return proc

    def etcd(self, data_dir: Path) -> EmbeddedEtcd:
        server = EmbeddedEtcd(data_dir)
        self.etcds.append(server)
        server.start()
        return server

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)
        self.started.clear()
        for server in self.etcds:
            server.stop()
        self.etcds.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_v2_ready(endpoint: str, proc: subprocess.Popen | None = None,
                  timeout: float = 120, log: Path | None = None) -> None:
    """Wait until a V2 server at ``endpoint`` answers ServerLive (any answer but UNAVAILABLE)."""
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(endpoint) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
                raise RuntimeError(f"server for {endpoint} exited with {proc.returncode}\n{tail}")
            try:
                stub.ServerLive(pb.ServerLiveRequest(), timeout=1)
                return
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                    return  # it answers (a server may implement ModelInfer only)
            time.sleep(0.1)
    raise TimeoutError(f"no V2 server at {endpoint} after {timeout} s")


# ---------------------------------------------------------------- mesh instances


def start_mesh(procs: Processes, workdir: Path, etcd: EmbeddedEtcd, name: str,
               models_root: Path, capacity: str = "1GiB", mesh_name: str = "bench",
               extra: Sequence[str] = (), metrics: bool = False,
               env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, int | None]:
    """Start one ``modelmesh serve``; returns (process, endpoint, metrics port or None).

    REST is off (``--http-port -1``: instances would share the default port) unless
    ``extra`` names an ``--http-port``."""
    port = free_port()
    if "--http-port" not in extra:
        extra = [*extra, "--http-port", "-1"]
    metrics_port = free_port() if metrics else None
    log = workdir / f"mesh-{name}.log"
    proc = procs.spawn(
        [PYTHON, "-m", "modelmesh", "serve", "--port", str(port), "--host", "127.0.0.1",
         "--metrics-port", str(metrics_port if metrics_port else -1),
         "--etcd", etcd.endpoint, "--mesh-name", mesh_name, "--instance-id", name,
         "--data-dir", str(workdir / f"data-{name}"), "--models-root", str(models_root),
         "--capacity", capacity, "--log-level", os.environ.get("MM_BENCH_LOG", "WARNING"), *extra],
        log=log, env={**os.environ, **(env or {})})
    endpoint = f"127.0.0.1:{port}"
    wait_v2_ready(endpoint, proc, log=log)
    return proc, endpoint, metrics_port


def mesh_stub(endpoint: str) -> tuple[grpc.Channel, Any]:
    from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc

    ch = grpc.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", 64 << 20)])
    return ch, mm_grpc.ModelMeshStub(ch)


def extensions_stub(endpoint: str) -> tuple[grpc.Channel, Any]:
    from modelmesh._proto.mmesh import mesh_extensions_pb2_grpc as ext_grpc

    ch = grpc.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", 64 << 20)])
    return ch, ext_grpc.ModelMeshExtensionsStub(ch)


def register(endpoint: str, model_id: str, model_type: str, path: str,
             load_now: bool = False, metadata: Sequence[tuple[str, str]] = ()) -> None:
    from modelmesh._proto.mmesh import model_mesh_pb2 as mm

    ch, stub = mesh_stub(endpoint)
    with ch:
        stub.registerModel(mm.RegisterModelRequest(
            modelId=model_id, modelInfo=mm.ModelInfo(type=model_type, path=path),
            loadNow=load_now, sync=load_now), metadata=list(metadata), timeout=120)


def register_bulk(endpoint: str, models: Sequence[tuple[str, str, str]], batch: int = 500) -> None:
    """Register (id, type, path) triples through the registerModels extension."""
    from modelmesh._proto.mmesh import mesh_extensions_pb2 as ext
    from modelmesh._proto.mmesh import model_mesh_pb2 as mm

    ch, stub = extensions_stub(endpoint)
    with ch:
        for start in range(0, len(models), batch):
            reqs = [mm.RegisterModelRequest(modelId=i, modelInfo=mm.ModelInfo(type=t, path=p))
                    for i, t, p in models[start:start + batch]]
            res = stub.registerModels(ext.RegisterModelsRequest(requests=reqs), timeout=120)
            bad = [r for r in res.results if r.code != 0]
            if bad:
                raise RuntimeError(f"registerModels refused {len(bad)}: {bad[0]}")


def load_here(endpoint: str, model_id: str) -> None:
    """Load a model on the instance at ``endpoint`` and wait for it."""
    from modelmesh._proto.mmesh import model_mesh_pb2 as mm

    ch, stub = mesh_stub(endpoint)
    with ch:
        stub.ensureLoaded(mm.EnsureLoadedRequest(modelId=model_id, sync=True),
                          metadata=[("mm-load-here", "1")], timeout=120)


def scrape(metrics_port: int, name: str) -> float:
    """Sum of a Prometheus metric's samples (all label sets) on localhost."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class BenchModel:
    """A model file written for the benchmarks, and how to call it."""

    name: str
    model_type: str  # the mesh's type name
    path: Path  # absolute
    input_name: str
    input: np.ndarray  # one request's input tensor (FP32)


def write_bench_models(root: Path) -> dict[str, BenchModel]:
    """A light scikit-learn model (LogisticRegression on iris) and the demo ONNX model.

    Light on purpose: with a ~2 ms model (a random forest) every server is model-bound
    and the serving overhead we want to compare disappears in the noise.
    """
    import joblib
    from sklearn.linear_model import LogisticRegression

    from modelmesh.demo import ONNX_INPUT, demo_input, iris, write_demo_models

    root.mkdir(parents=True, exist_ok=True)
    x, y = iris()
    joblib.dump(LogisticRegression(max_iter=1000).fit(x, y), root / "iris-lr.joblib")
    demo = {m.model_type: m for m in write_demo_models(root / "demo")}
    one = demo_input(1).astype(np.float32)
    return {
        "sklearn": BenchModel("iris-lr", "sklearn", root / "iris-lr.joblib", "input-0", one),
        "onnx": BenchModel("iris-onnx", "onnx", root / "demo" / demo["onnx"].path,
                           ONNX_INPUT, one),
    }


# ---------------------------------------------------------------- load


async def drive(endpoint: str, model: str | Callable[[], str],
                inputs: Sequence[tuple[str, np.ndarray]],
                concurrency: int, seconds: float, warmup: int = 50,
                headers: dict[str, str] | None = None,
                outputs: Sequence[str] = (),
                client_options: dict[str, Any] | None = None) -> dict[str, float]:
    """Closed-loop load: ``concurrency`` callers, each sends its next request on an answer.

    Uses the unmodified tritonclient asyncio client over one channel, as a user would.
    ``model`` is a model name, or a function choosing the model of each request;
    ``client_options`` go to the client (e.g. ``ssl``, ``root_certificates``).
    """
    import tritonclient.grpc.aio as tc

    pick = model if callable(model) else lambda: model

    client = tc.InferenceServerClient(endpoint, **(client_options or {}))
    infer_inputs = []
    for name, arr in inputs:
        inp = tc.InferInput(name, list(arr.shape), _v2_type(arr))
        inp.set_data_from_numpy(arr)
        infer_inputs.append(inp)
    wanted = [tc.InferRequestedOutput(name) for name in outputs] or None
    try:
        for _ in range(warmup):
            await client.infer(pick(), infer_inputs, outputs=wanted, headers=headers)
        # Out of the collector's reach before timing: a full collection of this process
        # (the harness, with its results so far) took up to 75 ms under churn, a stall
        # every server's p99 would have shown.
        gc.collect()
        gc.freeze()
        latencies: list[float] = []
        errors = 0
        stop_at = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                name = pick()
                t0 = time.perf_counter()
                try:
                    await client.infer(name, infer_inputs, outputs=wanted, headers=headers)
                except Exception:  # noqa: BLE001 - counted and reported, never hidden
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    finally:
        await client.close()
    return {**latency_summary(latencies, elapsed), "errors": errors}


def latency_summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    if not latencies:
        return {"requests_per_s": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"),
                "requests": 0}
    lat = sorted(latencies)
    return {
        "requests_per_s": len(lat) / elapsed,
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
        "requests": len(lat),
    }


def _v2_type(arr: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return str(np_to_triton_dtype(arr.dtype))


def median_of(runs: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Median of each numeric field over repeated runs; the runs themselves kept under 'runs'."""
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["runs"] = [dict(r) for r in runs]
    return out


def repeat(fn: Callable[[], dict[str, float]], reps: int) -> dict[str, Any]:
    return median_of([fn() for _ in range(reps)])


def write_result(name: str, result: dict, markdown: str) -> None:
    """Write benchmarks/results/<name>.{json,md}."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")


def machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "load_avg": os.getloadavg()}
