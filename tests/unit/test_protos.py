"""Tests for the generated mmesh protobuf / gRPC stubs.

The field numbers, types and enum values asserted here were checked by hand
against KServe ModelMesh's published ``model-mesh.proto`` and
``model-runtime.proto`` (package ``mmesh``). They pin wire compatibility: if
one of these assertions fails, the change to protos/ breaks upstream clients.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FieldDescriptor as FD

from modelmesh._proto.mmesh import (
    mesh_extensions_pb2,
    mesh_extensions_pb2_grpc,
    model_mesh_pb2,
    model_mesh_pb2_grpc,
    model_runtime_pb2,
    model_runtime_pb2_grpc,
)

ROOT = Path(__file__).resolve().parents[2]
GEN_SCRIPT = ROOT / "scripts" / "gen_protos.py"

STRING, BOOL, MSG, ENUM = FD.TYPE_STRING, FD.TYPE_BOOL, FD.TYPE_MESSAGE, FD.TYPE_ENUM
U64, U32, I32, I64 = FD.TYPE_UINT64, FD.TYPE_UINT32, FD.TYPE_INT32, FD.TYPE_INT64
DBL = FD.TYPE_DOUBLE
REP = "repeated"


# --------------------------------------------------------------------------- generator


def test_generated_stubs_are_up_to_date():
    res = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, (
        "committed stubs in modelmesh/_proto are stale; run "
        "`python scripts/gen_protos.py`\n" + res.stdout + res.stderr
    )


def test_generated_code_has_no_toplevel_mmesh_imports():
    for path in (ROOT / "modelmesh" / "_proto" / "mmesh").glob("*_pb2*.py*"):
        for line in path.read_text().splitlines():
            assert not line.startswith(("from mmesh", "import mmesh")), f"{path.name}: {line}"


# --------------------------------------------------------------------------- coexistence


def test_import_alongside_tritonclient_in_one_process():
    # Fresh interpreter, both import orders: no descriptor pool conflicts.
    ours = (
        "from modelmesh._proto.mmesh import model_mesh_pb2, model_mesh_pb2_grpc, "
        "model_runtime_pb2, model_runtime_pb2_grpc, mesh_extensions_pb2, "
        "mesh_extensions_pb2_grpc"
    )
    triton = "import tritonclient.grpc.service_pb2, tritonclient.grpc.service_pb2_grpc"
    for first, second in ((ours, triton), (triton, ours)):
        code = f"{first}\n{second}\nprint('ok')\n"
        res = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_in_process_pool_has_both():
    from tritonclient.grpc import service_pb2  # noqa: F401

    pool = descriptor_pool.Default()
    assert pool.FindServiceByName("mmesh.ModelMesh")
    assert pool.FindServiceByName("mmesh.ModelRuntime")
    assert pool.FindServiceByName("mmesh.ModelMeshExtensions")
    assert pool.FindServiceByName("inference.GRPCInferenceService")
    assert model_mesh_pb2.DESCRIPTOR.name == "mmesh/model-mesh.proto"
    assert model_runtime_pb2.DESCRIPTOR.name == "mmesh/model-runtime.proto"
    assert mesh_extensions_pb2.DESCRIPTOR.name == "mmesh/mesh-extensions.proto"
    for mod in (model_mesh_pb2, model_runtime_pb2, mesh_extensions_pb2):
        assert mod.DESCRIPTOR.package == "mmesh"


# --------------------------------------------------------------------------- services


MODEL_MESH_METHODS = {
    "registerModel": ("RegisterModelRequest", "ModelStatusInfo"),
    "unregisterModel": ("UnregisterModelRequest", "UnregisterModelResponse"),
    "getModelStatus": ("GetStatusRequest", "ModelStatusInfo"),
    "ensureLoaded": ("EnsureLoadedRequest", "ModelStatusInfo"),
    "setVModel": ("SetVModelRequest", "VModelStatusInfo"),
    "deleteVModel": ("DeleteVModelRequest", "DeleteVModelResponse"),
    "getVModelStatus": ("GetVModelStatusRequest", "VModelStatusInfo"),
}
MODEL_RUNTIME_METHODS = {
    "loadModel": ("LoadModelRequest", "LoadModelResponse"),
    "unloadModel": ("UnloadModelRequest", "UnloadModelResponse"),
    "predictModelSize": ("PredictModelSizeRequest", "PredictModelSizeResponse"),
    "modelSize": ("ModelSizeRequest", "ModelSizeResponse"),
    "runtimeStatus": ("RuntimeStatusRequest", "RuntimeStatusResponse"),
}
EXTENSION_METHODS = {
    "listModels": ("ListModelsRequest", "ListModelsResponse"),
    "registerModels": ("RegisterModelsRequest", "RegisterModelsResponse"),
    "clusterStatus": ("ClusterStatusRequest", "ClusterStatusResponse"),
}


@pytest.mark.parametrize(
    "module,service,methods",
    [
        (model_mesh_pb2, "ModelMesh", MODEL_MESH_METHODS),
        (model_runtime_pb2, "ModelRuntime", MODEL_RUNTIME_METHODS),
        (mesh_extensions_pb2, "ModelMeshExtensions", EXTENSION_METHODS),
    ],
)
def test_service_methods(module, service, methods):
    svc = module.DESCRIPTOR.services_by_name[service]
    assert svc.full_name == f"mmesh.{service}"
    assert {m.name for m in svc.methods} == set(methods)
    for m in svc.methods:
        req, resp = methods[m.name]
        assert m.input_type.full_name == f"mmesh.{req}"
        assert m.output_type.full_name == f"mmesh.{resp}"
        assert not m.client_streaming and not m.server_streaming


class _RecordingChannel:
    """Fake channel capturing the method paths the generated stubs use."""

    def __init__(self):
        self.paths = []

    def unary_unary(self, path, *args, **kwargs):
        self.paths.append(path)
        return lambda *a, **k: None

    unary_stream = stream_unary = stream_stream = unary_unary


@pytest.mark.parametrize(
    "stub_cls,service,methods",
    [
        (model_mesh_pb2_grpc.ModelMeshStub, "ModelMesh", MODEL_MESH_METHODS),
        (model_runtime_pb2_grpc.ModelRuntimeStub, "ModelRuntime", MODEL_RUNTIME_METHODS),
        (
            mesh_extensions_pb2_grpc.ModelMeshExtensionsStub,
            "ModelMeshExtensions",
            EXTENSION_METHODS,
        ),
    ],
)
def test_stub_method_paths(stub_cls, service, methods):
    ch = _RecordingChannel()
    stub_cls(ch)
    assert sorted(ch.paths) == sorted(f"/mmesh.{service}/{m}" for m in methods)
    if service == "ModelMesh":
        assert "/mmesh.ModelMesh/registerModel" in ch.paths
        assert "/mmesh.ModelMesh/setVModel" in ch.paths
    if service == "ModelRuntime":
        assert "/mmesh.ModelRuntime/loadModel" in ch.paths


# --------------------------------------------------------------------------- messages

# (message class, {field: (number, type, label?)}) -- complete field sets for
# the upstream-compatible messages, so added/removed fields are caught too.
MM = model_mesh_pb2
MR = model_runtime_pb2
EX = mesh_extensions_pb2

EXPECTED_FIELDS = [
    (
        MM.RegisterModelRequest,
        {
            "modelId": (1, STRING),
            "modelInfo": (2, MSG),
            "loadNow": (3, BOOL),
            "sync": (4, BOOL),
            "lastUsedTime": (5, U64),
        },
    ),
    (MM.ModelInfo, {"type": (1, STRING), "path": (2, STRING), "key": (3, STRING)}),
    (
        MM.ModelStatusInfo,
        {
            "status": (1, ENUM),
            "errors": (2, STRING, REP),
            "modelCopyInfos": (3, MSG, REP),
        },
    ),
    (
        MM.ModelStatusInfo.ModelCopyInfo,
        {
            "location": (1, STRING),
            "copyStatus": (2, ENUM),
            "time": (3, U64),
        },
    ),
    (MM.UnregisterModelRequest, {"modelId": (1, STRING)}),
    (MM.UnregisterModelResponse, {}),
    (MM.GetStatusRequest, {"modelId": (1, STRING)}),
    (MM.EnsureLoadedRequest, {"modelId": (1, STRING), "lastUsedTime": (2, U64), "sync": (4, BOOL)}),
    (
        MM.VModelStatusInfo,
        {
            "status": (1, ENUM),
            "activeModelId": (2, STRING),
            "targetModelId": (3, STRING),
            "activeModelStatus": (4, MSG),
            "targetModelStatus": (5, MSG),
            "owner": (6, STRING),
        },
    ),
    (MM.DeleteVModelRequest, {"vModelId": (1, STRING), "owner": (2, STRING)}),
    (MM.DeleteVModelResponse, {}),
    (
        MM.SetVModelRequest,
        {
            "vModelId": (1, STRING),
            "targetModelId": (2, STRING),
            "updateOnly": (3, BOOL),
            "modelInfo": (4, MSG),
            "autoDeleteTargetModel": (5, BOOL),
            "loadNow": (6, BOOL),
            "force": (7, BOOL),
            "sync": (8, BOOL),
            "expectedTargetModelId": (9, STRING),
            "owner": (10, STRING),
        },
    ),
    (MM.GetVModelStatusRequest, {"vModelId": (1, STRING), "owner": (2, STRING)}),
    (
        MR.LoadModelRequest,
        {
            "modelId": (1, STRING),
            "modelType": (2, STRING),
            "modelPath": (3, STRING),
            "modelKey": (4, STRING),
        },
    ),
    (MR.LoadModelResponse, {"sizeInBytes": (1, U64), "maxConcurrency": (2, U32)}),
    (MR.UnloadModelRequest, {"modelId": (1, STRING)}),
    (MR.UnloadModelResponse, {}),
    (
        MR.PredictModelSizeRequest,
        {
            "modelId": (1, STRING),
            "modelType": (2, STRING),
            "modelPath": (3, STRING),
            "modelKey": (4, STRING),
        },
    ),
    (MR.PredictModelSizeResponse, {"sizeInBytes": (1, U64)}),
    (MR.ModelSizeRequest, {"modelId": (1, STRING)}),
    (MR.ModelSizeResponse, {"sizeInBytes": (1, U64)}),
    (MR.RuntimeStatusRequest, {}),
    (
        MR.RuntimeStatusResponse,
        {
            "status": (1, ENUM),
            "capacityInBytes": (2, U64),
            "maxLoadingConcurrency": (3, U32),
            "modelLoadingTimeoutMs": (4, U32),
            "defaultModelSizeInBytes": (5, U64),
            "runtimeVersion": (6, STRING),
            "numericRuntimeVersion": (7, U64),
            "methodInfos": (8, MSG, REP),
            "limitModelConcurrency": (9, BOOL),
            "allowAnyMethod": (10, BOOL),
        },
    ),
    (MR.RuntimeStatusResponse.MethodInfo, {"idInjectionPath": (1, U32, REP)}),
    # --- our extensions
    (
        EX.ListModelsRequest,
        {
            "page_size": (1, I32),
            "page_token": (2, STRING),
            "prefix": (3, STRING),
            "include_status": (4, BOOL),
        },
    ),
    (
        EX.ListModelsResponse,
        {
            "models": (1, MSG, REP),
            "next_page_token": (2, STRING),
            "total": (3, I64),
        },
    ),
    (
        EX.ListedModel,
        {
            "modelId": (1, STRING),
            "modelInfo": (2, MSG),
            "status": (3, MSG),
            "autoDelete": (4, BOOL),
        },
    ),
    (EX.RegisterModelsRequest, {"requests": (1, MSG, REP), "replace": (2, BOOL)}),
    (EX.RegisterModelsResponse, {"results": (1, MSG, REP)}),
    (EX.RegisterResult, {"modelId": (1, STRING), "code": (2, I32), "message": (3, STRING)}),
    (EX.ClusterStatusRequest, {}),
    (
        EX.ClusterStatusResponse,
        {
            "instances": (1, MSG, REP),
            "models": (2, I64),
            "vmodels": (3, I64),
        },
    ),
    (
        EX.InstanceInfo,
        {
            "instanceId": (1, STRING),
            "endpoint": (2, STRING),
            "capacityBytes": (3, I64),
            "usedBytes": (4, I64),
            "modelCount": (5, I32),
            "lruTimeMs": (6, I64),
            "shuttingDown": (7, BOOL),
            "version": (8, STRING),
            "labels": (9, MSG, REP),
            "loadingCount": (10, I32),
            "requestsPerMinute": (11, DBL),
            "inFlight": (12, I32),
        },
    ),
]


@pytest.mark.parametrize(
    "cls,fields", EXPECTED_FIELDS, ids=[c.DESCRIPTOR.full_name for c, _ in EXPECTED_FIELDS]
)
def test_message_fields(cls, fields):
    desc = cls.DESCRIPTOR
    assert set(desc.fields_by_name) == set(fields), desc.full_name
    for name, spec in fields.items():
        number, ftype = spec[0], spec[1]
        repeated = len(spec) > 2
        f = desc.fields_by_name[name]
        assert f.number == number, f"{desc.full_name}.{name}"
        assert f.type == ftype, f"{desc.full_name}.{name}"
        assert f.is_repeated == repeated, f"{desc.full_name}.{name}"


def test_key_field_numbers():
    # Spot checks spelled out explicitly (mirrors upstream model-mesh.proto).
    rmr = model_mesh_pb2.RegisterModelRequest.DESCRIPTOR.fields_by_name
    assert rmr["modelId"].number == 1
    assert rmr["modelInfo"].number == 2
    assert rmr["loadNow"].number == 3
    assert rmr["sync"].number == 4
    svm = model_mesh_pb2.SetVModelRequest.DESCRIPTOR.fields_by_name
    assert svm["owner"].number == 10
    assert svm["expectedTargetModelId"].number == 9
    assert svm["autoDeleteTargetModel"].number == 5
    msi = model_mesh_pb2.ModelStatusInfo.DESCRIPTOR.fields_by_name
    assert msi["modelCopyInfos"].number == 3
    assert msi["modelCopyInfos"].message_type.full_name == "mmesh.ModelStatusInfo.ModelCopyInfo"
    rsr = model_runtime_pb2.RuntimeStatusResponse.DESCRIPTOR.fields_by_name
    assert rsr["limitModelConcurrency"].number == 9
    assert rsr["methodInfos"].message_type.GetOptions().map_entry


def test_message_type_references():
    mm = model_mesh_pb2
    assert (
        mm.RegisterModelRequest.DESCRIPTOR.fields_by_name["modelInfo"].message_type
        is mm.ModelInfo.DESCRIPTOR
    )
    assert (
        mm.SetVModelRequest.DESCRIPTOR.fields_by_name["modelInfo"].message_type
        is mm.ModelInfo.DESCRIPTOR
    )
    for f in ("activeModelStatus", "targetModelStatus"):
        assert (
            mm.VModelStatusInfo.DESCRIPTOR.fields_by_name[f].message_type
            is mm.ModelStatusInfo.DESCRIPTOR
        )
    ex = mesh_extensions_pb2
    assert (
        ex.ListedModel.DESCRIPTOR.fields_by_name["status"].message_type
        is mm.ModelStatusInfo.DESCRIPTOR
    )
    assert (
        ex.RegisterModelsRequest.DESCRIPTOR.fields_by_name["requests"].message_type
        is mm.RegisterModelRequest.DESCRIPTOR
    )
    labels = ex.InstanceInfo.DESCRIPTOR.fields_by_name["labels"].message_type
    assert labels.GetOptions().map_entry
    assert labels.fields_by_name["value"].type == STRING


def test_ensure_loaded_field_3_reserved():
    # Upstream reserves #3 (removed excludeInstances); we must never reuse it.
    desc = model_mesh_pb2.EnsureLoadedRequest.DESCRIPTOR
    assert 3 not in desc.fields_by_number
    proto = descriptor_pb2.DescriptorProto()
    desc.CopyToProto(proto)
    assert any(r.start <= 3 < r.end for r in proto.reserved_range)


def test_enums():
    ms = model_mesh_pb2.ModelStatusInfo.ModelStatus
    assert dict(ms.items()) == {
        "NOT_FOUND": 0,
        "NOT_LOADED": 1,
        "LOADING": 2,
        "LOADED": 3,
        "LOADING_FAILED": 4,
        "UNKNOWN": 5,
    }
    vs = model_mesh_pb2.VModelStatusInfo.VModelStatus
    assert dict(vs.items()) == {
        "NOT_FOUND": 0,
        "DEFINED": 1,
        "TRANSITIONING": 2,
        "TRANSITION_FAILED": 3,
        "UNKNOWN": 5,
    }
    rs = model_runtime_pb2.RuntimeStatusResponse.Status
    assert dict(rs.items()) == {"STARTING": 0, "READY": 1, "FAILING": 2}
    # nested-enum value access as used by callers
    assert model_mesh_pb2.ModelStatusInfo.LOADED == 3
    assert model_runtime_pb2.RuntimeStatusResponse.READY == 1


def test_wire_bytes_of_register_request():
    # Hand-encoded bytes of an upstream RegisterModelRequest: the decoding
    # must see the same fields.
    raw = (
        b"\x0a\x02m1"  # 1: modelId = "m1"
        b"\x12\x08\x0a\x02sk\x12\x02/p"  # 2: modelInfo{type="sk", path="/p"}
        b"\x18\x01"  # 3: loadNow = true
        b"\x20\x01"  # 4: sync = true
        b"\x28\x07"  # 5: lastUsedTime = 7
    )
    req = model_mesh_pb2.RegisterModelRequest.FromString(raw)
    assert req.modelId == "m1"
    assert req.modelInfo.type == "sk" and req.modelInfo.path == "/p"
    assert req.loadNow and req.sync and req.lastUsedTime == 7
    assert req.SerializeToString(deterministic=True) == raw


# --------------------------------------------------------------------------- end to end


class _Mesh(model_mesh_pb2_grpc.ModelMeshServicer):
    def registerModel(self, request, context):
        md = dict(context.invocation_metadata())
        errors = ["replace"] if md.get("mm-replace") == "true" else []
        return model_mesh_pb2.ModelStatusInfo(
            status=model_mesh_pb2.ModelStatusInfo.NOT_LOADED, errors=errors
        )


class _Ext(mesh_extensions_pb2_grpc.ModelMeshExtensionsServicer):
    def registerModels(self, request, context):
        return mesh_extensions_pb2.RegisterModelsResponse(
            results=[
                mesh_extensions_pb2.RegisterResult(
                    modelId=r.modelId, code=0 if request.replace else 6
                )
                for r in request.requests
            ]
        )


def test_grpc_roundtrip_over_real_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    model_mesh_pb2_grpc.add_ModelMeshServicer_to_server(_Mesh(), server)
    mesh_extensions_pb2_grpc.add_ModelMeshExtensionsServicer_to_server(_Ext(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            mesh = model_mesh_pb2_grpc.ModelMeshStub(ch)
            req = model_mesh_pb2.RegisterModelRequest(
                modelId="m1", modelInfo=model_mesh_pb2.ModelInfo(type="sklearn", path="/m")
            )
            st = mesh.registerModel(req, timeout=10, metadata=[("mm-replace", "true")])
            assert st.status == model_mesh_pb2.ModelStatusInfo.NOT_LOADED
            assert list(st.errors) == ["replace"]

            # unimplemented methods surface as UNIMPLEMENTED, not a crash
            with pytest.raises(grpc.RpcError) as ei:
                mesh.getModelStatus(model_mesh_pb2.GetStatusRequest(modelId="m1"), timeout=10)
            assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED

            ext = mesh_extensions_pb2_grpc.ModelMeshExtensionsStub(ch)
            resp = ext.registerModels(
                mesh_extensions_pb2.RegisterModelsRequest(requests=[req, req], replace=True),
                timeout=10,
            )
            assert [(r.modelId, r.code) for r in resp.results] == [("m1", 0), ("m1", 0)]
    finally:
        server.stop(None)
