"""Models that run in another process: a runtime server the mesh drives over gRPC.

``--runtime`` (``MM_RUNTIME``) says where models run (``RuntimeAddress``):

| value                | the server                                  | loader                      |
|----------------------|---------------------------------------------|-----------------------------|
| `embedded`           | none: models run in the mesh (default)      | ``LocalModelLoader``        |
| `mmesh:HOST:PORT`,   | an ``mmesh.ModelRuntime`` + V2 server:      | ``ModelRuntimeLoader``      |
| `mmesh:unix:PATH`    | `modelmesh runtime`, any ModelMesh runtime  |                             |
| `mlserver:HOST:PORT` | MLServer, via the V2 model-repository API   | ``RepositoryRuntimeLoader`` |
| `triton:HOST:PORT`   | Triton (explicit model control), likewise   | ``RepositoryRuntimeLoader`` |

Both loaders are the cache's ``ModelLoader`` (synchronous, called in the
cache's threads) and return ``RemoteModel``s. A ``RemoteModel`` serves in two
ways: ``predict`` (tensors in, tensors out: encode, a V2 ``ModelInfer`` call,
decode), so anything that serves an embedded model serves it too, and
``infer_raw`` (serialized ``ModelInferRequest`` in, serialized response out),
which the data plane prefers: the request bytes go to the runtime untouched
but for the model name (``with_string_field``), with the concrete model id in
the ``mm-model-id`` header, as ModelMesh sends them.

``connect_runtime(settings)`` opens the connection at start-up, waits (at most
``--load-timeout``) for the runtime to be ready and returns a ``RuntimeBinding``:
the loader plus the limits the runtime reports (``runtimeStatus``: capacity,
loading concurrency, load timeout), which replace the mesh's own settings.

Sizes: an ``mmesh`` runtime measures each model (``loadModel``'s
``sizeInBytes``, else ``modelSize``) and predicts sizes (``predictModelSize``,
else its ``defaultModelSizeInBytes``). V2 servers report no sizes, so the
repository adapter uses the mesh's own prediction for the format (file size x
the format's factor, see each runtime's module; x ``UNKNOWN_FORMAT_FACTOR``
for formats the mesh does not know) both before and after the load.

A runtime that restarts forgets its models while the mesh still counts them
as loaded: a request that gets ``NOT_FOUND`` for a model the mesh loaded there
loads it again once and retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from modelmesh import codec
from modelmesh.errors import (
    CapacityExceeded,
    InvalidArgument,
    MeshError,
    ModelLoadFailed,
    Unavailable,
)
from modelmesh.registry.records import ModelRecord
from modelmesh.runtimes.base import LoadedModel
from modelmesh.tensor import ModelSignature, Parameters, Tensor, TensorSpec

if TYPE_CHECKING:
    from modelmesh.settings import Settings
    from modelmesh.storage import LocalModelLoader

log = logging.getLogger(__name__)

__all__ = [
    "ModelRuntimeLoader",
    "RemoteModel",
    "RepositoryRuntimeLoader",
    "RuntimeAddress",
    "RuntimeBinding",
    "connect_runtime",
    "with_string_field",
]

#: The V2 inference method the raw passthrough calls.
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
#: ``methodInfos`` key of that method in ``runtimeStatus``.
MODEL_INFER_KEY = "inference.GRPCInferenceService/ModelInfer"
#: Deadline of the quick SPI calls (sizes, status, unload), seconds.
CALL_TIMEOUT_S = 30.0
#: Size factor over the file size for formats the mesh has no runtime for.
UNKNOWN_FORMAT_FACTOR = 2.0
#: File in each directory the repository adapter writes, naming the model id.
MARKER = ".modelmesh-model"

_KINDS = ("mmesh", "mlserver", "triton")
# Metadata the mesh must not pass on: transport headers and the mesh's own.
_DROP_PREFIXES = (":", "grpc-", "mm-")
_DROP_KEYS = frozenset({"content-type", "user-agent", "te", "host"})


# --------------------------------------------------------------------------- addresses


@dataclass(frozen=True, slots=True)
class RuntimeAddress:
    """A parsed ``--runtime`` value: what kind of server, at which gRPC target."""

    kind: str  # "embedded" | "mmesh" | "mlserver" | "triton"
    target: str = ""  # gRPC target: "HOST:PORT" or "unix:PATH" ("" when embedded)

    @classmethod
    def parse(cls, text: str) -> RuntimeAddress:
        """``embedded``, ``mmesh:HOST:PORT``, ``mmesh:unix:PATH``, ``mlserver:HOST:PORT``
        or ``triton:HOST:PORT``; ``ValueError`` saying what is wrong otherwise."""
        text = text.strip()
        if text in ("", "embedded"):
            return cls("embedded")
        kind, sep, rest = text.partition(":")
        if not sep or kind not in _KINDS:
            raise ValueError(
                f"runtime {text!r}: expected embedded, mmesh:HOST:PORT, mmesh:unix:PATH, "
                "mlserver:HOST:PORT or triton:HOST:PORT"
            )
        if rest.startswith("unix:"):
            if kind != "mmesh":
                raise ValueError(f"runtime {text!r}: {kind} listens on TCP only; use HOST:PORT")
            if not rest[len("unix:"):]:
                raise ValueError(f"runtime {text!r}: unix: needs a socket path")
            return cls(kind, rest)
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"runtime {text!r}: expected {kind}:HOST:PORT with a port 1-65535")
        return cls(kind, rest)

    def __str__(self) -> str:
        return "embedded" if self.kind == "embedded" else f"{self.kind}:{self.target}"


# --------------------------------------------------------------------------- raw bytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def with_string_field(message: bytes, field_number: int, value: str) -> bytes:
    """``message`` (serialized protobuf) with string field ``field_number`` set to ``value``.

    The message is not parsed: one more occurrence of the field is appended, and
    protobuf parsers keep the last occurrence of a singular field. This is how
    the model id reaches a runtime that reads it from ``model_name`` (field 1
    of ``ModelInferRequest``) without re-serializing the request.
    """
    data = value.encode("utf-8")
    return message + _varint(field_number << 3 | 2) + _varint(len(data)) + data


def _forward_metadata(
    metadata: Sequence[tuple[str, str | bytes]], model_id: str
) -> tuple[tuple[str, str | bytes], ...]:
    kept = tuple(
        (k, v) for k, v in metadata
        if k not in _DROP_KEYS and not k.startswith(_DROP_PREFIXES)
    )
    return (*kept, ("mm-model-id", model_id))


def _mesh_error(exc: grpc.RpcError, where: str) -> MeshError:
    """A runtime's gRPC error as the mesh error a client should see."""
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    details: str = exc.details() or code.name  # type: ignore[attr-defined]
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(details)
    if code is grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"{where} is unavailable: {details}")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return CapacityExceeded(details)
    err = MeshError(f"{where}: {details}")
    err.code = code
    return err


