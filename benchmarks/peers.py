"""The peers of the data-plane benchmark: MLServer and KServe's Python ModelServer.

Both serve the benchmark models (``write_bench_models``) under the same names as the
mesh, over KServe V2 gRPC, so ``drive(endpoint, model.name, ...)`` runs unchanged
against any of them. Each lives in its own virtualenv (scripts/setup-mlserver,
scripts/setup-kserve): their protobuf stubs and pins cannot share a process with
tritonclient's, so this module never imports mlserver or kserve, it starts them.

What a benchmark author must know:
- MLServer 1.7.1 runs with ``parallel_workers: 0`` (its worker processes crash with the
  newest uvloop), which is also its fastest setting for one process (no IPC hop);
  ``debug`` off (no access log) and the metrics endpoint off (no Prometheus interceptor).
  scikit-learn: the stock ``mlserver_sklearn.SKLearnModel``, output ``predict`` INT64
  [N, 1]; ONNX: ``peer_servers/mlserver_onnx.py``, outputs ``label`` INT64 [N, 1] and
  ``probabilities`` FP32 [N, 3] (MLServer's codec turns a [N] output into [N, 1]).
- KServe: ``peer_servers/kserve_server.py`` (one worker, synchronous predict, latency
  log and INFO logs off); outputs ``predict`` INT64 [N] or ``label`` INT64 [N] and
  ``probabilities`` FP32 [N, 3]. KServe binds its ports on all interfaces (no host flag).
- Both honour requested outputs; compare results by value (shapes differ as above).

Run alone for a self-check (both peers x both models: one prediction checked against
the model's own, then 2 s of load at concurrency 1 and 16):

    .venv/bin/python benchmarks/peers.py
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from common import REPO, BenchModel, Processes, drive, free_port, write_bench_models

MLSERVER_VENV = REPO / ".venv-mlserver"
KSERVE_VENV = REPO / ".venv-kserve"
PEER_SERVERS = REPO / "benchmarks" / "peer_servers"
SETUP_TIMEOUT = 1800
START_TIMEOUT = 120.0

#: BenchModel.model_type -> MLServer runtime class.
MLSERVER_RUNTIMES = {"sklearn": "mlserver_sklearn.SKLearnModel",
                     "onnx": "mlserver_onnx.OnnxModel"}

#: BenchModel.model_type -> the output every server names the same (the class label).
LABEL_OUTPUT = {"sklearn": "predict", "onnx": "label"}


# ---------------------------------------------------------------- environments


def ensure_peer_venvs() -> dict[str, str]:
    """Make (or keep: the scripts are idempotent) both peer venvs; their versions."""
    _run_setup("setup-mlserver")
    _run_setup("setup-kserve")
    return {"mlserver": _version(MLSERVER_VENV, "mlserver"),
            "kserve": _version(KSERVE_VENV, "kserve")}


def _run_setup(script: str) -> None:
    done = subprocess.run([str(REPO / "scripts" / script)], cwd=REPO, capture_output=True,
                          text=True, timeout=SETUP_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/{script} failed ({done.returncode}):\n"
                           f"{done.stderr[-4000:]}")


def _version(venv: Path, dist: str) -> str:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def _peer_env(pythonpath: Path | None = None) -> dict[str, str]:
    """Our environment minus what points into .venv (a peer must see only its own venv)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


# ---------------------------------------------------------------- servers


def start_mlserver(procs: Processes, workdir: Path, model: BenchModel) -> str:
    """MLServer serving ``model`` as ``model.name``; its gRPC endpoint once the model is ready."""
    return start_mlserver_both(procs, workdir, model)[0]


def start_mlserver_both(procs: Processes, workdir: Path, model: BenchModel) -> tuple[str, int]:
    """MLServer serving ``model``: (gRPC endpoint, REST port), once the model is ready."""
    repository = workdir / f"mlserver-{model.name}"
    (repository / model.name).mkdir(parents=True, exist_ok=True)
    grpc_port, http_port = free_port(), free_port()
    (repository / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port,
        "metrics_port": free_port(), "metrics_endpoint": None,
        "parallel_workers": 0, "load_models_at_startup": True, "debug": False,
    }))
    (repository / model.name / "model-settings.json").write_text(json.dumps({
        "name": model.name, "implementation": MLSERVER_RUNTIMES[model.model_type],
        "parameters": {"uri": str(model.path)},
    }))
    log = workdir / f"mlserver-{model.name}.log"
    proc = procs.spawn([str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(repository)],
                       log=log, cwd=repository, env=_peer_env(PEER_SERVERS))
    endpoint = f"127.0.0.1:{grpc_port}"
    wait_model_ready(endpoint, model.name, proc, log)
    return endpoint, http_port


