"""The one data plane: every transport (V2 gRPC now, REST later) calls into this.

It resolves a model name to a registered model, makes sure the model is loaded
(through the cache), runs it (``modelmesh.batching``) and keeps per-model statistics.
It knows V2 messages (they are the protocol) but nothing of gRPC servicers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from modelmesh import codec
from modelmesh.batching import PredictionRunner
from modelmesh.cache.local import CacheEntry, ModelCache
from modelmesh.errors import InvalidArgument, MeshError, ModelNotFound, Unavailable
from modelmesh.metrics import Metrics
from modelmesh.registry.records import ModelRecord
from modelmesh.registry.store import Registry
from modelmesh.tensor import ModelSignature


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass(slots=True)
class ModelStats:
    """Counters behind ModelStatistics, for one model on this instance."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)


#: The longest model or vmodel name a request may use: registration refuses longer ids
#: (``modelmesh.registry.store.validate_id``), so no such model can exist.
MAX_NAME_CHARS = 512


def _check_name(what: str, name: str) -> str:
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(
            f"{what} is {len(name)} characters long; model ids have at most {MAX_NAME_CHARS} "
            f"('{codec.clip(name)}')"
        )
    return name


#: The one version a model served by the embedded runtimes has (V2 ``model_version``;
#: empty means the default, this one). A runtime server decides for its own models.
MODEL_VERSION = "1"


def check_version(model_id: str, version: str) -> None:
    """Refuse a ``model_version`` the model does not have (as Triton does), NOT_FOUND."""
    if version and version != MODEL_VERSION:
        raise ModelNotFound(model_id, message=(
            f"model '{codec.clip(model_id)}' has no version '{codec.clip(version)}' "
            f"(its only version is {MODEL_VERSION}; leave model_version empty for it)"))


def _parse_request(raw: bytes) -> pb.ModelInferRequest:
    try:
        return pb.ModelInferRequest.FromString(raw)
    except DecodeError as exc:
        raise InvalidArgument(f"malformed ModelInferRequest: {codec.clip(str(exc))}") from None