# --------------------------------------------------------------------------- models


class RemoteModel(LoadedModel):
    """A model loaded in a runtime server; ``predict`` and ``infer_raw`` call it there."""

    def __init__(
        self, loader: RemoteLoader, record: ModelRecord, size_bytes: int,
        signature: ModelSignature,
    ) -> None:
        self.loader = loader
        self.record = record
        self.model_id = record.model_id
        #: The name the runtime knows the model by (the model id, or a safe form of it).
        self.runtime_name = loader.runtime_name(record.model_id)
        self.size_bytes = size_bytes
        self.signature = signature
        self._reload_lock = threading.Lock()
        self._generation = 0

    def predict(self, inputs: list[Tensor], parameters: Parameters) -> list[Tensor]:
        """Run the model in the runtime (encode, V2 ModelInfer, decode); blocking."""
        from tritonclient.grpc import service_pb2 as pb

        request = pb.ModelInferRequest(model_name=self.runtime_name)
        codec.encode_inputs(inputs, request)
        if parameters:
            codec.python_to_params(parameters, request.parameters)
        metadata = (("mm-model-id", self.model_id),)
        for attempt in (0, 1):
            generation = self._generation
            try:
                response = self.loader.v2.ModelInfer(request, metadata=metadata)
                return codec.decode_outputs(response)
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.NOT_FOUND and attempt == 0:  # type: ignore[attr-defined]
                    self._recover(generation, exc)
                    continue
                raise _mesh_error(exc, self.loader.describe()) from None
        raise AssertionError("unreachable")

    async def infer_raw(
        self, request: bytes, metadata: Sequence[tuple[str, str | bytes]] = ()
    ) -> bytes:
        """Pass a serialized ``ModelInferRequest`` to the runtime; return its serialized reply.

        The runtime gets the model id in ``mm-model-id`` and, where it reads the
        model from ``model_name``, in that field too (rewritten without parsing).
        """
        if self.loader.inject_field is not None:
            request = with_string_field(request, self.loader.inject_field, self.runtime_name)
        call = self.loader.raw_infer()
        forwarded = _forward_metadata(metadata, self.model_id)
        for attempt in (0, 1):
            generation = self._generation
            try:
                reply: bytes = await call(request, metadata=forwarded)
                return reply
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.NOT_FOUND and attempt == 0:
                    await asyncio.to_thread(self._recover, generation, exc)
                    continue
                raise _mesh_error(exc, self.loader.describe()) from None
        raise AssertionError("unreachable")

    def _recover(self, generation: int, exc: grpc.RpcError) -> None:
        """The runtime answered NOT_FOUND (it restarted?): load the model there again, once."""
        with self._reload_lock:
            if generation != self._generation:
                return  # another request already reloaded it
            log.warning("%s lost model %s (%s); loading it again",
                        self.loader.describe(), self.model_id, exc.details())  # type: ignore[attr-defined]
            try:
                self.loader.reload(self.record)
            except MeshError as err:
                raise Unavailable(
                    f"{self.loader.describe()} no longer holds model '{self.model_id}' "
                    f"and loading it again failed: {err.message}"
                ) from None
            self._generation += 1

    def unload(self) -> None:
        self.loader.unload_model(self.model_id)


