"""Where the data plane runs model code: inline for fast models, in threads for slow ones.

``TimedModel`` and ``OneModelLoader`` are test doubles for a real runtime: a model
that sleeps a chosen time per prediction and records the thread it ran on.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from modelmesh.cache.local import ModelCache
from modelmesh.dataplane import DataPlane
from modelmesh.metrics import Metrics
from modelmesh.registry.records import ModelRecord
from modelmesh.runtimes.base import LoadedModel
from modelmesh.tensor import ModelSignature, Tensor
from tests.support.mirror import in_memory_registry


class TimedModel(LoadedModel):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.size_bytes = 10
        self.signature = ModelSignature((), ())
        self.threads: list[int] = []
        self.requested: list[list[str]] = []

    def predict(self, inputs, parameters):
        return self.predict_outputs(inputs, parameters, ())

    def predict_outputs(self, inputs, parameters, requested):
        self.threads.append(threading.get_ident())
        self.requested.append(list(requested))
        if self.seconds:
            time.sleep(self.seconds)
        return [Tensor("y", "FP32", np.zeros((1,), dtype=np.float32)),
                Tensor("z", "FP32", np.ones((1,), dtype=np.float32))]


class OneModelLoader:
    def __init__(self, model: TimedModel) -> None:
        self.model = model

    def predict_size(self, record: ModelRecord) -> int:
        return 10

    def load(self, record: ModelRecord) -> LoadedModel:
        return self.model


def request(outputs: tuple[str, ...] = ()) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="x", datatype="FP32", shape=[1])
    t.contents.fp32_contents.append(1.0)
    for name in outputs:
        req.outputs.add(name=name)
    return req


@pytest.mark.parametrize(("seconds", "inline_ms", "inline_expected"), [
    (0.0, 1.0, True),  # fast model: after the first (measured) call, on the loop thread
    (0.01, 1.0, False),  # 10 ms model: always in an inference thread
    (0.0, 0.0, False),  # inline switched off
])
async def test_fast_models_run_inline_after_a_measured_call(seconds, inline_ms, inline_expected):
    model = TimedModel(seconds)
    cache = ModelCache(1000, OneModelLoader(model))
    with ThreadPoolExecutor(2) as executor:
        plane = DataPlane(registry=in_memory_registry(), cache=cache, metrics=Metrics(),
                          executor=executor, load_timeout=10, inline_infer_ms=inline_ms)
        record = ModelRecord("m", "identity", "m.json")
        loop_thread = threading.get_ident()
        for _ in range(5):
            response = await plane.infer(request(("z",)), "m", record)
            assert [o.name for o in response.outputs] == ["z"]
        await cache.close()
    assert model.threads[0] != loop_thread  # unknown cost: measured in a thread first
    on_loop = [t == loop_thread for t in model.threads[1:]]
    assert on_loop == [inline_expected] * 4
    assert model.requested == [["z"]] * 5
    assert plane.runner.typical_ns("m") > 0


async def test_a_model_that_slows_down_moves_back_to_threads():
    model = TimedModel(0.0)
    cache = ModelCache(1000, OneModelLoader(model))
    with ThreadPoolExecutor(2) as executor:
        plane = DataPlane(registry=in_memory_registry(), cache=cache, metrics=Metrics(),
                          executor=executor, load_timeout=10, inline_infer_ms=1.0)
        record = ModelRecord("m", "identity", "m.json")
        loop_thread = threading.get_ident()
        for _ in range(3):
            await plane.infer(request(), "m", record)
        model.seconds = 0.02  # now 20 ms a call: the average passes 1 ms after one call
        for _ in range(3):
            await plane.infer(request(), "m", record)
        await cache.close()
    assert [t == loop_thread for t in model.threads] == [False, True, True, True, False, False]


class ManyModelLoader:
    def __init__(self, models: dict[str, TimedModel]) -> None:
        self.models = models

    def predict_size(self, record: ModelRecord) -> int:
        return 10

    def load(self, record: ModelRecord) -> LoadedModel:
        return self.models[record.model_id]


async def test_a_small_model_answers_its_first_request_where_its_kind_does():
    """A cold small model's first answer runs inline when small models of its kind are
    fast lately; a large one, or one of a kind not seen fast, is measured in a thread."""
    models = {"a": TimedModel(0.0), "b": TimedModel(0.0), "big": TimedModel(0.0)}
    models["big"].size_bytes = 8 << 20
    cache = ModelCache(1 << 30, ManyModelLoader(models))
    with ThreadPoolExecutor(2) as executor:
        plane = DataPlane(registry=in_memory_registry(), cache=cache, metrics=Metrics(),
                          executor=executor, load_timeout=10, inline_infer_ms=1.0)
        loop_thread = threading.get_ident()
        for model_id in ("a", "b", "big"):
            await plane.infer(request(), model_id, ModelRecord(model_id, "identity", "m.json"))
        await cache.close()
    assert models["a"].threads[0] != loop_thread  # nothing known of its kind yet
    assert models["b"].threads[0] == loop_thread  # "a" answered in microseconds
    assert models["big"].threads[0] != loop_thread  # large: measured in a thread first


# --------------------------------------------------------------------------- batching


class RowModel(LoadedModel):
    """Doubles each row; refuses rows holding a negative value (a test double)."""

    batchable = True

    def __init__(self, row_aligned: bool = True) -> None:
        self.size_bytes = 10
        self.signature = ModelSignature((), ())
        self.calls: list[int] = []  # rows per call
        self.row_aligned = row_aligned

    def predict(self, inputs, parameters):
        x = inputs[0].data
        self.calls.append(x.shape[0])
        if (x < 0).any():
            from modelmesh.errors import InvalidArgument

            raise InvalidArgument("negative input")
        y = x * 2 if self.row_aligned else x.sum(axis=0, keepdims=True)
        return [Tensor("y", "FP32", y)]


def plane_for(model: LoadedModel, executor: ThreadPoolExecutor, **kw) -> DataPlane:
    cache = ModelCache(1000, OneModelLoader(model))
    return DataPlane(registry=in_memory_registry(), cache=cache, metrics=Metrics(),
                     executor=executor, load_timeout=10, **kw)


def row_request(*rows: float) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="x", datatype="FP32", shape=[len(rows), 1])
    t.contents.fp32_contents.extend(rows)
    return req


def values(response: pb.ModelInferResponse) -> list[float]:
    out = response.outputs[0]
    if response.raw_output_contents:
        return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).tolist()
    return list(out.contents.fp32_contents)


async def test_concurrent_requests_share_one_prediction_and_get_their_own_rows():
    import asyncio

    model = RowModel()
    record = ModelRecord("m", "identity", "m.json")
    with ThreadPoolExecutor(2) as executor:
        plane = plane_for(model, executor)
        await plane.infer(row_request(0.5), "m", record)  # measured once, in a thread
        model.calls.clear()
        responses = await asyncio.gather(*(plane.infer(row_request(i, i + 0.25), "m", record)
                                           for i in range(8)))
        await plane.cache.close()
    assert [values(r) for r in responses] == [[2 * i, 2 * i + 0.5] for i in range(8)]
    assert model.calls == [16]  # one prediction over every request's rows
    stats = plane.runner.batcher.stats
    assert stats.batches == 1 and stats.merged_requests == 8
    assert plane.metrics.batched_requests._value.get() == 8


async def test_a_rejected_batch_is_retried_per_request_so_only_the_bad_one_fails():
    import asyncio

    from modelmesh.errors import InvalidArgument

    model = RowModel()
    record = ModelRecord("m", "identity", "m.json")
    with ThreadPoolExecutor(2) as executor:
        plane = plane_for(model, executor)
        await plane.infer(row_request(0.5), "m", record)
        model.calls.clear()
        results = await asyncio.gather(
            *(plane.infer(row_request(-1.0 if i == 3 else float(i)), "m", record)
              for i in range(5)), return_exceptions=True)
        await plane.cache.close()
    assert isinstance(results[3], InvalidArgument)
    assert [values(r) for i, r in enumerate(results) if i != 3] == [[0.0], [2.0], [4.0], [8.0]]
    assert model.calls == [5, 1, 1, 1, 1, 1] and plane.runner.batcher.stats.fallbacks == 1


async def test_outputs_that_are_not_one_row_per_input_row_are_never_split():
    import asyncio

    model = RowModel(row_aligned=False)  # sums the rows: its output is not per row
    record = ModelRecord("m", "identity", "m.json")
    with ThreadPoolExecutor(2) as executor:
        plane = plane_for(model, executor)
        await plane.infer(row_request(0.5), "m", record)
        responses = await asyncio.gather(*(plane.infer(row_request(i, i), "m", record)
                                           for i in range(4)))
        await plane.cache.close()
    assert [values(r) for r in responses] == [[2.0 * i] for i in range(4)]
    assert plane.runner.batcher.stats.batches == 0 and plane.runner.batcher.stats.fallbacks == 1


@pytest.mark.parametrize("kw", [{"max_batch_rows": 0}, {}])
async def test_no_merging_when_off_or_for_models_that_are_not_row_wise(kw):
    import asyncio

    model = RowModel()
    if not kw:
        model.batchable = False
    record = ModelRecord("m", "identity", "m.json")
    with ThreadPoolExecutor(2) as executor:
        plane = plane_for(model, executor, **kw)
        await plane.infer(row_request(0.5), "m", record)
        model.calls.clear()
        await asyncio.gather(*(plane.infer(row_request(i), "m", record) for i in range(4)))
        await plane.cache.close()
    assert model.calls == [1, 1, 1, 1]


async def test_a_lone_client_stops_waiting_for_company():
    model = RowModel()
    record = ModelRecord("m", "identity", "m.json")
    with ThreadPoolExecutor(2) as executor:
        plane = plane_for(model, executor)
        for i in range(10):
            await plane.infer(row_request(float(i)), "m", record)
        await plane.cache.close()
    traffic = plane.runner.batcher._traffic["m"]
    assert traffic.company < 1.0  # the next batch closes at once instead of waiting
    assert model.calls == [1] * 10


async def test_a_new_models_first_request_does_not_wait_for_company():
    """A cold model's first request is served as soon as it is loaded: with a one-minute
    batch delay, waiting for company would hold it a minute."""
    import asyncio

    model = RowModel()
    record = ModelRecord("m", "identity", "m.json")
    with ThreadPoolExecutor(2) as executor:
        plane = plane_for(model, executor, max_batch_delay_ms=60_000)
        response = await asyncio.wait_for(plane.infer(row_request(1.5), "m", record), 20)
        await plane.cache.close()
    assert values(response) == [3.0]


async def test_a_model_learns_early_whether_waiting_for_company_pays():
    """Its first batches do not wait; the FIRST_PROBE-th does, and finds the company the
    pairs of requests bring, so later batches wait for it."""
    import asyncio

    from modelmesh.batching import FIRST_PROBE

    model = RowModel()
    record = ModelRecord("m", "identity", "m.json")
    with ThreadPoolExecutor(2) as executor:
        plane = plane_for(model, executor)
        learned = []
        for i in range(FIRST_PROBE):
            await asyncio.gather(plane.infer(row_request(float(i)), "m", record),
                                 plane.infer(row_request(float(i)), "m", record))
            learned.append(plane.runner.batcher._traffic["m"].company)
        await plane.cache.close()
    assert learned[:-1] == [0.0] * (FIRST_PROBE - 1)  # none of those waited
    assert learned[-1] > 0.0  # the probe waited and was joined


async def test_a_load_slower_than_the_load_timeout_is_unavailable_and_unpinned():
    from modelmesh.errors import Unavailable

    class SlowLoader(OneModelLoader):
        def load(self, record):
            time.sleep(0.3)
            return self.model

    cache = ModelCache(1000, SlowLoader(TimedModel(0.0)))
    with ThreadPoolExecutor(2) as executor:
        plane = DataPlane(registry=in_memory_registry(), cache=cache, metrics=Metrics(),
                          executor=executor, load_timeout=0.05)
        record = ModelRecord("m", "identity", "m.json")
        with pytest.raises(Unavailable, match="did not load within"):
            await plane.infer(request(), "m", record)
        await cache.settle()  # the load itself finishes: loaded, and nobody holds it
        entry = cache.get("m")
        assert entry is not None and cache.is_loaded("m") and entry.in_use == 0
        await cache.close()