class DataPlane:
    """Inference and model queries for one instance."""

    def __init__(
        self,
        registry: Registry,
        cache: ModelCache,
        metrics: Metrics,
        executor: ThreadPoolExecutor,
        load_timeout: float,
        inline_infer_ms: float = 1.0,
        max_batch_rows: int = 256,
        max_batch_delay_ms: float = 1.0,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.metrics = metrics
        self.executor = executor
        self.load_timeout = load_timeout
        self.runner = PredictionRunner(executor, inline_infer_ms, max_batch_rows,
                                       max_batch_delay_ms, on_batch=self._on_batch)
        self.stats: dict[str, ModelStats] = {}
        self._rate = (time.monotonic(), 0, 0.0)  # (sampled at, requests served, per second)
        self._forgotten_executions = 0  # requests served of models since forgotten

    # -- names ----------------------------------------------------------------

    def resolve(self, name: str, model_id: str = "", vmodel_id: str = "") -> str:
        """The concrete model id for a request.

        ``mm-model-id`` metadata names a model directly, ``mm-vmodel-id`` a
        vmodel (not both: ``InvalidArgument``); otherwise the request's
        ``model_name`` is a vmodel id if one by that name exists, else a model id.
        A name longer than any id can be (``MAX_NAME_CHARS``) is refused with
        ``InvalidArgument``.
        """
        if model_id and vmodel_id:
            raise InvalidArgument("only one of model id (mm-model-id) and vmodel id "
                                  "(mm-vmodel-id) may be given")
        if model_id:
            return _check_name("mm-model-id", model_id)
        if vmodel_id:
            _check_name("mm-vmodel-id", vmodel_id)
            vm = self.registry.vmodels.get(vmodel_id)
            if vm is None:
                raise ModelNotFound(vmodel_id, message=f"vmodel '{codec.clip(vmodel_id)}' is "
                                    "not registered")
            return vm.active_model
        if not name:
            raise ModelNotFound("", what="model (empty model_name)")
        _check_name("model name", name)
        vm = self.registry.vmodels.get(name)
        return vm.active_model if vm is not None else name

    async def acquire(self, record: ModelRecord, stats: ModelStats | None = None) -> CacheEntry:
        """The loaded model for ``record``, waiting (bounded) for a load if needed."""
        if self.cache.is_loaded(record.model_id):
            start = time.perf_counter_ns()
            entry = await self.cache.acquire(record)
            if stats is not None:
                stats.cache_hit.add(time.perf_counter_ns() - start)
            return entry
        start = time.perf_counter_ns()
        try:
            async with asyncio.timeout(self.load_timeout):  # no task of its own, as wait_for has
                entry = await self.cache.acquire(record)
        except TimeoutError:
            raise Unavailable(
                f"model '{record.model_id}' did not load within {self.load_timeout:.0f}s"
            ) from None
        waited = time.perf_counter_ns() - start
        self.metrics.cache_miss_ms.observe(waited / 1e6)
        if stats is not None:
            stats.cache_miss.add(waited)
        return entry

    # -- inference --------------------------------------------------------------

    async def infer_bytes(
        self, raw: bytes, record: ModelRecord, metadata: Sequence[tuple[str, str | bytes]] = ()
    ) -> bytes:
        """Serve a serialized ModelInferRequest here; returns the serialized response.

        ``raw`` has passed ``wire.check_request`` where it came in (the transport:
        no more fields than a parse should cost). A model whose runtime takes
        requests as bytes (a remote runtime) gets them untouched; otherwise the
        request is decoded here.
        """
        entry = self.cache.get(record.model_id)
        if entry is not None and entry.model is not None and entry.model.passes_bytes:
            return await self._infer_passthrough(raw, record, tuple(metadata))
        response = await self.infer(_parse_request(raw), record.model_id, record)
        return response.SerializeToString()

    async def _infer_passthrough(
        self, raw: bytes, record: ModelRecord, metadata: tuple[tuple[str, str | bytes], ...]
    ) -> bytes:
        start = time.perf_counter_ns()
        stats = self._stats_for(record.model_id)
        try:
            entry = await self.acquire(record, stats)
            try:
                model = entry.model
                if model is None:  # unloaded between acquire and now: cannot happen in use
                    raise Unavailable(f"model '{record.model_id}' was unloaded")
                if not model.passes_bytes:  # reloaded by another runtime
                    request = _parse_request(raw)
                    return (await self.infer(request, record.model_id, record)).SerializeToString()
                compute = time.perf_counter_ns()
                out = await model.infer_raw(raw, metadata)
                stats.compute_infer.add(time.perf_counter_ns() - compute)
            finally:
                self.cache.release(entry)
        except MeshError:
            took = time.perf_counter_ns() - start
            stats.fail.add(took)
            self._observe_model(record.model_id, "ERROR", took)
            raise
        took = time.perf_counter_ns() - start
        stats.success.add(took)
        self._observe_model(record.model_id, "OK", took)
        stats.execution_count += 1
        stats.inference_count += 1
        stats.last_inference_ms = int(time.time() * 1000)
        return out

    async def infer(
        self, request: pb.ModelInferRequest, model_id: str, record: ModelRecord | None = None
    ) -> pb.ModelInferResponse:
        start = time.perf_counter_ns()
        if record is None:
            record = await self.registry.require_model(model_id)
        stats = self._stats_for(model_id)
        try:
            inputs = codec.decode_inputs(request)
            params = codec.params_to_python(request.parameters) if request.parameters else {}
            requested = [o.name for o in request.outputs]
            entry = await self.acquire(record, stats)
            try:
                response = pb.ModelInferResponse(  # the version served, as Triton answers
                    model_name=request.model_name,
                    model_version=request.model_version or MODEL_VERSION, id=request.id,
                )
                queued = time.perf_counter_ns()
                model = entry.model
                if model is None:  # unloaded between acquire and now: cannot happen in use
                    raise Unavailable(f"model '{record.model_id}' was unloaded")
                if not model.passes_bytes:
                    check_version(record.model_id, request.model_version)
                outputs, compute_ns = await self.runner.predict(
                    record.model_id, model, inputs, params, requested)
                codec.encode_outputs(outputs, requested, response)
                stats.queue.add(max(time.perf_counter_ns() - queued - compute_ns, 0))
                stats.compute_infer.add(compute_ns)
                self.metrics.labelled("invoke_model_ms", "ModelInfer", "OK").observe(
                    compute_ns / 1e6)
            finally:
                self.cache.release(entry)
        except MeshError:
            took = time.perf_counter_ns() - start
            stats.fail.add(took)
            self._observe_model(model_id, "ERROR", took)
            raise
        took = time.perf_counter_ns() - start
        stats.success.add(took)
        self._observe_model(model_id, "OK", took)
        # V2 counts inferences per batch element: the first dimension of the first input.
        first = inputs[0].data if inputs else None
        stats.inference_count += int(first.shape[0]) if first is not None and first.ndim else 1
        stats.execution_count += 1
        stats.last_inference_ms = int(time.time() * 1000)
        return response

    def _stats_for(self, model_id: str) -> ModelStats:
        """The model's statistics; those of a model no longer registered are not kept."""
        stats = self.stats.get(model_id)
        if stats is None:
            stats = ModelStats()
            if model_id in self.registry.models:
                self.stats[model_id] = stats
        return stats

    def _observe_model(self, model_id: str, code: str, ns: int) -> None:
        """The per-model series (``--per-model-metrics``), for registered models only: a
        request finishing after its model's unregistration must not bring it back."""
        if self.metrics.model_request_ms is not None and model_id in self.registry.models:
            self.metrics.observe_model(model_id, code, ns / 1e6)

    def forget(self, model_id: str) -> None:
        """Drop what is kept about a model that was unregistered (statistics, batching)."""
        stats = self.stats.pop(model_id, None)
        if stats is not None:
            self._forgotten_executions += stats.execution_count
        self.runner.forget(model_id)
        self.metrics.forget_model(model_id)

    def _on_batch(self, requests: int) -> None:
        self.metrics.batches.inc()
        self.metrics.batched_requests.inc(requests)

    # -- queries ----------------------------------------------------------------

    def request_rate(self) -> float:
        """Requests per second served here, over the last few seconds."""
        t, n, rate = self._rate
        now = time.monotonic()
        if now - t >= 2.0:
            served = self._forgotten_executions + sum(
                st.execution_count for st in self.stats.values())
            rate = (served - n) / (now - t)
            self._rate = (now, served, rate)
        return rate

    def is_ready(self, model_id: str) -> bool:
        return self.cache.is_loaded(model_id)

    def passes_bytes(self, model_id: str) -> bool:
        """Whether the model is loaded here in a runtime that takes requests as bytes."""
        entry = self.cache.get(model_id)
        return entry is not None and entry.model is not None and entry.model.passes_bytes

    async def signature(self, model_id: str,
                        version: str = "") -> tuple[ModelRecord, ModelSignature]:
        """The model's declared inputs and outputs (loads the model if needed); a
        ``version`` it does not have is ``ModelNotFound``."""
        record = await self.registry.require_model(model_id)
        entry = await self.acquire(record)
        try:
            if entry.model is None:
                raise Unavailable(f"model '{record.model_id}' was unloaded")
            if not entry.model.passes_bytes:
                check_version(record.model_id, version)
            return record, entry.model.signature
        finally:
            self.cache.release(entry)