# --------------------------------------------------------------------------- loaders


class RemoteLoader(ABC):
    """What both remote loaders share: channels, the V2 stub, naming, errors."""

    def __init__(self, address: RuntimeAddress, *, load_timeout_s: float,
                 max_message_bytes: int) -> None:
        from tritonclient.grpc import service_pb2_grpc as pb_grpc

        self.address = address
        self.load_timeout_s = load_timeout_s
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # The runtime is a local sidecar: after it restarts, reconnect within a second
            # or two, not on gRPC's default backoff of up to two minutes.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self.channel = grpc.insecure_channel(address.target, options=self._options)
        self.v2 = pb_grpc.GRPCInferenceServiceStub(self.channel)
        #: Field number of ``ModelInferRequest`` that must carry the model id (1 =
        #: ``model_name``), or None where the runtime reads the ``mm-model-id`` header.
        self.inject_field: int | None = None
        self._aio: tuple[asyncio.AbstractEventLoop, grpc.aio.Channel, Any] | None = None

    def describe(self) -> str:
        return f"runtime {self.address}"

    def runtime_name(self, model_id: str) -> str:
        """The name the runtime knows ``model_id`` by."""
        return model_id

    def raw_infer(self) -> Any:
        """The bytes-in, bytes-out ModelInfer call on this event loop's channel."""
        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio[0] is not loop:
            channel = grpc.aio.insecure_channel(self.address.target, options=self._options)
            call = channel.unary_unary(MODEL_INFER, request_serializer=None,
                                       response_deserializer=None)
            self._aio = (loop, channel, call)
        return self._aio[2]

    def signature(self, model_id: str) -> ModelSignature:
        """The model's inputs and outputs from the runtime's V2 ModelMetadata (empty if none)."""
        from tritonclient.grpc import service_pb2 as pb

        try:
            meta = self.v2.ModelMetadata(
                pb.ModelMetadataRequest(name=self.runtime_name(model_id)),
                metadata=(("mm-model-id", model_id),), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            log.info("%s: no metadata for %s (%s)", self.describe(), model_id, exc.code())  # type: ignore[attr-defined]
            return ModelSignature((), ())

        def specs(tensors: Any) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in tensors)

        return ModelSignature(specs(meta.inputs), specs(meta.outputs))

    def wait_server_ready(self, timeout: float) -> None:
        """Poll V2 ServerReady until true; ``RuntimeError`` after ``timeout`` seconds."""
        from tritonclient.grpc import service_pb2 as pb

        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                if self.v2.ServerReady(pb.ServerReadyRequest(), timeout=2).ready:
                    return
                last = "ServerReady answered false"
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
            time.sleep(0.2)
        raise RuntimeError(f"{self.describe()} not ready within {timeout:.0f}s ({last})")

    async def close(self) -> None:
        """Close both channels (call on the event loop that served requests)."""
        aio, self._aio = self._aio, None
        if aio is not None:
            await aio[1].close()
        self.channel.close()

    # -- the ModelLoader protocol (sync, in the cache's threads) --------------------------

    @abstractmethod
    def predict_size(self, record: ModelRecord) -> int: ...

    @abstractmethod
    def load(self, record: ModelRecord) -> LoadedModel: ...

    @abstractmethod
    def unload_model(self, model_id: str) -> None:
        """Unload in the runtime; errors are logged, not raised (nothing could act on them)."""

    @abstractmethod
    def reload(self, record: ModelRecord) -> None:
        """Load a model the runtime lost again; ``MeshError`` on failure."""


