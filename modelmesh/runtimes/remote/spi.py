"""The ``mmesh.ModelRuntime`` SPI client: the loader for a ModelMesh runtime server.

The runtime loads, measures and unloads models on the mesh's calls
(``loadModel``, ``modelSize``, ``predictModelSize``, ``unloadModel``) and
reports its limits in ``runtimeStatus``; inference goes over V2, as for every
remote loader (``modelmesh.runtimes.remote.model``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc

from modelmesh._proto.mmesh import model_runtime_pb2 as rt
from modelmesh._proto.mmesh import model_runtime_pb2_grpc as rt_grpc
from modelmesh.errors import ModelLoadFailed, Unavailable
from modelmesh.registry.records import ModelRecord
from modelmesh.runtimes.remote.model import (
    CALL_TIMEOUT_S,
    MODEL_INFER_KEY,
    RemoteLoader,
    RemoteModel,
)
from modelmesh.settings import RuntimeAddress

log = logging.getLogger(__name__)


class ModelRuntimeLoader(RemoteLoader):
    """The cache's ``ModelLoader`` for an ``mmesh.ModelRuntime`` server."""

    def __init__(self, address: RuntimeAddress, *, load_timeout_s: float = 120.0,
                 max_message_bytes: int = 16 << 20, default_model_size: int = 1 << 20,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        super().__init__(address, load_timeout_s=load_timeout_s,
                         max_message_bytes=max_message_bytes, credentials=credentials)
        self.spi = rt_grpc.ModelRuntimeStub(self.channel)
        self.default_model_size = default_model_size

    def wait_ready(self, timeout: float) -> Any:
        """Poll ``runtimeStatus`` until READY and adopt what it says; returns the status.

        ``RuntimeError`` when the runtime is not READY within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                status = self.spi.runtimeStatus(rt.RuntimeStatusRequest(), timeout=5)
                if status.status == rt.RuntimeStatusResponse.READY:
                    self._adopt(status)
                    return status
                last = f"status {rt.RuntimeStatusResponse.Status.Name(status.status)}"
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE,  # type: ignore[attr-defined]
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise RuntimeError(f"{self.describe()}: runtimeStatus failed: {last}") from None
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{self.describe()} not ready within {timeout:.0f}s ({last})")
            time.sleep(0.2)

    def _adopt(self, status: Any) -> None:
        if status.modelLoadingTimeoutMs:
            self.load_timeout_s = status.modelLoadingTimeoutMs / 1000
        if status.defaultModelSizeInBytes:
            self.default_model_size = status.defaultModelSizeInBytes
        info = status.methodInfos.get(MODEL_INFER_KEY)
        path = list(info.idInjectionPath) if info is not None else []
        if len(path) == 1:
            self.inject_field = path[0]
        elif path:
            log.warning("%s asks for the model id at %s in ModelInfer requests; only top-level "
                        "fields can be set without parsing: sending it in mm-model-id only",
                        self.describe(), path)

    def _request(self, cls: Any, record: ModelRecord) -> Any:
        return cls(modelId=record.model_id, modelType=record.model_type,
                   modelPath=record.path, modelKey=record.storage_key)

    def predict_size(self, record: ModelRecord) -> int:
        try:
            resp = self.spi.predictModelSize(
                self._request(rt.PredictModelSizeRequest, record), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                return self.default_model_size
            raise self._load_failed(record.model_id, exc, "predictModelSize") from None
        return int(resp.sizeInBytes) or self.default_model_size

    def load(self, record: ModelRecord) -> RemoteModel:
        size = self._load(record)
        if not size:
            size = self._measure(record.model_id)
        return RemoteModel(self, record, size, self.signature(record.model_id))

    def _load(self, record: ModelRecord) -> int:
        try:
            resp = self.spi.loadModel(self._request(rt.LoadModelRequest, record),
                                      timeout=self.load_timeout_s)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,  # type: ignore[attr-defined]
                              grpc.StatusCode.CANCELLED):
                # The SPI's rule: a load given up on is followed by unloadModel at once,
                # so the runtime does not keep a model the mesh does not count.
                self.unload_model(record.model_id)
            raise self._load_failed(record.model_id, exc, "loadModel") from None
        return int(resp.sizeInBytes)

    def _measure(self, model_id: str) -> int:
        try:
            size = self.spi.modelSize(rt.ModelSizeRequest(modelId=model_id),
                                      timeout=CALL_TIMEOUT_S).sizeInBytes
        except grpc.RpcError as exc:
            log.info("%s: modelSize for %s failed (%s); counting the default size",
                     self.describe(), model_id, exc.code())  # type: ignore[attr-defined]
            size = 0
        return int(size) or self.default_model_size

    def reload(self, record: ModelRecord) -> None:
        try:
            self._load(record)
        except ModelLoadFailed as exc:
            raise Unavailable(exc.reason) from None

    def unload_model(self, model_id: str) -> None:
        try:
            self.spi.unloadModel(rt.UnloadModelRequest(modelId=model_id), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            log.warning("%s: unloadModel %s failed: %s: %s", self.describe(), model_id,
                        exc.code().name, exc.details())  # type: ignore[attr-defined]

    def _load_failed(self, model_id: str, exc: grpc.RpcError, call: str) -> ModelLoadFailed:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        details = exc.details() or code.name  # type: ignore[attr-defined]
        if code is grpc.StatusCode.UNAVAILABLE:
            return ModelLoadFailed(model_id, f"{self.describe()} is unavailable ({details})")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return ModelLoadFailed(
                model_id, f"{self.describe()}: {call} took longer than {self.load_timeout_s:g}s")
        return ModelLoadFailed(model_id, details)
