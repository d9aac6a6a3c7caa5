"""Driven as ModelMesh's controller and runtimes drive ModelMesh: real processes throughout.

- The exact ``setVModel`` request modelmesh-serving's predictor controller sends (owner,
  ``autoDeleteTargetModel``, an ``mt:`` type label, a JSON ``ModelKeyInfo`` key) against
  the embedded runtime (the model in a real S3 server, SeaweedFS, reached through the
  key's ``storage_key`` and ``storage_params``) and against a runtime server written from
  model-runtime.proto (tests/support/sum_runtime.py), which gets type, path and key
  untouched and decides itself.
- ModelMesh's management semantics: vmodel owners, idempotent unregister, creating
  with the expected target, switching at once, which statuses are set, empty ids.
- Inference headers and versions: one id header only, ``-bin`` forms, ids towards a
  runtime, ``model_version``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from modelmesh._proto.mmesh import model_mesh_pb2 as mm
from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc
from modelmesh.demo import demo_input
from modelmesh.registry.embedded import free_port
from tests.conftest import REPO
from tests.integration.test_runtimes_remote import wait_v2_ready

pytestmark = pytest.mark.integration

ST = mm.ModelStatusInfo
VS = mm.VModelStatusInfo
BUCKET = "models"
OBJECT = "controller/iris/model.joblib"


def controller_request(vmodel: str, model_type: str, path: str, storage_key: str,
                       bucket: str = BUCKET, load_now: bool = True) -> mm.SetVModelRequest:
    """What modelmesh-serving's predictor controller sends for an InferenceService.

    Its concrete model id is ``<name>__isvc-<hash>``, owner the source id, the type the
    predictor's type label, the key a JSON ModelKeyInfo (Go's field names, omitempty).
    """
    key = {"storage_key": storage_key, "storage_params": {"bucket": bucket},
           "model_type": {"name": model_type.split(":")[1]}}
    return mm.SetVModelRequest(
        vModelId=vmodel, owner="isvc", targetModelId=f"{vmodel}__isvc-6d8f5c7b21",
        autoDeleteTargetModel=True, loadNow=load_now,
        modelInfo=mm.ModelInfo(type=model_type, path=path, key=json.dumps(key)))


def wait_for(fn: Callable[[], object], timeout: float = 60.0, every: float = 0.1):
    """Poll ``fn`` until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def vmodel_loaded(stub, vmodel: str, owner: str = "isvc"):
    st = stub.getVModelStatus(mm.GetVModelStatusRequest(vModelId=vmodel, owner=owner),
                              timeout=10)
    if VS.VModelStatus.Name(st.status) == "DEFINED" and \
            ST.ModelStatus.Name(st.activeModelStatus.status) == "LOADED":
        return st
    return None


def model_status(stub, model_id: str) -> str:
    return ST.ModelStatus.Name(stub.getModelStatus(mm.GetStatusRequest(modelId=model_id),
                                                   timeout=10).status)


