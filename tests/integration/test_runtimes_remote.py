"""Remote runtimes: `modelmesh runtime` (unix socket and TCP) and a real MLServer.

The same models are registered on a mesh with the embedded runtime, on meshes
whose runtime is a `modelmesh runtime` process, and on a mesh driving MLServer
through its model-repository API; every one must give the same predictions.
MLServer lives in its own virtual environment (scripts/setup-mlserver, run by
the `mlserver_bin` fixture): its protobuf stubs cannot share a process with
tritonclient's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from modelmesh._proto.mmesh import mesh_extensions_pb2 as ext
from modelmesh._proto.mmesh import mesh_extensions_pb2_grpc as ext_grpc
from modelmesh._proto.mmesh import model_mesh_pb2 as mm
from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc
from modelmesh._proto.mmesh import model_runtime_pb2 as rt
from modelmesh._proto.mmesh import model_runtime_pb2_grpc as rt_grpc
from modelmesh.demo import iris
from modelmesh.registry.embedded import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent.parent
ST = mm.ModelStatusInfo
MIB = 1 << 20

#: model id -> (type, path under the models root, input name)
MODELS = {
    "iris-sklearn": ("sklearn", "iris-sklearn/model.joblib", "input-0"),
    "iris-xgboost": ("xgboost", "iris-xgboost/model.json", "input-0"),
    "iris-lightgbm": ("lightgbm", "iris-lightgbm/model.txt", "input-0"),
    "iris-onnx": ("onnx", "iris-onnx/model.onnx", "input"),
    "torch-tiny": ("torchscript", "torch-tiny/model.pt", "features"),
}


# --------------------------------------------------------------------------- processes


@dataclass
class RuntimeProcess:
    """A `modelmesh runtime` child process."""

    listen: str
    models_root: Path
    log_path: Path
    capacity: str = "300MiB"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        """The gRPC target: ``--listen`` is already one (``unix:PATH`` or ``HOST:PORT``)."""
        return self.listen

    def start(self, timeout: float = 30.0) -> RuntimeProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelmesh", "runtime", "--listen", self.listen,
             "--models-root", str(self.models_root), "--capacity", self.capacity,
             "--max-concurrent-loads", "3", "--load-timeout", "45"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        wait_v2_ready(self.target, timeout, self.proc, self.log)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode


def wait_v2_ready(target: str, timeout: float, proc: subprocess.Popen[bytes], log) -> None:
    """Until the V2 server at ``target`` says ready (ServerReady, not runtimeStatus:
    runtimeStatus unloads every model)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log()}")
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{target} not ready in {timeout}s:\n{log()}")


