"""KServe V2 gRPC (``inference.GRPCInferenceService``): a thin translation onto the router.

Uses the messages that ship in ``tritonclient.grpc`` so a process can import both
this server and tritonclient (see ARCHITECTURE.md). ``ModelInfer`` is registered
with no deserializer: the handler gets the request's bytes, reads only the model
name from them, and either serves the request here or forwards the same bytes to
the instance that should serve it (``modelmesh.routing``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelmesh import __version__, codec, wire
from modelmesh.api.status import drop_frames, grpc_errors, log_unexpected, status_of
from modelmesh.cache.local import ModelCache, UnloadReason
from modelmesh.dataplane import MODEL_VERSION, DataPlane, Duration
from modelmesh.errors import InvalidArgument, MeshError, ModelNotFound
from modelmesh.headers import (
    INFER,
    METADATA,
    MODEL_ID,
    VMODEL_ID,
    CallInfo,
    metadata_values,
)
from modelmesh.lifecycle import ModelLifecycle
from modelmesh.metrics import Metrics
from modelmesh.node import Node
from modelmesh.registry.records import CopyState, ModelRecord
from modelmesh.registry.store import Registry
from modelmesh.routing.router import Router
from modelmesh.runtimes.formats import known_format
from modelmesh.view import MeshView, Status

_CONFIG_TYPES = {
    "BOOL": mc.TYPE_BOOL, "UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16,
    "UINT32": mc.TYPE_UINT32, "UINT64": mc.TYPE_UINT64, "INT8": mc.TYPE_INT8,
    "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32, "INT64": mc.TYPE_INT64,
    "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64,
    "BYTES": mc.TYPE_STRING, "BF16": mc.TYPE_BF16,
}


#: What ServerMetadata lists; the REST transport adds ``binary_tensor_data``.
EXTENSIONS = ("model_repository", "statistics", "mmesh")


def _stat(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _stream_error(raw: bytes, exc: Exception) -> pb.ModelStreamInferResponse:
    """The answer of one failed stream request: its error, its model name and id."""
    if not isinstance(exc, MeshError):
        log_unexpected("ModelStreamInfer", exc)
    _, message = status_of(exc)
    drop_frames(exc)
    try:  # echoed so the client can match the answer; both are only read, never parsed
        name, request_id = wire.string_field(raw, 1), wire.string_field(raw, 3)
    except InvalidArgument:
        name = request_id = ""
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(model_name=name, id=request_id),
    )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, node: Node, registry: Registry, cache: ModelCache, dataplane: DataPlane,
                 router: Router, lifecycle: ModelLifecycle, view: MeshView,
                 metrics: Metrics) -> None:
        self.node = node
        self.registry = registry
        self.cache = cache
        self.data = dataplane
        self.router = router
        self.lifecycle = lifecycle
        self.view = view
        self.metrics = metrics

    def generic_handler(self) -> tuple[str, dict[str, grpc.RpcMethodHandler]]:
        """(service name, method handlers): the generated ones, but ModelInfer takes bytes."""
        service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method in service.methods:
            if method.name == "ModelInfer":
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(self.ModelInferRaw)
                continue
            if method.name == "ModelStreamInfer":  # requests as bytes too, checked per request
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    self.ModelStreamInfer,
                    response_serializer=pb.ModelStreamInferResponse.SerializeToString)
                continue
            impl = getattr(self, method.name)
            request = getattr(pb, method.input_type.name)
            response = getattr(pb, method.output_type.name)
            make = (grpc.stream_stream_rpc_method_handler if method.client_streaming
                    else grpc.unary_unary_rpc_method_handler)
            handlers[method.name] = make(impl, request_deserializer=request.FromString,
                                         response_serializer=response.SerializeToString)
        return service.full_name, handlers

    def _model_id(self, name: str, context: grpc.aio.ServicerContext) -> str:
        model_id, vmodel_id = metadata_values(context, MODEL_ID, VMODEL_ID)
        return self.data.resolve(name, model_id, vmodel_id)

    async def _metadata(self, request: pb.ModelMetadataRequest, context) -> tuple[
            str, pb.ModelMetadataResponse]:
        return await self.metadata(request, CallInfo.from_context(context))

    # -- the V2 operations, without gRPC: the REST transport calls these too -------

    async def metadata(self, request: pb.ModelMetadataRequest, info: CallInfo) -> tuple[
            str, pb.ModelMetadataResponse]:
        """(model id, the model's metadata) from wherever it is (or gets) loaded."""
        model_id = self.data.resolve(request.name, info.model_id, info.vmodel_id)

        async def local(record: ModelRecord) -> bytes:
            return (await self._local_metadata(request, record)).SerializeToString()

        raw = await self.router.invoke(METADATA, request.SerializeToString(), model_id, info,
                                       local)
        return model_id, pb.ModelMetadataResponse.FromString(raw)

    async def _local_metadata(self, request: pb.ModelMetadataRequest,
                              record: ModelRecord) -> pb.ModelMetadataResponse:
        _, sig = await self.data.signature(record.model_id, request.version)
        return pb.ModelMetadataResponse(
            name=request.name, versions=[MODEL_VERSION],
            platform=known_format(record.model_type, record.storage_key) or record.model_type,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in sig.inputs],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in sig.outputs],
        )

    # -- server -----------------------------------------------------------------

    async def ServerLive(self, request, context):  # noqa: N802
        return pb.ServerLiveResponse(live=True)  # it answers, so it is serving

    async def ServerReady(self, request, context):  # noqa: N802
        # As gRPC health and /ready: false while starting, draining or stopping.
        return pb.ServerReadyResponse(ready=self.node.readiness()[0])

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(
            name="modelmesh", version=__version__,
            extensions=list(EXTENSIONS),
        )

    async def model_ready(self, name: str, version: str, info: CallInfo) -> bool:
        """Whether the model is loaded somewhere in the mesh (``ModelNotFound`` if unknown)."""
        model_id = self.data.resolve(name, info.model_id, info.vmodel_id)
        await self.registry.require_model(model_id)
        if version and version != MODEL_VERSION and not self.data.passes_bytes(model_id):
            return False  # no such version (as Triton answers)
        if self.data.is_ready(model_id):
            return True
        # The local cache, checked above, is the truth here.
        return bool(self.view.live_copies(model_id, (CopyState.LOADED,), include_self=False))

    async def infer(self, raw: bytes, info: CallInfo,
                    metadata: tuple[tuple[str, str | bytes], ...] | None = None) -> bytes:
        """Serve a serialized ModelInferRequest here or where it should be served.

        One scan of the bytes refuses a request too costly to parse and reads its
        model name (``wire.check_request``), before it is routed or forwarded.
        """
        name = wire.check_request(raw)
        model_id = self.data.resolve(name if not info.model_id else "",
                                     info.model_id, info.vmodel_id)

        def local(record: ModelRecord):  # the metadata goes only to a runtime taking bytes
            return self.data.infer_bytes(raw, record, info.metadata if metadata is None
                                         else metadata)

        return await self.router.invoke(INFER, raw, model_id, info, local)

    def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        """The registered models and their state on this instance."""
        models = []
        for model_id in self.registry.list_model_ids():
            entry = self.cache.get(model_id)
            state = entry.state.value if entry is not None else Status.NOT_LOADED.value
            ready = entry is not None and entry.state is CopyState.LOADED
            if ready_only and not ready:
                continue
            models.append(pb.RepositoryIndexResponse.ModelIndex(
                name=model_id, version="1", state="READY" if ready else state,
                reason=entry.error if entry is not None else "",
            ))
        return pb.RepositoryIndexResponse(models=models)

    async def repository_load(self, name: str, info: CallInfo) -> None:
        """Load the model (in the mesh, where placement says) and wait for it."""
        if not name:
            raise InvalidArgument("model_name is required")
        model_id = self.data.resolve(name, info.model_id, info.vmodel_id)
        await self.lifecycle.ensure_loaded(model_id, sync=True)
        status = self.lifecycle.status(model_id)
        if status.status is Status.LOADING_FAILED:
            raise InvalidArgument(f"model '{codec.clip(model_id)}' failed to load: "
                                  f"{'; '.join(status.errors)}")

    async def repository_unload(self, name: str, info: CallInfo) -> None:
        """Unload the model's copy on this instance (it stays registered)."""
        model_id = self.data.resolve(name, info.model_id, info.vmodel_id)
        if await self.registry.get_model(model_id) is None:
            raise ModelNotFound(model_id,
                                message=f"model '{codec.clip(model_id)}' is not registered")
        self.cache.unload(model_id, reason=UnloadReason.REPOSITORY_UNLOAD)

    async def model_config(self, name: str, version: str, info: CallInfo) -> mc.ModelConfig:
        """Triton's model configuration, from the model's metadata (no batching declared)."""
        _, meta = await self.metadata(pb.ModelMetadataRequest(name=name, version=version), info)

        def tensors(specs, cls):
            return [cls(name=t.name, data_type=_CONFIG_TYPES.get(t.datatype, mc.TYPE_INVALID),
                        dims=list(t.shape)) for t in specs]

        return mc.ModelConfig(
            name=name, platform=meta.platform, backend="modelmesh", max_batch_size=0,
            version_policy=mc.ModelVersionPolicy(
                latest=mc.ModelVersionPolicy.Latest(num_versions=1)),  # one version
            input=tensors(meta.inputs, mc.ModelInput),
            output=tensors(meta.outputs, mc.ModelOutput),
        )

    async def model_statistics(self, name: str, info: CallInfo) -> pb.ModelStatisticsResponse:
        """This instance's inference statistics for one model (``name``), or for every model
        it has served (``name`` empty)."""
        if name:
            model_id = self.data.resolve(name, info.model_id, info.vmodel_id)
            await self.registry.require_model(model_id)
            items = [(model_id, self.data.stats.get(model_id))]
        else:
            items = list(self.data.stats.items())
        out = []
        for model_id, s in items:
            st = pb.ModelStatistics(name=model_id, version="1")
            if s is not None:
                st.last_inference = s.last_inference_ms
                st.inference_count = s.inference_count
                st.execution_count = s.execution_count
                st.inference_stats.CopyFrom(pb.InferStatistics(
                    success=_stat(s.success), fail=_stat(s.fail), queue=_stat(s.queue),
                    compute_infer=_stat(s.compute_infer), cache_hit=_stat(s.cache_hit),
                    cache_miss=_stat(s.cache_miss),
                ))
            out.append(st)
        return pb.ModelStatisticsResponse(model_stats=out)

    # -- models (gRPC) ----------------------------------------------------------------

    @grpc_errors("ModelReady")
    async def ModelReady(self, request, context):  # noqa: N802
        ready = await self.model_ready(request.name, request.version,
                                       CallInfo.from_context(context))
        return pb.ModelReadyResponse(ready=ready)

    @grpc_errors("ModelMetadata")
    async def ModelMetadata(self, request, context):  # noqa: N802
        _, response = await self._metadata(request, context)
        response.name = request.name
        return response

    @grpc_errors("ModelConfig")
    async def ModelConfig(self, request, context):  # noqa: N802
        config = await self.model_config(request.name, request.version,
                                         CallInfo.from_context(context))
        return pb.ModelConfigResponse(config=config)

    @grpc_errors("ModelStatistics")
    async def ModelStatistics(self, request, context):  # noqa: N802
        return await self.model_statistics(request.name, CallInfo.from_context(context))

    # -- inference ----------------------------------------------------------------

    @grpc_errors("ModelInfer", histogram="api_request_ms")
    async def ModelInferRaw(self, raw: bytes, context) -> bytes:  # noqa: N802
        """ModelInfer on the request's bytes: routed, and forwarded without re-encoding."""
        self.metrics.labelled("request_bytes", "grpc").observe(len(raw))
        return await self.infer(raw, CallInfo.from_context(context))

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterator[bytes], context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream are served in order; an error answers that request only.

        Each request (its bytes: registered with no deserializer) is routed like a
        ModelInfer call (forwarded as a unary call where another instance serves
        the model). Any error, a bug of ours included, becomes that request's
        ``error_message`` (as Triton answers) and the stream goes on.
        """
        info = CallInfo.from_context(context)
        metadata = tuple(info.metadata)
        async for raw in request_iterator:
            try:
                response = await self._stream_one(raw, info, metadata)
            except Exception as exc:
                response = _stream_error(raw, exc)
            yield response

    async def _stream_one(self, raw: bytes, info: CallInfo,
                          metadata: tuple[tuple[str, str | bytes], ...]
                          ) -> pb.ModelStreamInferResponse:
        out = await self.infer(raw, info, metadata)
        return pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse.FromString(out))

    # -- repository -----------------------------------------------------------------

    @grpc_errors("RepositoryIndex")
    async def RepositoryIndex(self, request, context):  # noqa: N802
        return self.repository_index(request.ready)

    @grpc_errors("RepositoryModelLoad")
    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        await self.repository_load(request.model_name, CallInfo.from_context(context))
        return pb.RepositoryModelLoadResponse()

    @grpc_errors("RepositoryModelUnload")
    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        await self.repository_unload(request.model_name, CallInfo.from_context(context))
        return pb.RepositoryModelUnloadResponse()

    # -- not offered ------------------------------------------------------------------

    async def _unimplemented(self, what: str, context: grpc.aio.ServicerContext):
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{what} is not supported by the model mesh (no shared-memory or trace control)",
        )

    async def SystemSharedMemoryStatus(self, request, context):  # noqa: N802
        await self._unimplemented("SystemSharedMemoryStatus", context)

    async def SystemSharedMemoryRegister(self, request, context):  # noqa: N802
        await self._unimplemented("SystemSharedMemoryRegister", context)

    async def SystemSharedMemoryUnregister(self, request, context):  # noqa: N802
        await self._unimplemented("SystemSharedMemoryUnregister", context)

    async def CudaSharedMemoryStatus(self, request, context):  # noqa: N802
        await self._unimplemented("CudaSharedMemoryStatus", context)

    async def CudaSharedMemoryRegister(self, request, context):  # noqa: N802
        await self._unimplemented("CudaSharedMemoryRegister", context)

    async def CudaSharedMemoryUnregister(self, request, context):  # noqa: N802
        await self._unimplemented("CudaSharedMemoryUnregister", context)

    async def TraceSetting(self, request, context):  # noqa: N802
        await self._unimplemented("TraceSetting", context)

    async def LogSettings(self, request, context):  # noqa: N802
        await self._unimplemented("LogSettings", context)
