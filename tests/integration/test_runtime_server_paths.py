"""Model paths from clients, end to end: a `modelmesh runtime` process and a `modelmesh serve`.

The runtime server gets model paths over the SPI (loadModel, predictModelSize),
the mesh over registerModel: a file linked from outside the models root is never
opened, a NUL byte or an over-long name is INVALID_ARGUMENT (no traceback in
the log), a FIFO is refused unread, a file larger than the capacity is
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from modelmesh._proto.mmesh import model_mesh_pb2 as mm
from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc
from modelmesh._proto.mmesh import model_runtime_pb2 as rt
from modelmesh._proto.mmesh import model_runtime_pb2_grpc as rt_grpc
from tests.integration.test_runtimes_remote import wait_v2_ready

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ST = mm.ModelStatusInfo


class _TouchOnLoad:
    """Unpickling this creates ``marker``: loading a joblib file runs its code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _tricky_root(base: Path, demo_root: Path) -> tuple[Path, Path]:
    """A models root with a good model and the paths under test; returns (root, marker)."""
    root, outside = base / "models", base / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copytree(demo_root / "iris-sklearn", root / "good")
    marker = outside / "code-ran"
    (outside / "evil.joblib").write_bytes(pickle.dumps(_TouchOnLoad(marker)))
    (root / "linked").mkdir()
    (root / "linked" / "model.joblib").symlink_to(outside / "evil.joblib")
    os.mkfifo(root / "pipe.json")
    with (root / "big.json").open("wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB long, nothing written
    return root, marker


@pytest.fixture
def runtime(tmp_path, models_root) -> Iterator[tuple[str, Path, Path, Path]]:
    """A `modelmesh runtime` with 16 MiB capacity over the tricky root; stopped by pid."""
    root, marker = _tricky_root(tmp_path, models_root)
    sockets = Path(tempfile.mkdtemp(prefix="mm-rtp-", dir="/tmp"))
    target = f"unix:{sockets}/rt.sock"
    log_path = tmp_path / "runtime.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelmesh", "runtime", "--listen", target,
             "--models-root", str(root), "--capacity", "16MiB"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_v2_ready(target, 60, proc, log_path.read_text)
        yield target, root, marker, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(sockets, ignore_errors=True)


def _code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_runtime_server_refuses_paths_it_must_not_open(runtime):
    target, root, marker, log_path = runtime
    with grpc.insecure_channel(target) as ch:
        spi = rt_grpc.ModelRuntimeStub(ch)

        def load(path: str, model_type: str = "sklearn"):
            return lambda: spi.loadModel(rt.LoadModelRequest(
                modelId=f"m-{abs(hash(path))}", modelType=model_type, modelPath=path),
                timeout=30)

        def size(path: str):
            return lambda: spi.predictModelSize(rt.PredictModelSizeRequest(
                modelId="s", modelType="sklearn", modelPath=path), timeout=30)

        assert load("good")().sizeInBytes > 0

        code, msg = _code_of(load("linked"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, msg
        assert "'linked/model.joblib' resolves outside the models root" in msg
        assert not marker.exists()

        for call in (load("good\x00/model.joblib"), size("good\x00")):
            code, msg = _code_of(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "NUL byte" in msg, (code, msg)
        code, msg = _code_of(load("x" * 300))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 255 bytes" in msg

        code, msg = _code_of(load("pipe.json", "identity"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "FIFO" in msg, msg

        code, msg = _code_of(load("big.json", "identity"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, msg)
        assert "67108864 bytes, more than the 16777216 bytes" in msg

    assert "Traceback" not in log_path.read_text(errors="replace")


def test_mesh_refuses_paths_at_registration_and_links_out_at_load(mesh_factory, etcd_server,
                                                                  tmp_path, models_root):
    (tmp_path / "tricky").mkdir()
    root, marker = _tricky_root(tmp_path / "tricky", models_root)
    mesh = mesh_factory("--models-root", str(root), etcd=etcd_server)
    with grpc.insecure_channel(mesh.endpoint) as ch:
        mgmt = mm_grpc.ModelMeshStub(ch)

        def register(model_id: str, path: str, model_type: str = "sklearn"):
            return mgmt.registerModel(mm.RegisterModelRequest(
                modelId=model_id, modelInfo=mm.ModelInfo(type=model_type, path=path),
                loadNow=True, sync=True), timeout=60)

        assert ST.ModelStatus.Name(register("good", "good").status) == "LOADED"

        code, msg = _code_of(lambda: register("nul", "good\x00/model.joblib"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "NUL byte" in msg, (code, msg)

        status = register("linked", "linked")  # the path is inside; the file it opens is not
        assert ST.ModelStatus.Name(status.status) == "LOADING_FAILED", status
        assert any("resolves outside the models root" in e for e in status.errors), status
        assert not marker.exists()

        status = register("pipe", "pipe.json", "identity")
        assert ST.ModelStatus.Name(status.status) == "LOADING_FAILED", status
        assert any("FIFO" in e for e in status.errors), status
    assert "Traceback" not in mesh.log()
