"""TLS between the mesh and a runtime server over TCP (``--runtime mmesh:tls:HOST:PORT``).

A real `modelmesh runtime` with a certificate from tests/support/certs.py, real
`modelmesh serve` processes, the real tritonclient.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelmesh.registry.embedded import free_port
from tests.conftest import REPO
from tests.integration.test_mesh import identity_file, register
from tests.support.certs import make_pki

pytestmark = pytest.mark.integration


class TlsRuntime:
    def __init__(self, workdir: Path, models_root: Path, *tls: str) -> None:
        self.port = free_port()
        self.log_path = workdir / f"runtime-{self.port}.log"
        self.args = [sys.executable, "-m", "modelmesh", "runtime", "--listen",
                     f"127.0.0.1:{self.port}", "--models-root", str(models_root), *tls]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, credentials: grpc.ChannelCredentials) -> TlsRuntime:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                with grpc.secure_channel(f"127.0.0.1:{self.port}", credentials) as ch:
                    if pb_grpc.GRPCInferenceServiceStub(ch).ServerReady(
                            pb.ServerReadyRequest(), timeout=1).ready:
                        return self
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise TimeoutError(self.log_path.read_text())

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("rt-pki"))


@pytest.fixture
def runtimes(tmp_path, models_root):
    started: list[TlsRuntime] = []

    def make(*tls: str) -> TlsRuntime:
        rt = TlsRuntime(tmp_path, models_root, *tls)
        started.append(rt)
        return rt

    yield make
    for rt in started:
        rt.stop()


def _infer(endpoint: str, model: str) -> np.ndarray:
    with triton.InferenceServerClient(endpoint) as client:
        inp = triton.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.full((1, 4), 2, np.float32))
        return client.infer(model, [inp], client_timeout=60).as_numpy("x")


def test_the_mesh_reaches_a_tls_runtime_verified_by_its_ca(runtimes, mesh_factory, pki,
                                                          models_root, etcd_server):
    rt = runtimes("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key))
    rt.start(grpc.ssl_channel_credentials(pki.ca.cert.read_bytes()))
    mesh = mesh_factory("--runtime", f"mmesh:tls:127.0.0.1:{rt.port}", "--runtime-ca",
                        str(pki.ca.cert), etcd=etcd_server)
    register(mesh.endpoint, {"tls-rt": identity_file(models_root, "tls-rt")})
    assert (_infer(mesh.endpoint, "tls-rt") == 2).all()


def test_a_runtime_asking_for_client_certificates_gets_the_meshs(runtimes, mesh_factory, pki,
                                                                models_root, etcd_server):
    rt = runtimes("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                  "--tls-ca", str(pki.ca.cert))
    rt.start(grpc.ssl_channel_credentials(pki.ca.cert.read_bytes(), pki.client.key.read_bytes(),
                                          pki.client.cert.read_bytes()))
    # without a certificate of its own the mesh cannot use the runtime: it does not start
    bare = mesh_factory("--runtime", f"mmesh:tls:127.0.0.1:{rt.port}", "--runtime-ca",
                        str(pki.ca.cert), "--load-timeout", "3", etcd=etcd_server, start=False)
    bare.start(wait=False)
    assert bare.proc is not None and bare.proc.wait(60) != 0
    assert "not ready" in bare.log()
    # with --tls-cert/--tls-key (its own serving identity) it presents that certificate
    mesh = mesh_factory("--runtime", f"mmesh:tls:127.0.0.1:{rt.port}",
                        "--runtime-ca", str(pki.ca.cert), "--tls-cert", str(pki.server.cert),
                        "--tls-key", str(pki.server.key), etcd=etcd_server, start=False)
    mesh.start(wait=False)
    creds = grpc.ssl_channel_credentials(pki.ca.cert.read_bytes())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert mesh.proc is not None and mesh.proc.poll() is None, mesh.log()
        try:
            with grpc.secure_channel(mesh.endpoint, creds) as ch:
                if pb_grpc.GRPCInferenceServiceStub(ch).ServerReady(
                        pb.ServerReadyRequest(), timeout=1).ready:
                    break
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    with grpc.secure_channel(mesh.endpoint, creds) as ch:
        from modelmesh._proto.mmesh import model_mesh_pb2 as mm
        from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc

        mm_grpc.ModelMeshStub(ch).registerModel(mm.RegisterModelRequest(
            modelId="mtls-rt", modelInfo=mm.ModelInfo(
                type="identity", path=identity_file(models_root, "mtls-rt"))), timeout=30)
        req = pb.ModelInferRequest(model_name="mtls-rt")
        req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        req.raw_input_contents.append(np.full((1, 4), 3, np.float32).tobytes())
        out = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=60)
        assert np.frombuffer(out.raw_output_contents[0], np.float32).tolist() == [3.0] * 4


@pytest.mark.parametrize(("text", "tls", "target"), [
    ("mmesh:tls:127.0.0.1:9000", True, "127.0.0.1:9000"),
    ("mlserver:tls:mls:8081", True, "mls:8081"),
    ("mmesh:127.0.0.1:9000", False, "127.0.0.1:9000"),
])
def test_runtime_addresses_with_tls(text, tls, target):
    from modelmesh.settings import RuntimeAddress

    address = RuntimeAddress.parse(text)
    assert (address.tls, address.target, str(address)) == (tls, target, text)
    with pytest.raises(ValueError, match="needs no TLS"):
        RuntimeAddress.parse("mmesh:tls:unix:/run/x.sock")
