"""``mmesh.ModelMesh`` and ``mmesh.ModelMeshExtensions``: translation onto ModelLifecycle."""

from __future__ import annotations

import bisect

from modelmesh._proto.mmesh import mesh_extensions_pb2 as ext
from modelmesh._proto.mmesh import mesh_extensions_pb2_grpc as ext_grpc
from modelmesh._proto.mmesh import model_mesh_pb2 as mm
from modelmesh._proto.mmesh import model_mesh_pb2_grpc as mm_grpc
from modelmesh.api.status import code_of, grpc_errors
from modelmesh.errors import InvalidArgument, MeshError
from modelmesh.headers import (
    INTERNAL_HEADERS_TRUSTED,
    LOAD_HERE,
    MAX_COPIES,
    MIN_COPIES,
    REPLACE,
    metadata_value,
    metadata_values,
)
from modelmesh.lifecycle import ModelLifecycle, VModelStatus
from modelmesh.metrics import Metrics
from modelmesh.node import Node
from modelmesh.registry.store import Registry
from modelmesh.view import ModelStatus

_MS = mm.ModelStatusInfo
_VS = mm.VModelStatusInfo


def status_proto(s: ModelStatus) -> mm.ModelStatusInfo:
    return _MS(
        status=_MS.ModelStatus.Value(s.status.value),
        errors=list(s.errors),
        modelCopyInfos=[
            _MS.ModelCopyInfo(location=c.instance_id,
                              copyStatus=_MS.ModelStatus.Value(c.state.value), time=c.time_ms)
            for c in s.copies
        ],
    )


def vstatus_proto(v: VModelStatus) -> mm.VModelStatusInfo:
    out = _VS(
        status=_VS.VModelStatus.Value(v.state.value if v.state is not None else "NOT_FOUND"),
        activeModelId=v.active_model,
        targetModelId=v.target_model, owner=v.owner,
        activeModelStatus=status_proto(v.active_status),
    )
    if v.target_model != v.active_model:  # as model-mesh.proto says: only while they differ
        out.targetModelStatus.CopyFrom(status_proto(v.target_status))
    return out


def _count(name: str, text: str) -> int:
    """A copy-count metadata value ("" = 0)."""
    if not text.strip():
        return 0
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(f"metadata {name} must be a whole number, not {text!r}") from None


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes")


class ModelMeshServicer(mm_grpc.ModelMeshServicer):
    def __init__(self, node: Node, lifecycle: ModelLifecycle, metrics: Metrics) -> None:
        self.node = node
        self.models = lifecycle
        self.metrics = metrics

    @grpc_errors("registerModel")
    async def registerModel(self, request, context):  # noqa: N802
        info = request.modelInfo
        replace, lo, hi = metadata_values(context, REPLACE, MIN_COPIES, MAX_COPIES)
        record = self.models.new_record(request.modelId, info.type, info.path, info.key,
                                        min_copies=_count(MIN_COPIES, lo),
                                        max_copies=_count(MAX_COPIES, hi))
        status = await self.models.register(
            record, replace=_truthy(replace),
            load_now=request.loadNow, sync=request.sync,
        )
        return status_proto(status)

    @grpc_errors("unregisterModel")
    async def unregisterModel(self, request, context):  # noqa: N802
        await self.models.unregister(request.modelId)
        return mm.UnregisterModelResponse()

    @grpc_errors("getModelStatus")
    async def getModelStatus(self, request, context):  # noqa: N802
        if not request.modelId:
            raise InvalidArgument("modelId is required")
        return status_proto(self.models.status(request.modelId))

    @grpc_errors("ensureLoaded")
    async def ensureLoaded(self, request, context):  # noqa: N802
        # mm-load-here is an instance's request to another; from a client (with TLS, anyone
        # whose certificate is not the mesh's own) it is ignored.
        here = bool(metadata_value(context, LOAD_HERE)) and INTERNAL_HEADERS_TRUSTED.get()
        return status_proto(await self.models.ensure_loaded(request.modelId, sync=request.sync,
                                                            here=here))

    @grpc_errors("setVModel")
    async def setVModel(self, request, context):  # noqa: N802
        record = None
        if request.HasField("modelInfo") and request.modelInfo.type:
            info = request.modelInfo
            record = self.models.new_record(request.targetModelId, info.type, info.path, info.key,
                                            auto_delete=request.autoDeleteTargetModel)
        status = await self.models.set_vmodel(
            request.vModelId, request.targetModelId, record=record,
            update_only=request.updateOnly, expected_target=request.expectedTargetModelId,
            force=request.force, load_now=request.loadNow, sync=request.sync,
            owner=request.owner,
        )
        return vstatus_proto(status)

    @grpc_errors("getVModelStatus")
    async def getVModelStatus(self, request, context):  # noqa: N802
        return vstatus_proto(self.models.vmodel_status(request.vModelId, owner=request.owner))

    @grpc_errors("deleteVModel")
    async def deleteVModel(self, request, context):  # noqa: N802
        await self.models.delete_vmodel(request.vModelId, owner=request.owner)
        return mm.DeleteVModelResponse()