class ModelRuntimeLoader(RemoteLoader):
    """The cache's ``ModelLoader`` for an ``mmesh.ModelRuntime`` server."""

    def __init__(self, address: RuntimeAddress, *, load_timeout_s: float = 120.0,
                 max_message_bytes: int = 16 << 20, default_model_size: int = 1 << 20) -> None:
        from modelmesh._proto.mmesh import model_runtime_pb2_grpc as rt_grpc

        super().__init__(address, load_timeout_s=load_timeout_s,
                         max_message_bytes=max_message_bytes)
        self.spi = rt_grpc.ModelRuntimeStub(self.channel)
        self.default_model_size = default_model_size

    def wait_ready(self, timeout: float) -> Any:
        """Poll ``runtimeStatus`` until READY and adopt what it says; returns the status.

        ``RuntimeError`` when the runtime is not READY within ``timeout`` seconds.
        """
        from modelmesh._proto.mmesh import model_runtime_pb2 as rt

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
        from modelmesh._proto.mmesh import model_runtime_pb2 as rt

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
        from modelmesh._proto.mmesh import model_runtime_pb2 as rt

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
        from modelmesh._proto.mmesh import model_runtime_pb2 as rt

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
        from modelmesh._proto.mmesh import model_runtime_pb2 as rt

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


# --------------------------------------------------------------------------- V2 repository


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

#: MLServer implementation class for each model type.
MLSERVER_IMPLEMENTATIONS = {
    "sklearn": "mlserver_sklearn.SKLearnModel",
    "xgboost": "mlserver_xgboost.XGBoostModel",
    "lightgbm": "mlserver_lightgbm.LightGBMModel",
}
#: Triton: file name inside the version directory and config line for each model type.
#: (Its PyTorch backend cannot infer a TorchScript model's inputs: register a directory
#: with its own config.pbtxt for those.)
TRITON_LAYOUTS = {
    "onnx": ("model.onnx", 'backend: "onnxruntime"'),
}


