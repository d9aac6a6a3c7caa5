"""Instance-level behaviour with real processes: eviction, single loads, restarts, etcd outages."""

from __future__ import annotations

import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from modelmesh._proto.mmesh import mesh_extensions_pb2 as ext
from modelmesh._proto.mmesh import mesh_extensions_pb2_grpc as ext_grpc
from modelmesh._proto.mmesh import model_mesh_pb2 as mm
from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc
from modelmesh.demo import demo_input
from modelmesh.registry.embedded import EmbeddedEtcd

pytestmark = pytest.mark.integration
ST = mm.ModelStatusInfo


def metric(mesh, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{mesh.metrics_port}/metrics",
                                  timeout=5).read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def infer(endpoint: str, model: str) -> np.ndarray:
    x = demo_input().astype(np.float32)
    with triton.InferenceServerClient(endpoint) as c:
        inp = triton.InferInput("input-0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return c.infer(model, [inp], client_timeout=60).as_numpy("predict")


def status(stub, model_id: str) -> str:
    return ST.ModelStatus.Name(stub.getModelStatus(mm.GetStatusRequest(modelId=model_id),
                                                   timeout=10).status)


def test_eviction_under_small_capacity(mesh_factory, etcd_server, demo_models):
    # Find one model's measured size on a roomy instance, then size the small one for ~2.
    probe = mesh_factory(etcd=etcd_server, capacity="256MiB")
    with grpc.insecure_channel(probe.endpoint) as ch:
        mm_grpc.ModelMeshStub(ch).registerModel(mm.RegisterModelRequest(
            modelId="probe", modelInfo=mm.ModelInfo(type="sklearn",
                                                    path=str(demo_models["sklearn"].path)),
            loadNow=True, sync=True), timeout=60)
        # The instance record (used bytes) is published a moment after the load.
        deadline = time.monotonic() + 10
        while True:
            size = ext_grpc.ModelMeshExtensionsStub(ch).clusterStatus(
                ext.ClusterStatusRequest(), timeout=10).instances[0].usedBytes
            if size or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    probe.stop()
    capacity = int(size * 2.5)
    # Plain LRU so that the order is predictable (density would keep the smallest copy).
    small = mesh_factory("--placement", "lru", etcd=etcd_server, capacity=str(capacity))
    with grpc.insecure_channel(small.endpoint) as ch:
        stub = mm_grpc.ModelMeshStub(ch)
        ext_stub = ext_grpc.ModelMeshExtensionsStub(ch)
        for i in range(5):
            stub.registerModel(mm.RegisterModelRequest(
                modelId=f"ev-{i}", modelInfo=mm.ModelInfo(
                    type="sklearn", path=str(demo_models["sklearn"].path))), timeout=10)
        for i in range(5):
            assert infer(small.endpoint, f"ev-{i}") is not None
            inst = ext_stub.clusterStatus(ext.ClusterStatusRequest(), timeout=10).instances
            mine = next(x for x in inst if x.instanceId == f"test-{small.port}")
            assert mine.usedBytes <= capacity
        states = [status(stub, f"ev-{i}") for i in range(5)]
        assert states[-2:] == ["LOADED", "LOADED"]
        assert states[:3] == ["NOT_LOADED"] * 3
        # an evicted model loads again on its next request
        assert infer(small.endpoint, "ev-0") is not None
        assert status(stub, "ev-0") == "LOADED"
    assert metric(small, 'modelmesh_unloadmodel_total{reason="evicted"}') >= 3


def test_one_load_for_fifty_concurrent_requests(mesh_factory, etcd_server, demo_models):
    mesh = mesh_factory(etcd=etcd_server)
    with grpc.insecure_channel(mesh.endpoint) as ch:
        mm_grpc.ModelMeshStub(ch).registerModel(mm.RegisterModelRequest(
            modelId="cold", modelInfo=mm.ModelInfo(type="lightgbm",
                                                   path=str(demo_models["lightgbm"].path))),
            timeout=10)
    x = demo_input().astype(np.float32)

    def one(_: int) -> np.ndarray:
        with triton.InferenceServerClient(mesh.endpoint) as c:
            inp = triton.InferInput("input-0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return c.infer("cold", [inp], client_timeout=60).as_numpy("predict")

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    assert len(results) == 50 and all(np.array_equal(r, results[0]) for r in results)
    assert metric(mesh, "modelmesh_loadmodel_milliseconds_count") == 1


def test_restart_keeps_registrations_with_embedded_etcd(mesh_factory, tmp_path, demo_models):
    data_dir = tmp_path / "persist"
    first = mesh_factory(data_dir=data_dir)  # no --etcd: embedded etcd in the data dir
    with grpc.insecure_channel(first.endpoint) as ch:
        mm_grpc.ModelMeshStub(ch).registerModel(mm.RegisterModelRequest(
            modelId="durable", modelInfo=mm.ModelInfo(type="sklearn",
                                                      path=str(demo_models["sklearn"].path))),
            timeout=10)
    before = infer(first.endpoint, "durable")
    assert first.stop() == 0
    assert "etcd" not in _children_named(first)  # the embedded etcd went with it
    second = mesh_factory(data_dir=data_dir, port=first.port)
    with grpc.insecure_channel(second.endpoint) as ch:
        assert status(mm_grpc.ModelMeshStub(ch), "durable") == "NOT_LOADED"
    np.testing.assert_array_equal(infer(second.endpoint, "durable"), before)


def _children_named(mesh) -> str:
    # The process is gone; any etcd it started would now be orphaned under PID 1.
    import subprocess

    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return "etcd" if str(mesh.args[mesh.args.index("--data-dir") + 1]) in out else ""


def test_survives_etcd_restart(mesh_factory, tmp_path, demo_models):
    etcd = EmbeddedEtcd(tmp_path / "etcd-restart")
    etcd.start()
    try:
        mesh = mesh_factory(etcd=etcd, env={"MM_LEASE_TTL": "3"})
        with grpc.insecure_channel(mesh.endpoint) as ch:
            stub = mm_grpc.ModelMeshStub(ch)
            stub.registerModel(mm.RegisterModelRequest(
                modelId="steady", modelInfo=mm.ModelInfo(
                    type="sklearn", path=str(demo_models["sklearn"].path)),
                loadNow=True, sync=True), timeout=30)
            etcd.stop()
            # loaded models keep serving while etcd is down
            for _ in range(5):
                assert infer(mesh.endpoint, "steady") is not None
                time.sleep(1)
            etcd.start()
            # registry writes work again, and the mirror picks them up (watch resumed)
            deadline = time.monotonic() + 30
            while True:
                try:
                    stub.registerModel(mm.RegisterModelRequest(
                        modelId="after-restart", modelInfo=mm.ModelInfo(
                            type="sklearn", path=str(demo_models["sklearn"].path))), timeout=10)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            assert infer(mesh.endpoint, "after-restart") is not None
            ext_stub = ext_grpc.ModelMeshExtensionsStub(ch)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the instance record comes back (new lease)
                if ext_stub.clusterStatus(ext.ClusterStatusRequest(), timeout=10).instances:
                    break
                time.sleep(0.5)
            assert ext_stub.clusterStatus(ext.ClusterStatusRequest(), timeout=10).instances
    finally:
        etcd.stop()