class ExtensionsServicer(ext_grpc.ModelMeshExtensionsServicer):
    MAX_PAGE = 10_000

    def __init__(self, node: Node, registry: Registry, lifecycle: ModelLifecycle,
                 metrics: Metrics) -> None:
        self.node = node
        self.registry = registry
        self.models = lifecycle
        self.metrics = metrics

    @grpc_errors("listModels")
    async def listModels(self, request, context):  # noqa: N802
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        size = min(request.page_size or 1000, self.MAX_PAGE)
        registry = self.registry
        ids = registry.list_model_ids(request.prefix)
        start = 0
        if request.page_token:
            start = bisect.bisect_right(ids, request.page_token)
        page = ids[start:start + size]
        out = []
        for model_id in page:
            rec = registry.models.get(model_id)
            if rec is None:
                continue
            item = ext.ListedModel(
                modelId=model_id,
                modelInfo=mm.ModelInfo(type=rec.model_type, path=rec.path, key=rec.storage_key),
                autoDelete=rec.auto_delete,
            )
            if request.include_status:
                item.status.CopyFrom(status_proto(self.models.status(model_id)))
            out.append(item)
        more = start + size < len(ids)
        return ext.ListModelsResponse(
            models=out, next_page_token=page[-1] if more and page else "", total=len(ids)
        )

    @grpc_errors("registerModels")
    async def registerModels(self, request, context):  # noqa: N802
        records = []
        results: list[ext.RegisterResult | None] = []
        for req in request.requests:
            try:
                info = req.modelInfo
                records.append(self.models.new_record(req.modelId, info.type, info.path, info.key))
                results.append(None)
            except MeshError as exc:
                results.append(ext.RegisterResult(modelId=req.modelId, code=code_of(exc),
                                                  message=exc.message))
        outcomes = iter(await self.registry.register_models(records, request.replace))
        final = []
        for req, res in zip(request.requests, results, strict=True):
            if res is None:
                err = next(outcomes)
                res = ext.RegisterResult(modelId=req.modelId) if err is None else \
                    ext.RegisterResult(modelId=req.modelId, code=code_of(err),
                                       message=err.message)
                if err is None and req.loadNow:
                    await self.models.ensure_loaded(req.modelId, sync=req.sync)
            final.append(res)
        return ext.RegisterModelsResponse(results=final)

    @grpc_errors("clusterStatus")
    async def clusterStatus(self, request, context):  # noqa: N802
        registry = self.registry
        instances = [
            ext.InstanceInfo(
                instanceId=r.instance_id, endpoint=r.endpoint, capacityBytes=r.capacity_bytes,
                usedBytes=r.used_bytes, modelCount=r.model_count, lruTimeMs=r.lru_time_ms,
                shuttingDown=r.shutting_down, version=r.version, labels=r.labels,
                loadingCount=r.loading_count, requestsPerMinute=r.requests_per_minute,
                inFlight=r.in_flight,
            )
            for r in sorted(registry.instances.values(), key=lambda r: r.instance_id)
        ]
        return ext.ClusterStatusResponse(
            instances=instances, models=len(registry.models), vmodels=len(registry.vmodels)
        )
