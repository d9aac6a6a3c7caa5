"""A small model runtime written from model-runtime.proto, as a third party would write one.

Run as a process: ``python -m tests.support.sum_runtime --listen HOST:PORT --record FILE``.
It knows one model format, ``sum-runtime-format`` (also accepted as the controller's
``mt:sum-runtime-format[:version]`` label and as ``rt:sum-runtime`` with any key):
loading a model of it reads nothing (the path and key are opaque to the mesh and to
this runtime alike); inference answers the sum of all elements of every input as
one FP32 output ``sum``. Any other type is refused by loadModel with INVALID_ARGUMENT
and the message ``sum-runtime cannot load models of type '<type>'``.

Every loadModel request, and the id headers of every ModelInfer call, are appended to
the ``--record`` file as JSON lines, so a test sees exactly what the mesh sent.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelmesh._proto.mmesh import model_runtime_pb2 as rt
from modelmesh._proto.mmesh import model_runtime_pb2_grpc as rt_grpc

FORMAT = "sum-runtime-format"
REFUSAL = "sum-runtime cannot load models of type '{}'"
SIZE = 4096


def accepts(model_type: str) -> bool:
    first = model_type.split("|")[0]
    return first in (FORMAT, f"mt:{FORMAT}") or first.startswith(f"mt:{FORMAT}:") or \
        first == "rt:sum-runtime"


class _State:
    def __init__(self, record: Path) -> None:
        self.record = record
        self.loaded: set[str] = set()
        self.lock = threading.Lock()

    def write(self, entry: dict) -> None:
        with self.lock, self.record.open("a") as f:
            f.write(json.dumps(entry) + "\n")


def _model_id(context: grpc.ServicerContext) -> tuple[str, dict]:
    seen: dict[str, str] = {}
    for k, v in context.invocation_metadata() or ():
        if k == "mm-model-id-bin":
            seen[k] = v.decode("utf-8") if isinstance(v, bytes) else v
        elif k == "mm-model-id":
            seen[k] = v
    return seen.get("mm-model-id-bin") or seen.get("mm-model-id", ""), seen


class Runtime(rt_grpc.ModelRuntimeServicer):
    def __init__(self, state: _State) -> None:
        self.state = state

    def runtimeStatus(self, request, context):  # noqa: N802
        return rt.RuntimeStatusResponse(
            status=rt.RuntimeStatusResponse.READY, capacityInBytes=64 << 20,
            maxLoadingConcurrency=2, modelLoadingTimeoutMs=20_000,
            defaultModelSizeInBytes=SIZE, runtimeVersion="sum-1")

    def loadModel(self, request, context):  # noqa: N802
        self.state.write({"call": "loadModel", "modelId": request.modelId,
                          "modelType": request.modelType, "modelPath": request.modelPath,
                          "modelKey": request.modelKey})
        if not accepts(request.modelType):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, REFUSAL.format(request.modelType))
        with self.state.lock:
            self.state.loaded.add(request.modelId)
        return rt.LoadModelResponse(sizeInBytes=SIZE)

    def unloadModel(self, request, context):  # noqa: N802
        with self.state.lock:
            self.state.loaded.discard(request.modelId)
        return rt.UnloadModelResponse()

    def predictModelSize(self, request, context):  # noqa: N802
        return rt.PredictModelSizeResponse(sizeInBytes=SIZE)

    def modelSize(self, request, context):  # noqa: N802
        return rt.ModelSizeResponse(sizeInBytes=SIZE)


class Inference(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: _State) -> None:
        self.state = state

    def ServerLive(self, request, context):  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    def ModelMetadata(self, request, context):  # noqa: N802
        model_id, _ = _model_id(context)
        return pb.ModelMetadataResponse(name=model_id or request.name, platform=FORMAT,
                                        versions=["1"])

    def ModelInfer(self, request, context):  # noqa: N802
        model_id, seen = _model_id(context)
        self.state.write({"call": "ModelInfer", "headers": seen,
                          "model_name": request.model_name})
        with self.state.lock:
            known = model_id in self.state.loaded
        if not known:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model '{model_id}' is not loaded here")
        total = 0.0
        for i, tensor in enumerate(request.inputs):
            if i < len(request.raw_input_contents):
                total += float(np.frombuffer(request.raw_input_contents[i], np.float32).sum())
            else:
                total += float(sum(tensor.contents.fp32_contents))
        out = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        out.outputs.add(name="sum", datatype="FP32", shape=[1])
        out.raw_output_contents.append(np.array([total], np.float32).tobytes())
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--record", required=True, type=Path)
    args = parser.parse_args()
    state = _State(args.record)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    rt_grpc.add_ModelRuntimeServicer_to_server(Runtime(state), server)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Inference(state), server)
    if not server.add_insecure_port(args.listen):
        raise SystemExit(f"cannot listen on {args.listen}")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(2).wait()


if __name__ == "__main__":
    main()