@pytest.fixture(scope="module")
def socket_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~107 bytes: pytest's tmp paths can be longer.
    path = Path(tempfile.mkdtemp(prefix="mm-rt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def torch_model(models_root: Path) -> Path:
    """A small scripted module (linear + softmax, [N, 4] -> [N, 3]) in the models root."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.linear(features), dim=1)

    path = models_root / MODELS["torch-tiny"][1]
    path.parent.mkdir(exist_ok=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Tiny()), str(path))
    return path


@pytest.fixture(scope="module")
def runtimes(models_root, socket_dir, tmp_path_factory, demo_models, torch_model):
    logs = tmp_path_factory.mktemp("runtimes")
    started = {
        "unix": RuntimeProcess(f"unix:{socket_dir}/rt.sock", models_root, logs / "unix.log",
                               capacity="300MiB"),
        "tcp": RuntimeProcess(f"127.0.0.1:{free_port()}", models_root, logs / "tcp.log",
                              capacity="200MiB"),
    }
    try:
        for r in started.values():
            r.start()
        yield started
    finally:
        for r in started.values():
            r.stop()


@pytest.fixture(scope="module")
def meshes(module_mesh_factory, etcd_server, runtimes):
    return {
        "embedded": module_mesh_factory(etcd=etcd_server),
        "unix": module_mesh_factory("--runtime", f"mmesh:{runtimes['unix'].listen}",
                                    etcd=etcd_server),
        "tcp": module_mesh_factory("--runtime", f"mmesh:{runtimes['tcp'].listen}",
                                   etcd=etcd_server),
    }


# --------------------------------------------------------------------------- MLServer


@pytest.fixture(scope="session")
def mlserver_bin() -> Path:
    """MLServer in .venv-mlserver, installed by scripts/setup-mlserver (cached by a marker)."""
    done = subprocess.run([str(REPO / "scripts" / "setup-mlserver")], cwd=REPO,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, f"scripts/setup-mlserver failed:\n{done.stderr[-4000:]}"
    return REPO / ".venv-mlserver" / "bin" / "mlserver"


@dataclass
class MLServerProcess:
    repository: Path
    grpc_port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@pytest.fixture(scope="module")
def mlserver(mlserver_bin, tmp_path_factory) -> Iterator[MLServerProcess]:
    repository = tmp_path_factory.mktemp("mlserver-repo")
    grpc_port = free_port()
    (repository / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": free_port(), "grpc_port": grpc_port,
        "metrics_port": free_port(), "metrics_endpoint": None,
        # MLServer 1.7.1's worker processes crash at start-up with new uvloop versions.
        "parallel_workers": 0,
        "load_models_at_startup": False, "debug": False,
    }))
    log_path = repository.parent / "mlserver.log"
    with open(log_path, "ab") as log:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        proc = subprocess.Popen([str(mlserver_bin), "start", str(repository)], cwd=repository,
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    server = MLServerProcess(repository, grpc_port, proc, log_path)
    try:
        wait_v2_ready(f"127.0.0.1:{grpc_port}", 90, proc, server.log)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def mlserver_mesh(module_mesh_factory, etcd_server, mlserver):
    return module_mesh_factory("--runtime", f"mlserver:127.0.0.1:{mlserver.grpc_port}",
                               "--runtime-repository", str(mlserver.repository),
                               etcd=etcd_server)


# --------------------------------------------------------------------------- helpers


def register(mesh, model_id: str, model_type: str | None = None, path: str | None = None):
    m_type, m_path, _ = MODELS.get(model_id, (None, None, None))
    with grpc.insecure_channel(mesh.endpoint) as ch:
        return mm_grpc.ModelMeshStub(ch).registerModel(mm.RegisterModelRequest(
            modelId=model_id, modelInfo=mm.ModelInfo(type=model_type or m_type,
                                                     path=path or m_path),
            loadNow=True, sync=True), timeout=90)


def status(mesh, model_id: str):
    with grpc.insecure_channel(mesh.endpoint) as ch:
        return mm_grpc.ModelMeshStub(ch).getModelStatus(mm.GetStatusRequest(modelId=model_id),
                                                        timeout=30)


def infer(mesh, model_id: str, x: np.ndarray, outputs: list[str] | None = None
          ) -> dict[str, np.ndarray]:
    name = MODELS[model_id][2]
    client = triton.InferenceServerClient(mesh.endpoint)
    try:
        inp = triton.InferInput(name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        wanted = [triton.InferRequestedOutput(o) for o in outputs] if outputs else None
        result = client.infer(model_id, [inp], outputs=wanted, client_timeout=60)
        return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
    finally:
        client.close()


def features() -> np.ndarray:
    return iris()[0].astype(np.float32)  # all 150 rows


# --------------------------------------------------------------------------- same predictions


@pytest.mark.parametrize("model_id", list(MODELS))
@pytest.mark.parametrize("remote", ["unix", "tcp"])
def test_modelmesh_runtime_gives_the_embedded_predictions(meshes, remote, model_id):
    for name in ("embedded", remote):
        st = register(meshes[name], model_id)
        assert ST.ModelStatus.Name(st.status) == "LOADED", (name, list(st.errors))
    x = features()
    want = infer(meshes["embedded"], model_id, x)
    for _ in range(2):  # the first may take another path than the next (cold vs loaded)
        got = infer(meshes[remote], model_id, x)
        assert list(got) == list(want)
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_metadata_comes_from_the_runtime(meshes):
    register(meshes["unix"], "iris-sklearn")
    register(meshes["embedded"], "iris-sklearn")
    metas = []
    for name in ("embedded", "unix"):
        client = triton.InferenceServerClient(meshes[name].endpoint)
        meta = client.get_model_metadata("iris-sklearn")
        metas.append(([(t.name, t.datatype, list(t.shape)) for t in meta.inputs],
                      [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]))
        client.close()
    assert metas[0] == metas[1]


@pytest.mark.parametrize("model_id", ["iris-sklearn", "iris-xgboost", "iris-lightgbm"])
def test_mlserver_gives_the_embedded_and_runtime_predictions(meshes, mlserver_mesh, model_id):
    """One model set, three runtimes: embedded, `modelmesh runtime`, MLServer."""
    for mesh in (meshes["embedded"], meshes["unix"], mlserver_mesh):
        st = register(mesh, model_id)
        assert ST.ModelStatus.Name(st.status) == "LOADED", list(st.errors)
    x = features()
    embedded = infer(meshes["embedded"], model_id, x)
    runtime = infer(meshes["unix"], model_id, x)
    np.testing.assert_array_equal(runtime["predict"], embedded["predict"])
    served = infer(mlserver_mesh, model_id, x)
    # MLServer names its outputs its own way: the class label as "predict" [N, 1] for
    # scikit-learn and XGBoost, LightGBM's native probabilities as "predict" [N, 3].
    if model_id == "iris-lightgbm":
        np.testing.assert_allclose(served["predict"], embedded["predict_proba"], rtol=1e-12)
        np.testing.assert_array_equal(np.argmax(served["predict"], axis=1), embedded["predict"])
    else:
        np.testing.assert_array_equal(served["predict"].reshape(-1), embedded["predict"])
    if model_id == "iris-sklearn":  # requested outputs reach MLServer (raw passthrough)
        proba = infer(mlserver_mesh, model_id, x, outputs=["predict_proba"])
        np.testing.assert_allclose(proba["predict_proba"], embedded["predict_proba"],
                                   rtol=1e-12)


def test_mlserver_repository_and_unload(mlserver_mesh, mlserver):
    register(mlserver_mesh, "iris-xgboost")
    model_dir = mlserver.repository / "iris-xgboost"
    settings = json.loads((model_dir / "model-settings.json").read_text())
    assert settings["implementation"] == "mlserver_xgboost.XGBoostModel"
    with grpc.insecure_channel(mlserver_mesh.endpoint) as ch:
        mm_grpc.ModelMeshStub(ch).unregisterModel(
            mm.UnregisterModelRequest(modelId="iris-xgboost"), timeout=30)
    deadline = time.monotonic() + 15
    while model_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not model_dir.exists()
    with grpc.insecure_channel(f"127.0.0.1:{mlserver.grpc_port}") as ch:
        index = pb_grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(
            pb.RepositoryIndexRequest(), timeout=10)
    states = {m.name: m.state for m in index.models}
    assert "READY" not in states.get("iris-xgboost", "")


def test_mlserver_unsupported_type_fails_with_the_reason(mlserver_mesh):
    st = register(mlserver_mesh, "iris-onnx")
    assert ST.ModelStatus.Name(st.status) == "LOADING_FAILED"
    assert "MLServer has no runtime here for model type 'onnx'" in " ".join(st.errors)


# --------------------------------------------------------------------------- limits and failures


def test_runtime_status_sets_the_instance_capacity(meshes):
    with grpc.insecure_channel(meshes["unix"].endpoint) as ch:
        cluster = ext_grpc.ModelMeshExtensionsStub(ch).clusterStatus(
            ext.ClusterStatusRequest(), timeout=10)
    by_id = {i.instanceId: i for i in cluster.instances}
    me = by_id[f"test-{meshes['unix'].port}"]
    assert me.capacityBytes == 300 * MIB  # the runtime's --capacity, not the mesh's 256MiB
    url = f"http://127.0.0.1:{meshes['tcp'].metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    line = next(ln for ln in text.splitlines()
                if ln.startswith("modelmesh_instance_capacity_bytes"))
    assert float(line.split()[-1]) == 200 * MIB


def test_bad_model_fails_with_the_runtime_reason_and_others_serve(meshes):
    register(meshes["unix"], "iris-sklearn")
    st = register(meshes["unix"], "bad-sklearn", "sklearn", "iris-xgboost/model.json")
    assert ST.ModelStatus.Name(st.status) == "LOADING_FAILED"
    assert "is not a joblib or pickle file" in " ".join(st.errors)
    assert infer(meshes["unix"], "iris-sklearn", features())["predict"].shape == (150,)


def test_runtime_down_is_unavailable_and_recovers(mesh_factory, etcd_server, models_root,
                                                  socket_dir, tmp_path):
    runtime = RuntimeProcess(f"unix:{socket_dir}/down.sock", models_root, tmp_path / "rt.log")
    runtime.start()
    try:
        mesh = mesh_factory("--runtime", f"mmesh:{runtime.listen}", "--load-failure-ttl", "1",
                            etcd=etcd_server)
        assert ST.ModelStatus.Name(register(mesh, "iris-sklearn").status) == "LOADED"
        runtime.stop(signal.SIGKILL)

        with pytest.raises(InferenceServerException) as info:
            infer(mesh, "iris-sklearn", features())
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        assert "runtime mmesh:unix:" in info.value.message()
        assert "is unavailable" in info.value.message()
        st = register(mesh, "iris-lightgbm")
        assert ST.ModelStatus.Name(st.status) == "LOADING_FAILED"
        assert "is unavailable" in " ".join(st.errors)
        # The mesh itself keeps answering.
        assert ST.ModelStatus.Name(status(mesh, "iris-sklearn").status) == "LOADED"

        runtime.start()  # same socket, no models: the mesh loads them again on demand
        deadline = time.monotonic() + 15
        while True:
            try:
                got = infer(mesh, "iris-sklearn", features())
                break
            except InferenceServerException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        assert got["predict"].shape == (150,)
        time.sleep(1.1)  # past --load-failure-ttl: the failed model may load again
        with grpc.insecure_channel(mesh.endpoint) as ch:
            st = mm_grpc.ModelMeshStub(ch).ensureLoaded(
                mm.EnsureLoadedRequest(modelId="iris-lightgbm", sync=True), timeout=60)
        assert ST.ModelStatus.Name(st.status) == "LOADED", list(st.errors)
    finally:
        runtime.stop()


def test_mesh_does_not_start_without_its_runtime(mesh_factory, etcd_server, socket_dir):
    mesh = mesh_factory("--runtime", f"mmesh:unix:{socket_dir}/nobody.sock",
                        "--load-timeout", "2", etcd=etcd_server, start=False)
    with pytest.raises(RuntimeError, match="exited early") as info:
        mesh.start(timeout=30)
    assert "not ready within 2s" in str(info.value)


# --------------------------------------------------------------------------- the runtime SPI


@pytest.fixture
def spi_runtime(models_root, socket_dir, tmp_path, torch_model) -> Iterator[RuntimeProcess]:
    runtime = RuntimeProcess(f"unix:{socket_dir}/spi.sock", models_root, tmp_path / "rt.log",
                             capacity="64MiB")
    runtime.start()
    yield runtime
    runtime.stop()


def test_runtime_spi(spi_runtime, models_root):
    from modelmesh.runtimes import get_runtime

    with grpc.insecure_channel(spi_runtime.target) as ch:
        spi = rt_grpc.ModelRuntimeStub(ch)
        v2 = pb_grpc.GRPCInferenceServiceStub(ch)
        status = spi.runtimeStatus(rt.RuntimeStatusRequest(), timeout=10)
        assert status.status == rt.RuntimeStatusResponse.READY
        assert (status.capacityInBytes, status.maxLoadingConcurrency,
                status.modelLoadingTimeoutMs, status.defaultModelSizeInBytes) == \
            (64 * MIB, 3, 45_000, MIB)
        path = MODELS["iris-sklearn"][1]
        predicted = spi.predictModelSize(rt.PredictModelSizeRequest(
            modelId="a", modelType="sklearn", modelPath=path), timeout=10).sizeInBytes
        assert predicted == get_runtime("sklearn").predict_size(models_root / path)

        # Concurrent loads of one model share one load.
        request = rt.LoadModelRequest(modelId="a", modelType="sklearn", modelPath=path)
        with ThreadPoolExecutor(4) as pool:
            sizes = list(pool.map(lambda _: spi.loadModel(request, timeout=30).sizeInBytes,
                                  range(4)))
        assert len(set(sizes)) == 1 and sizes[0] > 0
        assert spi_runtime.log().count("model loaded: a ") == 1
        assert spi.modelSize(rt.ModelSizeRequest(modelId="a"), timeout=10).sizeInBytes == sizes[0]

        x = features()[:3]
        req = pb.ModelInferRequest(model_name="not-a-model-here")
        inp = req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        inp.contents.fp32_contents.extend(x.ravel().tolist())
        by_header = v2.ModelInfer(req, metadata=(("mm-model-id", "a"),), timeout=10)
        req.model_name = "a"
        by_name = v2.ModelInfer(req, timeout=10)
        assert by_header.raw_output_contents == by_name.raw_output_contents
        assert by_name.model_name == "a"

        with pytest.raises(grpc.RpcError) as err:
            spi.loadModel(rt.LoadModelRequest(modelId="b", modelType="caffe2", modelPath=path),
                          timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown model type 'caffe2'" in err.value.details()
        # the controller's type labels are understood by `modelmesh runtime` too
        assert spi.loadModel(rt.LoadModelRequest(modelId="b", modelType="mt:sklearn:1",
                                                 modelPath=path), timeout=30).sizeInBytes > 0
        spi.unloadModel(rt.UnloadModelRequest(modelId="b"), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            spi.loadModel(rt.LoadModelRequest(modelId="c", modelType="sklearn",
                                              modelPath="nope/model.joblib"), timeout=10)
        assert "not found under the models root" in err.value.details()

        spi.unloadModel(rt.UnloadModelRequest(modelId="a"), timeout=10)
        spi.unloadModel(rt.UnloadModelRequest(modelId="never-loaded"), timeout=10)
        for call in (lambda: v2.ModelInfer(req, timeout=10),
                     lambda: spi.modelSize(rt.ModelSizeRequest(modelId="a"), timeout=10)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

        # runtimeStatus starts a (new) mesh on an empty runtime.
        spi.loadModel(request, timeout=30)
        spi.runtimeStatus(rt.RuntimeStatusRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            v2.ModelInfer(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_runtime_stops_cleanly_on_sigterm(spi_runtime, socket_dir):
    socket = socket_dir / "spi.sock"
    assert socket.exists()
    assert spi_runtime.stop(signal.SIGTERM) == 0
    assert not socket.exists()
    assert "runtime stopped" in spi_runtime.log()


@pytest.mark.parametrize("remote", ["unix", "tcp"])
def test_ids_that_are_not_printable_ascii_reach_the_runtime(meshes, remote):
    # The id travels to the runtime in mm-model-id-bin: an ASCII header cannot carry it.
    x = features()
    register(meshes["embedded"], "iris-sklearn")  # (idempotent)
    want = infer(meshes["embedded"], "iris-sklearn", x)
    for model_id in (f"iris-ü-{remote}", f"iris\u2028{remote}", f"iris\x7f{remote}"):
        MODELS[model_id] = MODELS["iris-sklearn"]
        try:
            st = register(meshes[remote], model_id)
            assert ST.ModelStatus.Name(st.status) == "LOADED", list(st.errors)
            got = infer(meshes[remote], model_id, x)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        finally:
            del MODELS[model_id]
