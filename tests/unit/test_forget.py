"""Unregistering forgets a model everywhere: many register / infer / unregister cycles
leave no per-model state behind, and memory stays flat (real parts, see tests/support)."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from modelmesh import codec
from modelmesh.registry.records import ModelRecord
from modelmesh.tensor import Tensor
from tests.support.mirror import delete, put
from tests.support.parts import EchoModel, Parts, StandInLoader, build


class CountingLoader(StandInLoader):
    """``StandInLoader`` that counts loads in one number: its per-model table would be
    the only per-model state left behind, and it is the test's, not the mesh's."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def load(self, record: ModelRecord) -> EchoModel:
        self.total += 1
        return EchoModel(self.predict_size(record))


def _request(model_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model_id)
    codec.encode_inputs([Tensor("x", "FP32", np.ones((1, 4), np.float32))], request)
    return request


async def _cycles(parts: Parts, start: int, n: int) -> None:
    for i in range(start, start + n):
        record = ModelRecord(f"churn-{i}", "identity", f"churn-{i}.json")
        put(parts.registry, record)
        response = await parts.dataplane.infer(_request(record.model_id), record.model_id)
        assert response.outputs[0].name == "x"
        delete(parts.registry, record)  # as the watch delivers an unregistration
    await parts.cache.settle()


def _per_model_state(parts: Parts) -> dict[str, int]:
    runner = parts.dataplane.runner
    return {
        "stats": len(parts.dataplane.stats),
        "cache entries": len(parts.cache.entries()),
        "cache usage": len(parts.cache.usage),
        "runner models": runner.tracked(),
        "batcher traffic": len(runner.batcher._traffic),
        "view last removed": len(parts.view.last_removed),
        "view copy rates": len(parts.view.copy_rates),
        "view pending loads": len(parts.view.pending._by_model),
        "registry misses": len(parts.registry._misses._absent),
        "registry models": len(parts.registry.models),
    }


async def test_unregistered_models_leave_nothing_behind():
    loader = CountingLoader()
    parts = build("me", capacity=1 << 30, loader=loader)
    try:
        await _cycles(parts, 0, 2_000)
        assert loader.total == 2_000
        assert _per_model_state(parts) == dict.fromkeys(_per_model_state(parts), 0)
    finally:
        await parts.close()


async def test_memory_is_flat_over_ten_thousand_cycles():
    parts = build("me", capacity=1 << 30, loader=CountingLoader())
    try:
        await _cycles(parts, 0, 1_000)  # warm up: caches, pools, interned strings
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await _cycles(parts, 1_000, 10_000)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        # Each cycle that kept anything (a stats row, a usage row) kept > 100 bytes.
        assert grown < 200_000, f"{grown} bytes kept over 10,000 cycles"
    finally:
        await parts.close()


async def test_per_model_metrics_are_kept_while_registered_and_dropped_after():
    from modelmesh.metrics import Metrics

    parts = build("me")
    try:
        parts.dataplane.metrics = metrics = Metrics(per_model=True)
        kept = ModelRecord("kept", "identity", "kept.json")
        put(parts.registry, kept)
        await parts.dataplane.infer(_request("kept"), "kept")
        await _cycles(parts, 0, 200)

        def count(model_id: str) -> float | None:
            return metrics.registry.get_sample_value(
                "modelmesh_model_request_milliseconds_count", {"modelid": model_id,
                                                                "code": "OK"})

        assert count("kept") == 1.0
        series = {s.labels["modelid"] for fam in metrics.registry.collect()
                  for s in fam.samples if "modelid" in s.labels}
        assert series == {"kept"}  # 200 unregistered models left no series
        assert Metrics().model_request_ms is None  # off by default
    finally:
        await parts.close()
