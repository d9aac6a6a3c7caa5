"""A model loaded in a runtime server, and what every remote loader shares.

``RemoteModel`` serves through its loader's channels: ``predict`` (tensors, a
V2 ``ModelInfer`` call) and ``infer_raw`` (the client's serialized request,
passed on untouched but for the model name). ``RemoteLoader`` holds the
channels, the V2 stub, the name a runtime knows a model by, and the turn of a
runtime's gRPC error into the mesh error a client should see.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelmesh import codec
from modelmesh.errors import (
    CapacityExceeded,
    Code,
    InvalidArgument,
    MeshError,
    Unavailable,
    UpstreamError,
)
from modelmesh.headers import runtime_id_headers
from modelmesh.registry.records import ModelRecord
from modelmesh.runtimes.base import LoadedModel
from modelmesh.settings import RuntimeAddress
from modelmesh.tensor import ModelSignature, Parameters, Tensor, TensorSpec
from modelmesh.wire import with_string_field

log = logging.getLogger(__name__)

#: The V2 inference method the raw passthrough calls.
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
#: ``methodInfos`` key of that method in ``runtimeStatus``.
MODEL_INFER_KEY = "inference.GRPCInferenceService/ModelInfer"
#: Deadline of the quick SPI calls (sizes, status, unload), seconds.
CALL_TIMEOUT_S = 30.0

# Metadata the mesh must not pass on: transport headers, the mesh's own, and the
# client's credential (authorized at the ingress; a runtime has no use for it).
_DROP_PREFIXES = (":", "grpc-", "mm-")
_DROP_KEYS = frozenset({"content-type", "user-agent", "te", "host", "authorization"})


def _forward_metadata(
    metadata: Sequence[tuple[str, str | bytes]], model_id: str
) -> tuple[tuple[str, str | bytes], ...]:
    kept = tuple(
        (k, v) for k, v in metadata
        if k not in _DROP_KEYS and not k.startswith(_DROP_PREFIXES)
    )
    return (*kept, *runtime_id_headers(model_id))


def _code(code: grpc.StatusCode) -> Code:
    """The mesh's ``Code`` for a gRPC status code (the same names and numbers)."""
    return Code.__members__.get(code.name, Code.UNKNOWN)


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
    return UpstreamError(_code(code), f"{where}: {details}")


# --------------------------------------------------------------------------- models


class RemoteModel(LoadedModel):
    """A model loaded in a runtime server; ``predict`` and ``infer_raw`` call it there."""

    passes_bytes = True

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
        request = pb.ModelInferRequest(model_name=self.runtime_name)
        codec.encode_inputs(inputs, request)
        if parameters:
            codec.python_to_params(parameters, request.parameters)
        metadata = runtime_id_headers(self.model_id)
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
        try:
            meta = self.v2.ModelMetadata(
                pb.ModelMetadataRequest(name=self.runtime_name(model_id)),
                metadata=runtime_id_headers(model_id), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            log.info("%s: no metadata for %s (%s)", self.describe(), model_id, exc.code())  # type: ignore[attr-defined]
            return ModelSignature((), ())

        def specs(tensors: Any) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in tensors)

        return ModelSignature(specs(meta.inputs), specs(meta.outputs))

    def wait_server_ready(self, timeout: float) -> None:
        """Poll V2 ServerReady until true; ``RuntimeError`` after ``timeout`` seconds."""
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
