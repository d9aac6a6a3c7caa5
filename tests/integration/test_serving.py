"""One real `modelmesh serve` process against a real etcd, driven by the real tritonclient."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import urllib.request
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
from modelmesh.demo import demo_input

pytestmark = pytest.mark.integration
ST = mm.ModelStatusInfo


@pytest.fixture(scope="module")
def mesh(module_mesh_factory, etcd_server):
    return module_mesh_factory(etcd=etcd_server, capacity="512MiB")


@pytest.fixture(scope="module")
def mgmt(mesh):
    with grpc.insecure_channel(mesh.endpoint) as ch:
        yield mm_grpc.ModelMeshStub(ch)


@pytest.fixture(scope="module")
def v2(mesh):
    with grpc.insecure_channel(mesh.endpoint) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


@pytest.fixture(scope="module")
def client(mesh):
    c = triton.InferenceServerClient(mesh.endpoint)
    yield c
    c.close()


def register(mgmt, model_id: str, model_type: str, path: str, load_now=True, sync=True,
             replace=False):
    meta = [("mm-replace", "true")] if replace else []
    return mgmt.registerModel(
        mm.RegisterModelRequest(modelId=model_id, modelInfo=mm.ModelInfo(type=model_type,
                                                                          path=str(path)),
                                loadNow=load_now, sync=sync),
        metadata=meta, timeout=60,
    )


def own_predict(model_type: str, path: Path, x: np.ndarray) -> np.ndarray:
    """The model library's own prediction, for comparison with the mesh's answer."""
    if model_type == "sklearn":
        import joblib

        return joblib.load(path).predict(x)
    if model_type == "xgboost":
        import xgboost

        booster = xgboost.Booster()
        booster.load_model(str(path))
        return booster.predict(xgboost.DMatrix(x))
    if model_type == "lightgbm":
        import lightgbm

        return lightgbm.Booster(model_file=str(path)).predict(x)
    if model_type == "onnx":
        import onnxruntime

        sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return sess.run(None, {name: x.astype(np.float32)})[0]
    raise AssertionError(model_type)


@pytest.mark.parametrize("model_type", ["sklearn", "xgboost", "lightgbm", "onnx"])
def test_each_format_matches_its_own_predict(mgmt, client, models_root, demo_models,
                                             model_type):
    demo = demo_models[model_type]
    status = register(mgmt, f"fmt-{model_type}", model_type, demo.path)
    assert ST.ModelStatus.Name(status.status) == "LOADED", status.errors
    meta = client.get_model_metadata(f"fmt-{model_type}")
    x = demo_input().astype(np.float32)
    inp = triton.InferInput(meta.inputs[0].name, list(x.shape), meta.inputs[0].datatype)
    inp.set_data_from_numpy(x.astype(triton_np(meta.inputs[0].datatype)))
    result = client.infer(f"fmt-{model_type}", [inp])
    # Boosters predict class probabilities natively; the mesh names that output
    # predict_proba (its `predict` is the arg-max label).
    output = "predict_proba" if model_type in ("xgboost", "lightgbm") else \
        result.get_response().outputs[0].name
    got = result.as_numpy(output)
    want = own_predict(model_type, models_root / demo.path, x)
    np.testing.assert_allclose(got.reshape(want.shape).astype(np.float64),
                               want.astype(np.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["sklearn", "xgboost", "lightgbm", "onnx"])
def test_concurrent_requests_each_get_their_own_answer(mgmt, mesh, models_root, demo_models,
                                                        model_type):
    """Many clients at once (merged into shared predictions where the model allows it):
    every response carries exactly the rows of its own request."""
    import asyncio

    import tritonclient.grpc.aio as aio

    demo = demo_models[model_type]
    model_id = f"many-{model_type}"
    register(mgmt, model_id, model_type, demo.path)
    rng = np.random.default_rng(7)
    batches = [rng.uniform(0, 8, size=(int(rng.integers(1, 4)), 4)).astype(np.float32)
               for _ in range(96)]
    name = "input" if model_type == "onnx" else "input-0"
    output = "predict_proba" if model_type in ("xgboost", "lightgbm") else (
        "label" if model_type == "onnx" else "predict")

    async def send_all() -> list[np.ndarray]:
        client = aio.InferenceServerClient(mesh.endpoint)
        try:
            async def one(x: np.ndarray) -> np.ndarray:
                inp = aio.InferInput(name, list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                result = await client.infer(model_id, [inp],
                                            outputs=[aio.InferRequestedOutput(output)])
                return result.as_numpy(output)
            return await asyncio.gather(*(one(x) for x in batches))
        finally:
            await client.close()

    merged_before = batched_requests(mesh)
    # 96 requests sent at once: some must have shared a prediction, or this test
    # would not be testing the splitting of merged outputs. On a busy machine a burst
    # can arrive one request at a time; send it again (a few times at most) until
    # some were merged. Every burst's answers are checked.
    for _ in range(5):
        answers = asyncio.run(send_all())
        for x, got in zip(batches, answers, strict=True):
            want = own_predict(model_type, models_root / demo.path, x)
            np.testing.assert_allclose(got.reshape(want.shape).astype(np.float64),
                                       want.astype(np.float64), rtol=1e-5, atol=1e-6)
        if batched_requests(mesh) > merged_before:
            break
    assert batched_requests(mesh) > merged_before


def batched_requests(mesh) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.metrics_port}/metrics") as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("modelmesh_batched_requests_total "):
                return float(line.split()[1])
    return 0.0


def triton_np(datatype: str):
    from tritonclient.utils import triton_to_np_dtype

    return triton_to_np_dtype(datatype)


def test_fp64_input_and_typed_contents_give_same_answer(mgmt, v2, client, demo_models):
    register(mgmt, "typed-sk", "sklearn", demo_models["sklearn"].path)
    x = demo_input().astype(np.float64)
    # raw_input_contents through tritonclient, FP64
    inp = triton.InferInput("input-0", list(x.shape), "FP64")
    inp.set_data_from_numpy(x)
    raw_answer = client.infer("typed-sk", [inp]).as_numpy("predict")
    # typed contents (fp32_contents) through the raw V2 stub
    req = pb.ModelInferRequest(model_name="typed-sk")
    t = req.inputs.add(name="input-0", datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend(x.astype(np.float32).ravel().tolist())
    resp = v2.ModelInfer(req, timeout=30)
    out = resp.outputs[0]
    typed_answer = np.frombuffer(resp.raw_output_contents[0],
                                 dtype=triton_np(out.datatype)).reshape(tuple(out.shape))
    np.testing.assert_array_equal(raw_answer, typed_answer)


def test_requested_output_filtering(mgmt, client, demo_models):
    register(mgmt, "filter-sk", "sklearn", demo_models["sklearn"].path)
    x = demo_input().astype(np.float32)
    inp = triton.InferInput("input-0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("filter-sk", [inp],
                          outputs=[triton.InferRequestedOutput("predict_proba")])
    names = [o.name for o in result.get_response().outputs]
    assert names == ["predict_proba"]
    proba = result.as_numpy("predict_proba")
    assert proba.shape == (len(x), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    with pytest.raises(InferenceServerException) as err:
        client.infer("filter-sk", [inp], outputs=[triton.InferRequestedOutput("nope")])
    assert "nope" in str(err.value) and err.value.status() == "StatusCode.INVALID_ARGUMENT"


ALL_TYPES = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 7, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-32768, 0, 32767]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[0.5, -1.25, 65504]], dtype=np.float16),
    "FP32": np.array([[0.5, -1.25, 3.4e38]], dtype=np.float32),
    "FP64": np.array([[0.5, -1.25, 1e300]], dtype=np.float64),
    "BYTES": np.array([[b"", b"hello", "\u00e9t\u00e9".encode()]], dtype=np.object_),
}


def test_every_datatype_round_trips_through_identity(mgmt, client, demo_models):
    register(mgmt, "echo", "identity", demo_models["identity"].path)
    inputs = []
    for dt, arr in ALL_TYPES.items():
        i = triton.InferInput(f"in_{dt}", list(arr.shape), dt)
        i.set_data_from_numpy(arr)
        inputs.append(i)
    result = client.infer("echo", inputs)
    for dt, arr in ALL_TYPES.items():
        got = result.as_numpy(f"in_{dt}")
        assert got.shape == arr.shape, dt
        if dt == "BYTES":
            assert got.tolist() == arr.tolist()
        else:
            np.testing.assert_array_equal(got, arr, err_msg=dt)
        out = next(o for o in result.get_response().outputs if o.name == f"in_{dt}")
        assert out.datatype == dt


def test_bf16_round_trips(mgmt, v2, demo_models):
    register(mgmt, "echo-bf16", "identity", demo_models["identity"].path)
    values = np.array([1.0, -2.5, 0.15625], dtype=np.float32)  # exact in bf16
    bits = (values.view(np.uint32) >> 16).astype("<u2")
    req = pb.ModelInferRequest(model_name="echo-bf16")
    req.inputs.add(name="x", datatype="BF16", shape=[3])
    req.raw_input_contents.append(bits.tobytes())
    resp = v2.ModelInfer(req, timeout=30)
    out = next(i for i, o in enumerate(resp.outputs) if o.name == "x")
    assert resp.outputs[out].datatype == "BF16"
    back = np.frombuffer(resp.raw_output_contents[out], dtype="<u2")
    np.testing.assert_array_equal(back, bits)


def test_parameters_of_every_kind_reach_the_runtime(mgmt, v2, demo_models):
    register(mgmt, "echo-params", "identity", demo_models["identity"].path)
    req = pb.ModelInferRequest(model_name="echo-params")
    req.inputs.add(name="x", datatype="INT32", shape=[1]).contents.int_contents.append(1)
    req.parameters["b"].bool_param = True
    req.parameters["i"].int64_param = -42
    req.parameters["s"].string_param = "text"
    req.parameters["d"].double_param = 2.5
    req.parameters["u"].uint64_param = 2**64 - 1
    resp = v2.ModelInfer(req, timeout=30)
    idx = next(i for i, o in enumerate(resp.outputs) if o.name == "parameters")
    raw = resp.raw_output_contents[idx]
    params = json.loads(raw[4:])  # one BYTES element: 4-byte length prefix, then JSON
    assert params == {"b": True, "i": -42, "s": "text", "d": 2.5, "u": 2**64 - 1}


def test_stream_infer(mgmt, client, demo_models):
    register(mgmt, "stream-sk", "sklearn", demo_models["sklearn"].path)
    x = demo_input().astype(np.float32)
    results: list = []
    done = threading.Event()

    def callback(result, error):
        results.append((result, error))
        if len(results) == 3:
            done.set()

    client.start_stream(callback=callback)
    try:
        for model in ("stream-sk", "missing-model", "stream-sk"):
            inp = triton.InferInput("input-0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.async_stream_infer(model, [inp])
        assert done.wait(30)
    finally:
        client.stop_stream()
    errors = [e for _, e in results if e is not None]
    oks = [r for r, e in results if e is None]
    assert len(oks) == 2 and len(errors) == 1 and "missing-model" in str(errors[0])


def test_model_metadata_config_statistics_and_repository(mgmt, client, v2, demo_models):
    register(mgmt, "meta-onnx", "onnx", demo_models["onnx"].path)
    meta = client.get_model_metadata("meta-onnx")
    assert meta.platform == "onnx" and meta.inputs and meta.outputs
    config = client.get_model_config("meta-onnx").config
    assert config.name == "meta-onnx" and [i.name for i in config.input] == \
        [i.name for i in meta.inputs]
    x = demo_input().astype(np.float32)
    inp = triton.InferInput(meta.inputs[0].name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    client.infer("meta-onnx", [inp])
    stats = client.get_inference_statistics("meta-onnx").model_stats[0]
    assert stats.execution_count >= 1 and stats.inference_stats.success.count >= 1
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["meta-onnx"].state == "READY"
    client.unload_model("meta-onnx")
    assert not client.is_model_ready("meta-onnx")
    client.load_model("meta-onnx")
    assert client.is_model_ready("meta-onnx")
    assert client.is_server_live() and client.is_server_ready()
    with pytest.raises(grpc.RpcError) as err:
        v2.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- bad input --------------------------------------------------------------------------


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_unknown_model_is_not_found(v2):
    req = pb.ModelInferRequest(model_name="no-such-model")
    req.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1)
    code, msg = code_of(lambda: v2.ModelInfer(req, timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-model" in msg


def test_bad_tensors_are_invalid_argument(mgmt, v2, demo_models):
    register(mgmt, "bad-in", "sklearn", demo_models["sklearn"].path)
    # byte size does not match shape x datatype
    req = pb.ModelInferRequest(model_name="bad-in")
    req.inputs.add(name="input-0", datatype="FP32", shape=[2, 4])
    req.raw_input_contents.append(b"\0" * 12)
    code, msg = code_of(lambda: v2.ModelInfer(req, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input-0" in msg
    # two inputs but one raw buffer
    req = pb.ModelInferRequest(model_name="bad-in")
    req.inputs.add(name="a", datatype="FP32", shape=[1, 4])
    req.inputs.add(name="b", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(b"\0" * 16)
    code, msg = code_of(lambda: v2.ModelInfer(req, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in msg
    # unknown datatype
    req = pb.ModelInferRequest(model_name="bad-in")
    req.inputs.add(name="input-0", datatype="FP128", shape=[1, 4])
    req.raw_input_contents.append(b"\0" * 64)
    code, msg = code_of(lambda: v2.ModelInfer(req, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "FP128" in msg
    # wrong feature count for the model
    req = pb.ModelInferRequest(model_name="bad-in")
    req.inputs.add(name="input-0", datatype="FP32", shape=[1, 3])
    req.raw_input_contents.append(b"\0" * 12)
    code, msg = code_of(lambda: v2.ModelInfer(req, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # the model still serves good requests
    ok = pb.ModelInferRequest(model_name="bad-in")
    ok.inputs.add(name="input-0", datatype="FP32", shape=[1, 4])
    ok.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    assert v2.ModelInfer(ok, timeout=10).outputs


def test_corrupt_and_wrong_type_models_fail_alone(mgmt, v2, models_root, demo_models):
    (models_root / "corrupt.joblib").write_bytes(b"this is not a pickle")
    status = register(mgmt, "corrupt", "sklearn", "corrupt.joblib")
    assert ST.ModelStatus.Name(status.status) == "LOADING_FAILED"
    assert status.errors and status.errors[0]
    status = register(mgmt, "wrong-type", "sklearn", demo_models["xgboost"].path)
    assert ST.ModelStatus.Name(status.status) == "LOADING_FAILED" and status.errors
    req = pb.ModelInferRequest(model_name="corrupt")
    req.inputs.add(name="input-0", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    code, msg = code_of(lambda: v2.ModelInfer(req, timeout=10))
    assert "corrupt" in msg and code != grpc.StatusCode.OK
    # every other model keeps serving
    register(mgmt, "still-fine", "sklearn", demo_models["sklearn"].path)
    req.model_name = "still-fine"
    assert v2.ModelInfer(req, timeout=10).outputs
    got = mgmt.getModelStatus(mm.GetStatusRequest(modelId="corrupt"), timeout=10)
    assert ST.ModelStatus.Name(got.status) == "LOADING_FAILED"


def test_oversized_request_is_resource_exhausted(mesh, demo_models, mgmt):
    register(mgmt, "big-req", "identity", demo_models["identity"].path)
    with grpc.insecure_channel(mesh.endpoint, options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024)]) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        req = pb.ModelInferRequest(model_name="big-req")
        req.inputs.add(name="x", datatype="UINT8", shape=[20 * 1024 * 1024])
        req.raw_input_contents.append(b"\0" * (20 * 1024 * 1024))
        code, _ = code_of(lambda: stub.ModelInfer(req, timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_registration_conflicts_and_bad_definitions(mgmt, demo_models):
    register(mgmt, "conflict", "sklearn", demo_models["sklearn"].path, load_now=False)
    # identical re-registration is idempotent
    register(mgmt, "conflict", "sklearn", demo_models["sklearn"].path, load_now=False)
    code, msg = code_of(lambda: register(mgmt, "conflict", "xgboost",
                                         demo_models["xgboost"].path, load_now=False))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "conflict" in msg
    replaced = register(mgmt, "conflict", "xgboost", demo_models["xgboost"].path, replace=True)
    assert ST.ModelStatus.Name(replaced.status) == "LOADED"
    code, msg = code_of(lambda: register(mgmt, "escape", "sklearn", "../../etc/passwd"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside" in msg
    code, msg = code_of(lambda: register(mgmt, "badtype", "tensorflow", "x.pb"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "tensorflow" in msg
    code, msg = code_of(lambda: register(mgmt, "", "sklearn", "x.joblib"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # nothing above changed the registry entry that exists
    st = mgmt.getModelStatus(mm.GetStatusRequest(modelId="conflict"), timeout=10)
    assert ST.ModelStatus.Name(st.status) == "LOADED"
    assert ST.ModelStatus.Name(mgmt.getModelStatus(
        mm.GetStatusRequest(modelId="escape"), timeout=10).status) == "NOT_FOUND"


def test_reregistering_with_new_copy_limits_is_accepted(mgmt, demo_models):
    register(mgmt, "limits-later", "sklearn", demo_models["sklearn"].path, load_now=False)
    request = mm.RegisterModelRequest(
        modelId="limits-later",
        modelInfo=mm.ModelInfo(type="sklearn", path=str(demo_models["sklearn"].path)))
    status = mgmt.registerModel(request, metadata=[("mm-min-copies", "0"),
                                                   ("mm-max-copies", "2")], timeout=30)
    assert ST.ModelStatus.Name(status.status) in ("NOT_LOADED", "LOADING", "LOADED")


def test_unregister_unloads_and_forgets(mgmt, v2, demo_models):
    register(mgmt, "gone-soon", "sklearn", demo_models["sklearn"].path)
    mgmt.unregisterModel(mm.UnregisterModelRequest(modelId="gone-soon"), timeout=10)
    st = mgmt.getModelStatus(mm.GetStatusRequest(modelId="gone-soon"), timeout=10)
    assert ST.ModelStatus.Name(st.status) == "NOT_FOUND"
    # unregistering again is idempotent clean-up (OK, no effect), as in ModelMesh
    mgmt.unregisterModel(mm.UnregisterModelRequest(modelId="gone-soon"), timeout=10)
    idx = v2.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    assert "gone-soon" not in {m.name for m in idx.models}


# -- vmodels ------------------------------------------------------------------------------


def test_vmodels(mgmt, client, demo_models):
    VS = mm.VModelStatusInfo
    register(mgmt, "vm-a", "sklearn", demo_models["sklearn"].path)
    code, _ = code_of(lambda: mgmt.setVModel(mm.SetVModelRequest(
        vModelId="vm", targetModelId="vm-a", updateOnly=True), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND
    st = mgmt.setVModel(mm.SetVModelRequest(vModelId="vm", targetModelId="vm-a", sync=True,
                                            loadNow=True), timeout=30)
    assert VS.VModelStatus.Name(st.status) == "DEFINED" and st.activeModelId == "vm-a"
    # the vmodel name serves the active model
    x = demo_input().astype(np.float32)
    inp = triton.InferInput("input-0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    assert client.infer("vm", [inp]).as_numpy("predict") is not None
    # compare-and-set on the expected target
    code, msg = code_of(lambda: mgmt.setVModel(mm.SetVModelRequest(
        vModelId="vm", targetModelId="vm-b", expectedTargetModelId="wrong",
        modelInfo=mm.ModelInfo(type="lightgbm", path=str(demo_models["lightgbm"].path))),
        timeout=30))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "vm-a" in msg
    st = mgmt.setVModel(mm.SetVModelRequest(
        vModelId="vm", targetModelId="vm-b", expectedTargetModelId="vm-a",
        autoDeleteTargetModel=True, loadNow=True, sync=True,
        modelInfo=mm.ModelInfo(type="lightgbm", path=str(demo_models["lightgbm"].path))),
        timeout=60)
    assert st.activeModelId == "vm-b" and st.targetModelId == "vm-b"
    assert VS.VModelStatus.Name(st.status) == "DEFINED"
    # a model used by a vmodel cannot be unregistered
    code, _ = code_of(lambda: mgmt.unregisterModel(
        mm.UnregisterModelRequest(modelId="vm-b"), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    mgmt.deleteVModel(mm.DeleteVModelRequest(vModelId="vm"), timeout=10)
    assert VS.VModelStatus.Name(mgmt.getVModelStatus(
        mm.GetVModelStatusRequest(vModelId="vm"), timeout=10).status) == "NOT_FOUND"
    # vm-b was auto-delete: gone with its vmodel; vm-a was registered by hand: kept
    assert ST.ModelStatus.Name(mgmt.getModelStatus(
        mm.GetStatusRequest(modelId="vm-b"), timeout=10).status) == "NOT_FOUND"
    assert ST.ModelStatus.Name(mgmt.getModelStatus(
        mm.GetStatusRequest(modelId="vm-a"), timeout=10).status) != "NOT_FOUND"


def test_vmodel_force_switches_before_load(mgmt, demo_models):
    register(mgmt, "fv-a", "sklearn", demo_models["sklearn"].path)
    register(mgmt, "fv-b", "onnx", demo_models["onnx"].path, load_now=False)
    mgmt.setVModel(mm.SetVModelRequest(vModelId="fv", targetModelId="fv-a"), timeout=30)
    st = mgmt.setVModel(mm.SetVModelRequest(vModelId="fv", targetModelId="fv-b", force=True,
                                            loadNow=False), timeout=30)
    assert st.activeModelId == "fv-b"


# -- listing and the CLI ------------------------------------------------------------------


def test_list_models_pages(mesh, demo_models):
    with grpc.insecure_channel(mesh.endpoint) as ch:
        stub = ext_grpc.ModelMeshExtensionsStub(ch)
        reqs = [mm.RegisterModelRequest(modelId=f"page-{i:03d}", modelInfo=mm.ModelInfo(
            type="sklearn", path=str(demo_models["sklearn"].path))) for i in range(25)]
        reqs.append(mm.RegisterModelRequest(modelId="page-bad", modelInfo=mm.ModelInfo(
            type="nope", path="x")))
        res = stub.registerModels(ext.RegisterModelsRequest(requests=reqs), timeout=30)
        assert [r.code for r in res.results[:25]] == [0] * 25
        assert res.results[25].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        seen, token = [], ""
        while True:
            page = stub.listModels(ext.ListModelsRequest(page_size=10, page_token=token,
                                                         prefix="page-"), timeout=10)
            assert len(page.models) <= 10 and page.total == 25
            seen += [m.modelId for m in page.models]
            token = page.next_page_token
            if not token:
                break
        assert seen == [f"page-{i:03d}" for i in range(25)]
        code, _ = code_of(lambda: stub.listModels(ext.ListModelsRequest(page_size=-1),
                                                  timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        cluster = stub.clusterStatus(ext.ClusterStatusRequest(), timeout=10)
        assert len(cluster.instances) == 1 and cluster.models >= 25
        inst = cluster.instances[0]
        assert 0 < inst.usedBytes <= inst.capacityBytes


def cli(mesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelmesh", *args, "--endpoint", mesh.endpoint],
                          capture_output=True, text=True, timeout=60)


def test_cli_commands(mesh, tmp_path, demo_models):
    sk = str(demo_models["sklearn"].path)
    r = cli(mesh, "register", "cli-a", "--type", "sklearn", "--path", sk, "--load-now", "--sync")
    assert r.returncode == 0 and "LOADED" in r.stdout, r.stderr
    r = cli(mesh, "status", "cli-a", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "LOADED"
    csv_file = tmp_path / "bulk.csv"
    csv_file.write_text("model_id,type,path\n" + "".join(
        f"cli-bulk-{i},sklearn,{sk}\n" for i in range(30)))
    r = cli(mesh, "register", "--from-file", str(csv_file), "--quiet")
    assert r.returncode == 0 and "registered 30 of 30" in r.stdout, r.stderr
    r = cli(mesh, "list", "--json", "--prefix", "cli-")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 31
    bad = tmp_path / "bad.csv"
    bad.write_text("cli-x,sklearn\n")
    r = cli(mesh, "register", "--from-file", str(bad))
    assert r.returncode == 2 and "bad.csv:1" in r.stderr
    r = cli(mesh, "unregister", "cli-a")
    assert r.returncode == 0
    r = cli(mesh, "status", "cli-a")
    assert r.returncode == 1 and "NOT_FOUND" in r.stdout


def test_metrics_endpoint(mesh, mgmt, demo_models):
    register(mgmt, "metrics-sk", "sklearn", demo_models["sklearn"].path)
    text = urllib.request.urlopen(f"http://127.0.0.1:{mesh.metrics_port}/metrics",
                                  timeout=5).read().decode()
    for name in ("modelmesh_api_request_milliseconds", "modelmesh_loadmodel_milliseconds",
                 "modelmesh_instance_capacity_bytes", "modelmesh_instance_used_bytes",
                 "modelmesh_instance_models_total", "modelmesh_loadmodel_failure"):
        assert name in text, name


def test_models_root_escape_by_symlink_is_refused(mgmt, models_root, tmp_path):
    outside = tmp_path / "outside.joblib"
    shutil.copy(models_root / "corrupt.joblib" if (models_root / "corrupt.joblib").exists()
                else __file__, outside)
    link = models_root / "link-out.joblib"
    if not link.exists():
        link.symlink_to(outside)
    code, msg = code_of(lambda: register(mgmt, "via-link", "sklearn", "link-out.joblib"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside" in msg


def test_modelmesh_simulate_command(tmp_path):
    config = Path(__file__).resolve().parents[2] / "simulations" / "configs" / "equal-sizes.yaml"
    r = subprocess.run([sys.executable, "-m", "modelmesh", "simulate", str(config), "--out",
                        str(tmp_path / "sim"), "--no-progress", "--no-plots"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "sim" / "results.json").read_text())
    assert "modelmesh" in results and results["modelmesh"]["requests"] > 0


def test_concurrent_registrations_share_transactions_without_losing_any(mesh, mgmt,
                                                                         demo_models):
    """Hundreds of registerModel calls at once (their etcd writes are grouped): each new id
    is registered once, a repeat of the same definition succeeds, a different definition
    for an existing id is refused, and nothing else is touched."""
    import asyncio

    sk, onnx = str(demo_models["sklearn"].path), str(demo_models["onnx"].path)
    register(mgmt, "burst-existing", "sklearn", sk, load_now=False)

    async def burst() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(mesh.endpoint) as ch:
            stub = mm_grpc.ModelMeshStub(ch)

            async def one(model_id: str, path: str, model_type: str) -> grpc.StatusCode:
                try:
                    await stub.registerModel(mm.RegisterModelRequest(
                        modelId=model_id, modelInfo=mm.ModelInfo(type=model_type, path=path)),
                        timeout=60)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

            calls = [one(f"burst-{i:03d}", sk, "sklearn") for i in range(300)]
            calls += [one(f"burst-{i:03d}", sk, "sklearn") for i in range(0, 300, 30)]  # repeats
            calls += [one("burst-existing", sk, "sklearn"),  # same definition: fine
                      one("burst-existing", onnx, "onnx"),  # another definition: refused
                      one("burst-007", onnx, "onnx")]  # refused, or wins and 007 is refused
            return await asyncio.gather(*calls)

    codes = asyncio.run(burst())
    new, repeats, tail = codes[:300], codes[300:310], codes[310:]
    assert tail[:2] == [grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS]
    # burst-007 got two definitions at once: exactly one of them won.
    assert sorted([new[7].name, tail[2].name]) == ["ALREADY_EXISTS", "OK"]
    others = [c for i, c in enumerate(new) if i != 7]
    assert set(others) == {grpc.StatusCode.OK} and set(repeats) == {grpc.StatusCode.OK}
    for i in range(300):
        status = mgmt.getModelStatus(mm.GetStatusRequest(modelId=f"burst-{i:03d}"), timeout=10)
        assert ST.ModelStatus.Name(status.status) == "NOT_LOADED"
    with grpc.insecure_channel(mesh.endpoint) as ch:
        listed = ext_grpc.ModelMeshExtensionsStub(ch).listModels(
            ext.ListModelsRequest(page_size=1000), timeout=30)
    ids = [m.modelId for m in listed.models]
    assert sum(1 for i in ids if i.startswith("burst-")) == 301
