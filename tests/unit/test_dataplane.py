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
        plane = DataPlane(registry=None, cache=cache, metrics=Metrics(),  # type: ignore[arg-type]
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
    assert plane.stats["m"].typical_compute_ns > 0


async def test_a_model_that_slows_down_moves_back_to_threads():
    model = TimedModel(0.0)
    cache = ModelCache(1000, OneModelLoader(model))
    with ThreadPoolExecutor(2) as executor:
        plane = DataPlane(registry=None, cache=cache, metrics=Metrics(),  # type: ignore[arg-type]
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