class RepositoryRuntimeLoader(RemoteLoader):
    """The cache's ``ModelLoader`` for a V2 server with a model repository (MLServer, Triton).

    Loading writes the model into the server's repository directory, as the
    server expects it, then calls ``RepositoryModelLoad``; unloading calls
    ``RepositoryModelUnload`` and removes the directory.

    - MLServer: ``<repo>/<name>/model-settings.json`` naming the implementation
      for the type (``MLSERVER_IMPLEMENTATIONS``) and the model file beside it.
    - Triton: ``<repo>/<name>/config.pbtxt`` with the backend for the type
      (``TRITON_LAYOUTS``) and the file as ``<repo>/<name>/1/model.*``.
    - A model path that is a directory already laid out for the server (it
      holds ``model-settings.json`` for MLServer, ``config.pbtxt`` for Triton)
      is used as it is, for any type the server supports.

    Files are hard-linked where the repository is on the same filesystem as
    the models root (or the disk cache, for models pulled from storage), else
    copied, so the server needs to see the repository directory only.
    ``<name>`` is the model id when it is a safe directory name (letters,
    digits, ``.``, ``_``, ``-``; at most 100), else ``mm-`` and a hash of the
    id; the server knows the model by that name, and every request's
    ``model_name`` is set to it.
    """

    def __init__(self, address: RuntimeAddress, repository: Path, files: LocalModelLoader, *,
                 load_timeout_s: float = 120.0, max_message_bytes: int = 16 << 20) -> None:
        super().__init__(address, load_timeout_s=load_timeout_s,
                         max_message_bytes=max_message_bytes)
        self.flavor = address.kind
        self.repository = Path(repository)
        #: Where model files come from (the models root, or storage through the disk cache).
        self.files = files
        self.inject_field = 1  # the server knows models by model_name only

    def runtime_name(self, model_id: str) -> str:
        if _SAFE_NAME.fullmatch(model_id) and model_id not in (".", ".."):
            return model_id
        return "mm-" + hashlib.sha256(model_id.encode()).hexdigest()[:32]

    def wait_ready(self, timeout: float) -> None:
        """Wait for the server, then unload and remove what an earlier mesh left behind."""
        self.repository.mkdir(parents=True, exist_ok=True)
        self.wait_server_ready(timeout)
        for marker in self.repository.glob(f"*/{MARKER}"):
            name = marker.parent.name
            log.info("%s: removing leftover model %s", self.describe(), name)
            self._unload_name(name)
            shutil.rmtree(marker.parent, ignore_errors=True)

    def predict_size(self, record: ModelRecord) -> int:
        from modelmesh.runtimes import MODEL_TYPES
        from modelmesh.runtimes._model_files import total_size

        if record.model_type in MODEL_TYPES:
            return self.files.predict_size(record)
        with self.files.local_files(record) as path:
            return max(1, int(total_size(path) * UNKNOWN_FORMAT_FACTOR))

    def load(self, record: ModelRecord) -> RemoteModel:
        from tritonclient.grpc import service_pb2 as pb

        model_id = record.model_id
        name = self.runtime_name(model_id)
        try:
            size = self.predict_size(record)
            with self.files.local_files(record) as source:
                self._materialise(record, source, name)
        except (OSError, MeshError) as exc:
            reason = exc.message if isinstance(exc, MeshError) else f"{type(exc).__name__}: {exc}"
            raise ModelLoadFailed(model_id, reason) from None
        try:
            self.v2.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name),
                                        timeout=self.load_timeout_s)
        except grpc.RpcError as exc:
            self._unload_name(name)
            shutil.rmtree(self.repository / name, ignore_errors=True)
            code = exc.code()  # type: ignore[attr-defined]
            details = exc.details() or code.name  # type: ignore[attr-defined]
            if code is grpc.StatusCode.UNAVAILABLE:
                details = f"{self.describe()} is unavailable ({details})"
            raise ModelLoadFailed(model_id, details) from None
        return RemoteModel(self, record, size, self.signature(model_id))

    def reload(self, record: ModelRecord) -> None:
        from tritonclient.grpc import service_pb2 as pb

        name = self.runtime_name(record.model_id)
        try:
            if not (self.repository / name / MARKER).exists():
                with self.files.local_files(record) as source:
                    self._materialise(record, source, name)
            self.v2.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name),
                                        timeout=self.load_timeout_s)
        except grpc.RpcError as exc:
            raise _mesh_error(exc, self.describe()) from None
        except OSError as exc:
            raise Unavailable(f"{type(exc).__name__}: {exc}") from None

    def unload_model(self, model_id: str) -> None:
        name = self.runtime_name(model_id)
        self._unload_name(name)
        shutil.rmtree(self.repository / name, ignore_errors=True)

    def _unload_name(self, name: str) -> None:
        from tritonclient.grpc import service_pb2 as pb

        try:
            self.v2.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name),
                                          timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                log.warning("%s: unloading %s failed: %s: %s", self.describe(), name,
                            exc.code().name, exc.details())  # type: ignore[attr-defined]

    # -- writing the model into the repository ---------------------------------------------

    def _materialise(self, record: ModelRecord, source: Path, name: str) -> None:
        """Write the model's directory for the server: in a temporary name, then renamed."""
        target = self.repository / name
        staging = self.repository / f".{name}.{os.getpid()}.{threading.get_ident()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            if self.flavor == "mlserver":
                self._mlserver_layout(record, source, name, staging)
            else:
                self._triton_layout(record, source, staging)
            (staging / MARKER).write_text(record.model_id)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _mlserver_layout(self, record: ModelRecord, source: Path, name: str, out: Path) -> None:
        if source.is_dir() and (source / "model-settings.json").is_file():
            _link_tree(source, out)
            settings = json.loads((source / "model-settings.json").read_text())
            settings["name"] = name
            (out / "model-settings.json").unlink()
            (out / "model-settings.json").write_text(json.dumps(settings, indent=2))
            return
        implementation = MLSERVER_IMPLEMENTATIONS.get(record.model_type)
        if implementation is None:
            raise InvalidArgument(
                f"MLServer has no runtime here for model type '{record.model_type}' "
                f"(supported: {', '.join(MLSERVER_IMPLEMENTATIONS)}); or register a directory "
                "holding its own model-settings.json"
            )
        file = self._model_file(record, source)
        if source.is_dir():
            _link_tree(source, out)
            uri = f"./{file.relative_to(source)}"
        else:
            _link(file, out / file.name)
            uri = f"./{file.name}"
        settings = {"name": name, "implementation": implementation, "parameters": {"uri": uri}}
        (out / "model-settings.json").write_text(json.dumps(settings, indent=2))

    def _triton_layout(self, record: ModelRecord, source: Path, out: Path) -> None:
        if source.is_dir() and (source / "config.pbtxt").is_file():
            _link_tree(source, out)
            return
        layout = TRITON_LAYOUTS.get(record.model_type)
        if layout is None:
            raise InvalidArgument(
                f"no Triton layout here for model type '{record.model_type}' (supported: "
                f"{', '.join(TRITON_LAYOUTS)}); or register a directory holding its own "
                "config.pbtxt and version directories"
            )
        filename, backend = layout
        (out / "1").mkdir()
        _link(self._model_file(record, source), out / "1" / filename)
        (out / "config.pbtxt").write_text(f"{backend}\nmax_batch_size: 0\n")

    @staticmethod
    def _model_file(record: ModelRecord, source: Path) -> Path:
        """The model file in ``source``, found as the mesh's own runtime for the type finds it."""
        from modelmesh.runtimes import MODEL_TYPES, _model_files

        suffixes: tuple[str, ...] = ()
        if record.model_type in MODEL_TYPES:  # each runtime module is named by its type
            module = importlib.import_module(f"modelmesh.runtimes.{record.model_type}")
            suffixes = getattr(module, "SUFFIXES", ())
        try:
            return _model_files.model_file(source, record.model_type, suffixes)
        except _model_files.BadModelFile as exc:
            raise InvalidArgument(str(exc)) from None