def start_kserve(procs: Processes, workdir: Path, model: BenchModel) -> str:
    """KServe's ModelServer serving ``model`` as ``model.name``; its gRPC endpoint once ready."""
    return start_kserve_both(procs, workdir, model)[0]


def start_kserve_both(procs: Processes, workdir: Path, model: BenchModel) -> tuple[str, int]:
    """KServe's ModelServer serving ``model``: (gRPC endpoint, REST port), once ready."""
    grpc_port, http_port = free_port(), free_port()
    log = workdir / f"kserve-{model.name}.log"
    proc = procs.spawn(
        [str(KSERVE_VENV / "bin" / "python"), str(PEER_SERVERS / "kserve_server.py"),
         "--model_name", model.name, "--model_type", model.model_type,
         "--model_path", str(model.path), "--grpc_port", str(grpc_port),
         "--http_port", str(http_port)],
        log=log, cwd=workdir, env=_peer_env())
    endpoint = f"127.0.0.1:{grpc_port}"
    wait_model_ready(endpoint, model.name, proc, log)
    return endpoint, http_port


def wait_model_ready(endpoint: str, name: str, proc: subprocess.Popen, log: Path,
                     timeout: float = START_TIMEOUT) -> None:
    """Until V2 ModelReady says true for ``name``: a live server may still be loading."""
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(endpoint) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server for {name} at {endpoint} exited with "
                                   f"{proc.returncode}\n{_tail(log)}")
            try:
                if stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass  # not listening yet, or the model is not registered yet
            time.sleep(0.1)
    raise TimeoutError(f"{name} not ready at {endpoint} after {timeout} s\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


# ---------------------------------------------------------------- self-check


def expected_labels(model: BenchModel, x: np.ndarray) -> np.ndarray:
    """The model's own prediction in this process: what every peer must answer."""
    if model.model_type == "sklearn":
        import joblib

        return np.asarray(joblib.load(model.path).predict(x))
    import onnxruntime as ort

    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["label"], {model.input_name: x})[0])


def check_prediction(endpoint: str, model: BenchModel, x: np.ndarray) -> None:
    """One tritonclient infer, all outputs and the label alone; labels compared by value."""
    import tritonclient.grpc as tc

    want = expected_labels(model, x)
    name = LABEL_OUTPUT[model.model_type]
    client = tc.InferenceServerClient(endpoint)
    try:
        inp = tc.InferInput(model.input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        for outputs in (None, [tc.InferRequestedOutput(name)]):
            got = client.infer(model.name, [inp], outputs=outputs).as_numpy(name)
            if got is None or not np.array_equal(got.reshape(-1), want.reshape(-1)):
                raise AssertionError(f"{model.name} at {endpoint}: {got} != {want}")
    finally:
        client.close()


def self_check(seconds: float = 2.0) -> None:
    from modelmesh.demo import demo_input

    print("peer versions:", ensure_peer_venvs(), flush=True)
    starters: dict[str, Callable[[Processes, Path, BenchModel], str]] = {
        "mlserver": start_mlserver, "kserve": start_kserve}
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        workdir = Path(tmp)
        models = write_bench_models(workdir / "models")
        for peer, start in starters.items():
            for kind, model in models.items():
                with Processes() as procs:  # one server at a time: nothing else competes
                    t0 = time.monotonic()
                    endpoint = start(procs, workdir, model)
                    startup = time.monotonic() - t0
                    check_prediction(endpoint, model, demo_input(5))
                    print(f"{peer:8} {kind:7} ready in {startup:4.1f} s, prediction ok",
                          flush=True)
                    for c in (1, 16):
                        r = asyncio.run(drive(endpoint, model.name,
                                              [(model.input_name, model.input)], c, seconds,
                                              outputs=[LABEL_OUTPUT[kind]]))
                        print(f"{peer:8} {kind:7} c={c:<3} {r['requests_per_s']:7.0f} req/s  "
                              f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                              f"errors {r['errors']:.0f}", flush=True)
                        if r["errors"]:
                            raise AssertionError(f"{peer} {kind}: {r['errors']} errors")


if __name__ == "__main__":
    self_check(float(sys.argv[1]) if len(sys.argv) > 1 else 2.0)
