"""The gRPC server behind ``modelmesh runtime`` (flags: ``modelmesh.runtime_server``).

``ModelRuntimeServicer`` answers the mesh's runtime SPI calls and
``RuntimeInferenceServicer`` the V2 inference calls, both on the runtime's
``LoadedModels`` (``models``); ``RuntimeServer`` binds them to one gRPC server
and owns its lifetime. The rules they keep are in ``modelmesh.runtime_server``'s
docstring.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelmesh import __version__, codec
from modelmesh._proto.mmesh import model_runtime_pb2 as rt
from modelmesh._proto.mmesh import model_runtime_pb2_grpc as rt_grpc
from modelmesh.api.registered import HotMethodsOnly
from modelmesh.api.status import grpc_code, grpc_errors, status_of
from modelmesh.batching import PredictionRunner
from modelmesh.errors import (
    InvalidArgument,
    MeshError,
    ModelLoadFailed,
    StorageError,
    Unavailable,
)
from modelmesh.headers import MODEL_ID, metadata_value
from modelmesh.registry.records import ModelRecord
from modelmesh.runtime_server.models import LoadedModels
from modelmesh.runtime_server.settings import RuntimeServerSettings
from modelmesh.runtimes import get_runtime
from modelmesh.security.tls import TlsFiles

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- servicers


def _record(request: rt.LoadModelRequest | rt.PredictModelSizeRequest) -> ModelRecord:
    if not request.modelId:
        raise InvalidArgument("modelId is required")
    if not request.modelType:
        raise InvalidArgument(f"model '{request.modelId}': modelType is required")
    return ModelRecord(request.modelId, request.modelType, request.modelPath,
                       storage_key=request.modelKey)


class ModelRuntimeServicer(rt_grpc.ModelRuntimeServicer):
    """``mmesh.ModelRuntime``: what the mesh calls to manage models here."""

    def __init__(self, models: LoadedModels, settings: RuntimeServerSettings,
                 executor: ThreadPoolExecutor) -> None:
        self.models = models
        self.settings = settings
        self.executor = executor

    async def loadModel(self, request, context):  # noqa: N802
        try:
            record = _record(request)
            model = await self.models.load(record)
        except ModelLoadFailed as exc:  # the reason alone: the mesh adds the model id
            await context.abort(grpc.StatusCode.INTERNAL, exc.reason)
        except MeshError as exc:
            code, message = status_of(exc)
            await context.abort(grpc_code(code), message)
        return rt.LoadModelResponse(sizeInBytes=max(int(model.size_bytes), 1))

    @grpc_errors("unloadModel")
    async def unloadModel(self, request, context):  # noqa: N802
        self.models.unload(request.modelId)
        return rt.UnloadModelResponse()

    @grpc_errors("predictModelSize")
    async def predictModelSize(self, request, context):  # noqa: N802
        record = _record(request)
        loop = asyncio.get_running_loop()
        try:
            size = await loop.run_in_executor(self.executor, self.models.loader.predict_size,
                                              record)
        except (OSError, ValueError, StorageError) as exc:
            # The load reports it (this is only an estimate); a malformed path
            # (InvalidArgument) is answered as such.
            log.debug("predictModelSize %s: %s", record.model_id, exc)
            size = self.settings.default_model_size
        return rt.PredictModelSizeResponse(sizeInBytes=size)

    @grpc_errors("modelSize")
    async def modelSize(self, request, context):  # noqa: N802
        return rt.ModelSizeResponse(sizeInBytes=self.models.size(request.modelId))

    @grpc_errors("runtimeStatus")
    async def runtimeStatus(self, request, context):  # noqa: N802
        dropped = self.models.unload_all()
        if dropped:
            log.info("runtimeStatus: unloaded %d model(s) left from an earlier mesh", dropped)
        s = self.settings
        return rt.RuntimeStatusResponse(
            status=rt.RuntimeStatusResponse.READY,
            capacityInBytes=s.capacity,
            maxLoadingConcurrency=s.max_concurrent_loads,
            modelLoadingTimeoutMs=int(s.load_timeout * 1000),
            defaultModelSizeInBytes=s.default_model_size,
            runtimeVersion=f"modelmesh-runtime {__version__}",
            allowAnyMethod=True,
        )


class RuntimeInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """V2 inference on the models loaded here; other V2 methods answer UNIMPLEMENTED."""

    def __init__(self, models: LoadedModels, executor: ThreadPoolExecutor) -> None:
        self.models = models
        self.executor = executor
        # Inline for fast models, merged concurrent requests: as in the mesh's data plane.
        self.runner = PredictionRunner(executor)
        self.ready = False

    def _model_id(self, name: str, context: grpc.aio.ServicerContext) -> str:
        model_id = metadata_value(context, MODEL_ID) or name
        if not model_id:
            raise InvalidArgument("no model named: set model_name or the mm-model-id header")
        return model_id

    async def ServerLive(self, request, context):  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.ready)

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name="modelmesh-runtime", version=__version__,
                                         extensions=["mmesh-runtime"])

    @grpc_errors("ModelReady")
    async def ModelReady(self, request, context):  # noqa: N802
        model_id = self._model_id(request.name, context)
        return pb.ModelReadyResponse(
            ready=any(i == model_id for i, _ in self.models.loaded()))

    @grpc_errors("ModelMetadata")
    async def ModelMetadata(self, request, context):  # noqa: N802
        model_id = self._model_id(request.name, context)
        slot = self.models.acquire(model_id)
        try:
            assert slot.model is not None
            sig = slot.model.signature
        finally:
            self.models.release(slot)

        def tensors(specs):
            return [pb.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in specs]

        return pb.ModelMetadataResponse(name=request.name or model_id, versions=["1"],
                                        platform="modelmesh",
                                        inputs=tensors(sig.inputs), outputs=tensors(sig.outputs))

    @grpc_errors("ModelInfer")
    async def ModelInfer(self, request, context):  # noqa: N802
        model_id = self._model_id(request.model_name, context)
        inputs = codec.decode_inputs(request)
        params = codec.params_to_python(request.parameters)
        requested = [o.name for o in request.outputs]
        slot = self.models.acquire(model_id)
        try:
            response = pb.ModelInferResponse(model_name=request.model_name,
                                             model_version=request.model_version, id=request.id)
            if slot.model is None:
                raise Unavailable(f"model '{slot.model_id}' was unloaded")
            outputs, _ = await self.runner.predict(model_id, slot.model, inputs, params,
                                                   requested)
            codec.encode_outputs(outputs, requested, response)
        finally:
            self.models.release(slot)
        return response

    @grpc_errors("RepositoryIndex")
    async def RepositoryIndex(self, request, context):  # noqa: N802
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=i, version="1", state="READY")
            for i, _ in self.models.loaded()])


# --------------------------------------------------------------------------- the server


class RuntimeServer:
    """The gRPC server of ``modelmesh runtime``. ``await start()``, then ``await stop()``."""

    def __init__(self, settings: RuntimeServerSettings) -> None:
        self.settings = settings
        self.address = ""
        self._server: grpc.aio.Server | None = None
        self._socket: Path | None = None

    async def start(self) -> None:
        s = self.settings
        if s.torch_device:
            get_runtime("torchscript").device = s.torch_device  # type: ignore[attr-defined]
        threads = s.inference_threads or 2 * (os.cpu_count() or 1)
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rt-infer")
        self.models = LoadedModels(s, self.executor)
        self.inference = RuntimeInferenceServicer(self.models, self.executor)
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ])
        hot = HotMethodsOnly(server)  # registered with the core: ModelInfer and its stream
        rt_grpc.add_ModelRuntimeServicer_to_server(
            ModelRuntimeServicer(self.models, s, self.executor), hot)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.inference, hot)
        listen = s.listen
        if listen.startswith("unix:"):
            path = Path(listen.removeprefix("unix:").removeprefix("//"))
            if path.is_socket():
                path.unlink()  # left by a runtime that did not stop cleanly
            path.parent.mkdir(parents=True, exist_ok=True)
            self._socket = path
            if server.add_insecure_port(f"unix:{path}") == 0:
                raise OSError(f"cannot listen on unix:{path}")
            self.address = f"unix:{path}"
        else:
            host, sep, port = listen.rpartition(":")
            if not sep or not port.isdigit():
                raise ValueError(f"--listen {listen!r}: expected unix:PATH or HOST:PORT")
            if s.tls_cert:
                tls = TlsFiles(Path(s.tls_cert), Path(s.tls_key),
                               Path(s.tls_ca) if s.tls_ca else None)
                bound = server.add_secure_port(listen, tls.server_credentials())
            else:
                bound = server.add_insecure_port(listen)
            if bound == 0:
                raise OSError(f"cannot listen on {listen}")
            self.address = f"{host or '0.0.0.0'}:{bound}"
        await server.start()
        self._server = server
        self.inference.ready = True
        log.info("runtime listening on %s (capacity %d bytes, %d concurrent loads)",
                 self.address, s.capacity, s.max_concurrent_loads)

    async def stop(self, grace: float = 5.0) -> None:
        if self._server is not None:
            self.inference.ready = False
            await self._server.stop(grace)
            self._server = None
            await self.models.close()
            self.executor.shutdown(wait=True, cancel_futures=True)
        if self._socket is not None:
            self._socket.unlink(missing_ok=True)
            self._socket = None
        log.info("runtime stopped")