def iris_infer(endpoint: str, name: str, headers: dict | None = None) -> np.ndarray:
    x = demo_input().astype(np.float32)
    with triton.InferenceServerClient(endpoint) as client:
        inp = triton.InferInput("input-0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(name, [inp], headers=headers, client_timeout=60).as_numpy("predict")


# --------------------------------------------------------------------------- processes


class SumRuntime:
    """tests/support/sum_runtime.py as a child process on a TCP port."""

    def __init__(self, workdir: Path) -> None:
        self.listen = f"127.0.0.1:{free_port()}"
        self.record = workdir / "sum-runtime-calls.jsonl"
        self.log_path = workdir / "sum-runtime.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SumRuntime:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.sum_runtime", "--listen", self.listen,
             "--record", str(self.record)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        wait_v2_ready(self.listen, 30, self.proc, self.log)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def calls(self, kind: str) -> list[dict]:
        if not self.record.exists():
            return []
        lines = self.record.read_text().splitlines()
        return [c for c in map(json.loads, lines) if c["call"] == kind]

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def sum_runtime(tmp_path_factory) -> Iterator[SumRuntime]:
    runtime = SumRuntime(tmp_path_factory.mktemp("sum-runtime"))
    try:
        yield runtime.start()
    finally:
        runtime.stop()


@pytest.fixture(scope="module")
def runtime_mesh(module_mesh_factory, etcd_server, sum_runtime):
    return module_mesh_factory("--runtime", f"mmesh:{sum_runtime.listen}", etcd=etcd_server)


@pytest.fixture(scope="module")
def s3_iris(seaweedfs, models_root, demo_models) -> str:
    seaweedfs.client().upload_file(str(models_root / demo_models["sklearn"].path), BUCKET,
                                   OBJECT)
    return OBJECT


@pytest.fixture(scope="module")
def embedded_mesh(module_mesh_factory, etcd_server, seaweedfs, tmp_path_factory, s3_iris):
    """An embedded-runtime mesh whose storage config names the key the controller uses;
    its default bucket does not exist, so only the key's storage_params can find the
    model. Accepted types are limited, as an operator may limit them."""
    config = tmp_path_factory.mktemp("compat-storage") / "storage-config.json"
    config.write_text(json.dumps({"localMinIO": seaweedfs.storage_config(bucket="no-such")}))
    return module_mesh_factory("--storage-config", str(config), "--accepted-model-types",
                               "sklearn,identity,onnx", etcd=etcd_server)


def stub_for(mesh) -> Iterator[mm_grpc.ModelMeshStub]:
    with grpc.insecure_channel(mesh.endpoint) as ch:
        yield mm_grpc.ModelMeshStub(ch)


@pytest.fixture(scope="module")
def emb(embedded_mesh):
    yield from stub_for(embedded_mesh)


@pytest.fixture(scope="module")
def rmesh(runtime_mesh):
    yield from stub_for(runtime_mesh)


# --------------------------------------------------------------------------- the controller


def test_the_controllers_set_vmodel_serves_from_its_storage_key_on_the_embedded_runtime(
        embedded_mesh, emb, demo_models, models_root):
    request = controller_request("iris-isvc", "mt:sklearn", OBJECT, "localMinIO")
    st = emb.setVModel(request, timeout=60)
    assert st.owner == "isvc" and st.targetModelId == request.targetModelId
    st = wait_for(lambda: vmodel_loaded(emb, "iris-isvc"))
    assert st.activeModelId == request.targetModelId
    import joblib

    expected = joblib.load(models_root / demo_models["sklearn"].path).predict(demo_input())
    assert np.array_equal(iris_infer(embedded_mesh.endpoint, "iris-isvc"), expected)
    assert np.array_equal(iris_infer(embedded_mesh.endpoint, "anything",
                                     headers={"mm-vmodel-id": "iris-isvc"}), expected)
    # the controller deletes with its owner; the auto-delete target goes with the vmodel
    emb.deleteVModel(mm.DeleteVModelRequest(vModelId="iris-isvc", owner="isvc"), timeout=10)
    wait_for(lambda: model_status(emb, request.targetModelId) == "NOT_FOUND")


@pytest.mark.parametrize(("model_type", "expected"), [
    ("mt:sklearn:1", "LOADED"),
    ("mt:sklearn|pv:grpc-v2", "LOADED"),
])
def test_type_labels_with_versions_and_protocols_are_understood(emb, model_type, expected):
    model_id = f"label-{abs(hash(model_type))}"
    key = json.dumps({"storage_key": "localMinIO", "storage_params": {"bucket": BUCKET}})
    st = emb.registerModel(mm.RegisterModelRequest(
        modelId=model_id, modelInfo=mm.ModelInfo(type=model_type, path=OBJECT, key=key),
        loadNow=True, sync=True), timeout=60)
    assert ST.ModelStatus.Name(st.status) == expected, st.errors
    emb.unregisterModel(mm.UnregisterModelRequest(modelId=model_id), timeout=10)


def test_a_runtime_type_label_takes_the_format_from_the_keys_model_type(emb):
    key = json.dumps({"storage_key": "localMinIO", "storage_params": {"bucket": BUCKET},
                      "model_type": {"name": "sklearn"}})
    st = emb.registerModel(mm.RegisterModelRequest(
        modelId="rt-label", modelInfo=mm.ModelInfo(type="rt:mlserver-1.x", path=OBJECT,
                                                   key=key), loadNow=True, sync=True),
        timeout=60)
    assert ST.ModelStatus.Name(st.status) == "LOADED", st.errors
    emb.unregisterModel(mm.UnregisterModelRequest(modelId="rt-label"), timeout=10)


@pytest.mark.parametrize(("model_type", "key", "path", "message"), [
    ("mt:lightgbm", "", "m.txt", "not accepted here"),  # outside --accepted-model-types
    ("sum-runtime-format", "", "m", "not accepted here"),
    ("mt:sklearn", json.dumps({"storage_key": "nowhere"}), "x.joblib", "unknown storage key"),
])
def test_the_embedded_runtime_refuses_what_it_cannot_load_at_registration(
        emb, model_type, key, path, message):
    code, details = code_of(lambda: emb.registerModel(mm.RegisterModelRequest(
        modelId="refused", modelInfo=mm.ModelInfo(type=model_type, path=path, key=key)),
        timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details
    code, details = code_of(lambda: emb.setVModel(
        controller_request("refused-vm", model_type if ":" in model_type else
                           f"mt:{model_type}", path, "nowhere"), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert model_status(emb, "refused") == "NOT_FOUND"


def test_the_controllers_set_vmodel_is_passed_through_to_a_runtime_server(
        runtime_mesh, rmesh, sum_runtime):
    # a storage key this mesh has no config for, a path outside its models root
    request = controller_request("sum-isvc", "mt:sum-runtime-format", "/srv/elsewhere/sum",
                                 "localMinIO")
    rmesh.setVModel(request, timeout=60)
    st = wait_for(lambda: vmodel_loaded(rmesh, "sum-isvc"))
    assert st.activeModelId == request.targetModelId
    loads = [c for c in sum_runtime.calls("loadModel") if c["modelId"] == request.targetModelId]
    assert loads and loads[0]["modelType"] == "mt:sum-runtime-format"
    assert loads[0]["modelPath"] == "/srv/elsewhere/sum"
    assert loads[0]["modelKey"] == request.modelInfo.key  # untouched
    with triton.InferenceServerClient(runtime_mesh.endpoint) as client:
        inp = triton.InferInput("x", [2, 2], "FP32")
        inp.set_data_from_numpy(np.array([[1, 2], [3, 4]], np.float32))
        assert client.infer("sum-isvc", [inp]).as_numpy("sum").tolist() == [10.0]


@pytest.mark.parametrize("model_type", ["sum-runtime-format", "rt:sum-runtime"])
def test_types_only_the_runtime_knows_register_and_load(rmesh, model_type):
    model_id = f"only-runtime-{model_type.replace(':', '-')}"
    st = rmesh.registerModel(mm.RegisterModelRequest(
        modelId=model_id, modelInfo=mm.ModelInfo(type=model_type, path="anything/at/all",
                                                 key='{"storage_key": "s3-not-here"}'),
        loadNow=True, sync=True), timeout=60)
    assert ST.ModelStatus.Name(st.status) == "LOADED", st.errors


def test_a_runtimes_refusal_is_loading_failed_with_its_message(rmesh):
    st = rmesh.registerModel(mm.RegisterModelRequest(
        modelId="refused-by-runtime", modelInfo=mm.ModelInfo(type="mt:tensorflow",
                                                             path="tf/model"),
        loadNow=True, sync=True), timeout=60)
    assert ST.ModelStatus.Name(st.status) == "LOADING_FAILED"
    assert any("sum-runtime cannot load models of type 'mt:tensorflow'" in e for e in st.errors)


@pytest.mark.parametrize(("model_id", "plain"), [("ascii-id", True), ("unicod\u00e9-id", False)])
def test_runtimes_get_the_binary_id_header_always_and_the_text_one_when_it_fits(
        runtime_mesh, rmesh, sum_runtime, model_id, plain):
    rmesh.registerModel(mm.RegisterModelRequest(
        modelId=model_id, modelInfo=mm.ModelInfo(type="sum-runtime-format", path="p"),
        loadNow=True, sync=True), timeout=60)
    with triton.InferenceServerClient(runtime_mesh.endpoint) as client:
        inp = triton.InferInput("x", [1], "FP32")
        inp.set_data_from_numpy(np.array([5], np.float32))
        out = client.infer("ignored", [inp], headers={"mm-model-id-bin": model_id.encode()})
        assert out.as_numpy("sum").tolist() == [5.0]
    seen = [c["headers"] for c in sum_runtime.calls("ModelInfer")
            if model_id in c["headers"].values()]
    assert seen and seen[-1]["mm-model-id-bin"] == model_id
    assert (seen[-1].get("mm-model-id") == model_id) is plain
    assert plain or "mm-model-id" not in seen[-1]


# --------------------------------------------------------------------------- management


@pytest.fixture
def iris(emb):
    """Registers (not loaded) models of the demo iris forest from S3 on demand."""
    made: list[str] = []
    key = json.dumps({"storage_key": "localMinIO", "storage_params": {"bucket": BUCKET}})

    def make(model_id: str, load: bool = False) -> str:
        emb.registerModel(mm.RegisterModelRequest(
            modelId=model_id, modelInfo=mm.ModelInfo(type="sklearn", path=OBJECT, key=key),
            loadNow=load, sync=load), timeout=60)
        made.append(model_id)
        return model_id

    yield make


def test_vmodel_owners_must_match(emb, iris):
    iris("own-a")
    emb.setVModel(mm.SetVModelRequest(vModelId="owned", owner="team-a", targetModelId="own-a",
                                      loadNow=False), timeout=30)
    emb.setVModel(mm.SetVModelRequest(vModelId="unowned", targetModelId="own-a",
                                      loadNow=False), timeout=30)
    for vmodel, owner in (("owned", "team-b"), ("owned", ""), ("unowned", "team-a")):
        code, details = code_of(lambda v=vmodel, o=owner: emb.setVModel(mm.SetVModelRequest(
            vModelId=v, owner=o, targetModelId="own-a", loadNow=False), timeout=30))
        assert code == grpc.StatusCode.ALREADY_EXISTS, (vmodel, owner, details)
    # the matching owner updates; a status asked with another owner is not found
    emb.setVModel(mm.SetVModelRequest(vModelId="owned", owner="team-a", targetModelId="own-a",
                                      loadNow=False), timeout=30)
    other = emb.getVModelStatus(mm.GetVModelStatusRequest(vModelId="owned", owner="team-b"),
                                timeout=10)
    assert VS.VModelStatus.Name(other.status) == "NOT_FOUND" and not other.activeModelId
    mine = emb.getVModelStatus(mm.GetVModelStatusRequest(vModelId="owned", owner="team-a"),
                               timeout=10)
    assert mine.activeModelId == "own-a" and mine.owner == "team-a"
    # deleting with another owner is OK and does nothing
    emb.deleteVModel(mm.DeleteVModelRequest(vModelId="owned", owner="team-b"), timeout=10)
    assert VS.VModelStatus.Name(emb.getVModelStatus(
        mm.GetVModelStatusRequest(vModelId="owned"), timeout=10).status) != "NOT_FOUND"
    emb.deleteVModel(mm.DeleteVModelRequest(vModelId="owned", owner="team-a"), timeout=10)
    emb.deleteVModel(mm.DeleteVModelRequest(vModelId="unowned"), timeout=10)
    assert VS.VModelStatus.Name(emb.getVModelStatus(
        mm.GetVModelStatusRequest(vModelId="owned"), timeout=10).status) == "NOT_FOUND"


def test_unregistering_an_unknown_model_is_ok(emb):
    emb.unregisterModel(mm.UnregisterModelRequest(modelId="never-registered"), timeout=10)


def test_empty_model_ids_are_invalid_argument(emb):
    for call in (lambda: emb.ensureLoaded(mm.EnsureLoadedRequest(modelId=""), timeout=10),
                 lambda: emb.unregisterModel(mm.UnregisterModelRequest(modelId=""), timeout=10)):
        code, details = code_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "modelId" in details


def test_creating_a_vmodel_with_its_target_as_the_expected_one_succeeds(emb, iris):
    iris("exp-a")
    st = emb.setVModel(mm.SetVModelRequest(vModelId="exp", targetModelId="exp-a",
                                           expectedTargetModelId="exp-a", loadNow=False),
                       timeout=30)
    assert st.activeModelId == "exp-a"
    code, _ = code_of(lambda: emb.setVModel(mm.SetVModelRequest(
        vModelId="exp-new", targetModelId="exp-a", expectedTargetModelId="other",
        loadNow=False), timeout=30))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    emb.deleteVModel(mm.DeleteVModelRequest(vModelId="exp"), timeout=10)


def test_a_vmodel_switches_at_once_when_its_active_model_is_loaded_nowhere(emb, iris):
    iris("sw-a")
    iris("sw-b")
    st = emb.setVModel(mm.SetVModelRequest(vModelId="sw", targetModelId="sw-a", loadNow=False),
                       timeout=30)
    assert model_status(emb, "sw-a") == "NOT_LOADED"
    st = emb.setVModel(mm.SetVModelRequest(vModelId="sw", targetModelId="sw-b", loadNow=False),
                       timeout=30)
    assert VS.VModelStatus.Name(st.status) == "DEFINED"
    assert st.activeModelId == "sw-b" and st.targetModelId == "sw-b"
    # target == active: no targetModelStatus
    assert not st.HasField("targetModelStatus") and st.HasField("activeModelStatus")
    emb.deleteVModel(mm.DeleteVModelRequest(vModelId="sw"), timeout=10)


def test_target_status_is_set_only_while_the_target_differs(emb, iris):
    iris("ts-a", load=True)
    iris("ts-b")
    emb.setVModel(mm.SetVModelRequest(vModelId="ts", targetModelId="ts-a", loadNow=False),
                  timeout=30)
    st = emb.setVModel(mm.SetVModelRequest(vModelId="ts", targetModelId="ts-b",
                                           loadNow=False), timeout=30)
    if st.activeModelId != st.targetModelId:  # still transitioning: both are given
        assert st.HasField("targetModelStatus")
    st = emb.setVModel(mm.SetVModelRequest(vModelId="ts", targetModelId="ts-b", force=True,
                                           loadNow=False), timeout=30)
    assert st.activeModelId == "ts-b" and not st.HasField("targetModelStatus")
    emb.deleteVModel(mm.DeleteVModelRequest(vModelId="ts"), timeout=10)


# --------------------------------------------------------------------------- headers, versions


@pytest.fixture(scope="module")
def v2(embedded_mesh):
    with grpc.insecure_channel(embedded_mesh.endpoint) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def _iris_request(name: str, version: str = "") -> pb.ModelInferRequest:
    x = demo_input().astype(np.float32)
    req = pb.ModelInferRequest(model_name=name, model_version=version)
    req.inputs.add(name="input-0", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def test_both_id_headers_are_invalid_argument(emb, iris, v2):
    iris("hdr-a", load=True)
    emb.setVModel(mm.SetVModelRequest(vModelId="hdr-vm", targetModelId="hdr-a",
                                      loadNow=False), timeout=30)
    for md in ((("mm-model-id", "hdr-a"), ("mm-vmodel-id", "hdr-vm")),
               (("mm-model-id-bin", b"hdr-a"), ("mm-vmodel-id", "hdr-vm")),
               (("mm-model-id", "hdr-a"), ("mm-vmodel-id-bin", b"hdr-vm"))):
        code, details = code_of(lambda m=md: v2.ModelInfer(_iris_request("x"), metadata=m,
                                                           timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "only one of" in details
    # each alone, in either form, serves
    for md in ((("mm-model-id-bin", b"hdr-a"),), (("mm-vmodel-id-bin", b"hdr-vm"),),
               (("mm-vmodel-id", "hdr-vm"),)):
        assert v2.ModelInfer(_iris_request("x"), metadata=md, timeout=30).outputs
    emb.deleteVModel(mm.DeleteVModelRequest(vModelId="hdr-vm"), timeout=10)


def test_a_version_the_model_does_not_have_is_not_found(iris, v2, embedded_mesh):
    iris("ver-a", load=True)
    for version in ("", "1"):
        answer = v2.ModelInfer(_iris_request("ver-a", version), timeout=30)
        assert answer.outputs and answer.model_version == "1"  # the version served (Triton)
    code, details = code_of(lambda: v2.ModelInfer(_iris_request("ver-a", "2"), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND and "version '2'" in details
    code, _ = code_of(lambda: v2.ModelMetadata(pb.ModelMetadataRequest(name="ver-a",
                                                                       version="7"), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND
    assert v2.ModelMetadata(pb.ModelMetadataRequest(name="ver-a", version="1"),
                            timeout=30).versions == ["1"]
    assert not v2.ModelReady(pb.ModelReadyRequest(name="ver-a", version="3"), timeout=30).ready
    assert v2.ModelReady(pb.ModelReadyRequest(name="ver-a", version="1"), timeout=30).ready
    with triton.InferenceServerClient(embedded_mesh.endpoint) as client, \
            pytest.raises(InferenceServerException, match="version"):
        inp = triton.InferInput("input-0", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))
        client.infer("ver-a", [inp], model_version="2")