def _link(source: Path, target: Path) -> None:
    """Hard-link ``source`` as ``target``; copy where a link cannot be made."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _link_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            _link(path, dest)


# --------------------------------------------------------------------------- binding


@dataclass
class RuntimeBinding:
    """A connected runtime: the cache's loader and the limits the runtime reported.

    A limit is None where the runtime reports none and the mesh's own setting applies.
    """

    address: RuntimeAddress
    loader: RemoteLoader
    capacity_bytes: int | None = None
    max_loading_concurrency: int | None = None
    load_timeout_s: float | None = None
    version: str = ""

    def apply(self, settings: Settings) -> Settings:
        """``settings`` with the runtime's capacity and limits in place of the mesh's own."""
        changes: dict[str, Any] = {}
        if self.capacity_bytes:
            changes["capacity"] = self.capacity_bytes
        if self.max_loading_concurrency:
            changes["max_concurrent_loads"] = self.max_loading_concurrency
        if self.load_timeout_s:
            changes["load_timeout"] = self.load_timeout_s
        return replace(settings, **changes)

    async def close(self) -> None:
        await self.loader.close()


def connect_runtime(settings: Settings, files: LocalModelLoader | None = None, *,
                    ready_timeout: float | None = None) -> RuntimeBinding:
    """Connect to the runtime ``settings.runtime`` names and wait until it is ready (blocking).

    ``files`` gives the repository adapter the model files (default: the
    models root only). Waits at most ``ready_timeout`` seconds (default
    ``settings.load_timeout``); raises ``RuntimeError`` saying why when the
    runtime is not ready by then or the settings are incomplete.
    """
    address = RuntimeAddress.parse(settings.runtime)
    timeout = settings.load_timeout if ready_timeout is None else ready_timeout
    if address.kind == "embedded":
        raise RuntimeError("the embedded runtime needs no connection")
    if address.kind == "mmesh":
        loader = ModelRuntimeLoader(address, load_timeout_s=settings.load_timeout,
                                    max_message_bytes=settings.max_message_bytes)
        try:
            status = loader.wait_ready(timeout)
        except BaseException:
            loader.channel.close()
            raise
        binding = RuntimeBinding(
            address, loader,
            capacity_bytes=int(status.capacityInBytes) or None,
            max_loading_concurrency=int(status.maxLoadingConcurrency) or None,
            load_timeout_s=status.modelLoadingTimeoutMs / 1000 or None,
            version=status.runtimeVersion,
        )
    else:
        if settings.runtime_repository is None:
            raise RuntimeError(
                f"--runtime {address} needs --runtime-repository DIR: the model repository "
                f"directory {address.kind} serves from"
            )
        from modelmesh.storage import LocalModelLoader

        repo_loader = RepositoryRuntimeLoader(
            address, Path(settings.runtime_repository),
            files or LocalModelLoader(Path(settings.models_root)),
            load_timeout_s=settings.load_timeout, max_message_bytes=settings.max_message_bytes)
        try:
            repo_loader.wait_ready(timeout)
        except BaseException:
            repo_loader.channel.close()
            raise
        binding = RuntimeBinding(address, repo_loader)
    log.info("runtime %s ready (capacity %s, loading concurrency %s, load timeout %s)",
             address, binding.capacity_bytes or "mesh's", binding.max_loading_concurrency
             or "mesh's", binding.load_timeout_s or "mesh's")
    return binding
