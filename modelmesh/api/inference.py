"""KServe V2 gRPC (``inference.GRPCInferenceService``): a thin translation onto the data plane.

Uses the stubs that ship in ``tritonclient.grpc`` so a process can import both
this server and tritonclient (see ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelmesh import __version__
from modelmesh.api.errors import grpc_errors, metadata_values
from modelmesh.errors import InvalidArgument, MeshError, ModelNotFound

if TYPE_CHECKING:
    from modelmesh.instance import MeshInstance

_CONFIG_TYPES = {
    "BOOL": mc.TYPE_BOOL, "UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16,
    "UINT32": mc.TYPE_UINT32, "UINT64": mc.TYPE_UINT64, "INT8": mc.TYPE_INT8,
    "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32, "INT64": mc.TYPE_INT64,
    "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64,
    "BYTES": mc.TYPE_STRING, "BF16": mc.TYPE_BF16,
}


def _stat(d: object) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)  # type: ignore[attr-defined]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, instance: MeshInstance) -> None:
        self.instance = instance
        self.data = instance.dataplane
        self.metrics = instance.metrics

    def _model_id(self, name: str, context: grpc.aio.ServicerContext) -> str:
        model_id, vmodel_id = metadata_values(context, "mm-model-id", "mm-vmodel-id")
        return self.data.resolve(name, model_id, vmodel_id)

    # -- server -----------------------------------------------------------------

    async def ServerLive(self, request, context):  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.instance.ready)

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(
            name="modelmesh", version=__version__,
            extensions=["model_repository", "statistics", "mmesh"],
        )

    # -- models -------------------------------------------------------------------

    @grpc_errors("ModelReady")
    async def ModelReady(self, request, context):  # noqa: N802
        model_id = self._model_id(request.name, context)
        await self.instance.registry.require_model(model_id)
        return pb.ModelReadyResponse(ready=self.data.is_ready(model_id))

    @grpc_errors("ModelMetadata")
    async def ModelMetadata(self, request, context):  # noqa: N802
        model_id = self._model_id(request.name, context)
        record, sig = await self.data.signature(model_id)
        return pb.ModelMetadataResponse(
            name=request.name, versions=["1"], platform=record.model_type,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in sig.inputs],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in sig.outputs],
        )

    @grpc_errors("ModelConfig")
    async def ModelConfig(self, request, context):  # noqa: N802
        model_id = self._model_id(request.name, context)
        record, sig = await self.data.signature(model_id)

        def tensors(specs, cls):
            return [cls(name=t.name, data_type=_CONFIG_TYPES.get(t.datatype, mc.TYPE_INVALID),
                        dims=list(t.shape)) for t in specs]

        config = mc.ModelConfig(
            name=request.name, platform=record.model_type, backend="modelmesh",
            max_batch_size=0,
            input=tensors(sig.inputs, mc.ModelInput),
            output=tensors(sig.outputs, mc.ModelOutput),
        )
        return pb.ModelConfigResponse(config=config)

    @grpc_errors("ModelStatistics")
    async def ModelStatistics(self, request, context):  # noqa: N802
        if request.name:
            model_id = self._model_id(request.name, context)
            await self.instance.registry.require_model(model_id)
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

    # -- inference ----------------------------------------------------------------

    @grpc_errors("ModelInfer", histogram="api_request_ms")
    async def ModelInfer(self, request, context):  # noqa: N802
        return await self.data.infer(request, self._model_id(request.model_name, context))

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator, context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream are served in order; an error answers that request only."""
        async for request in request_iterator:
            try:
                model_id = self._model_id(request.model_name, context)
                response = await self.data.infer(request, model_id)
                yield pb.ModelStreamInferResponse(infer_response=response)
            except MeshError as exc:
                yield pb.ModelStreamInferResponse(
                    error_message=exc.message,
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name, id=request.id),
                )

    # -- repository -----------------------------------------------------------------

    @grpc_errors("RepositoryIndex")
    async def RepositoryIndex(self, request, context):  # noqa: N802
        registry = self.instance.registry
        models = []
        for model_id in registry.list_model_ids():
            entry = self.instance.cache.get(model_id)
            state = entry.state.value if entry is not None else "NOT_LOADED"
            ready = state == "LOADED"
            if request.ready and not ready:
                continue
            models.append(pb.RepositoryIndexResponse.ModelIndex(
                name=model_id, version="1", state="READY" if ready else state,
                reason=entry.error if entry is not None else "",
            ))
        return pb.RepositoryIndexResponse(models=models)

    @grpc_errors("RepositoryModelLoad")
    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        if not request.model_name:
            raise InvalidArgument("model_name is required")
        model_id = self._model_id(request.model_name, context)
        record = await self.instance.registry.require_model(model_id)
        entry = await self.data.acquire(record)
        self.instance.cache.release(entry)
        return pb.RepositoryModelLoadResponse()

    @grpc_errors("RepositoryModelUnload")
    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        model_id = self._model_id(request.model_name, context)
        if await self.instance.registry.get_model(model_id) is None:
            raise ModelNotFound(model_id)
        self.instance.cache.unload(model_id, reason="repository unload")
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
