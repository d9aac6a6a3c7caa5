"""Routing pieces that need no processes: raw request parsing, settings, eviction order."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from modelmesh.cache.local import ModelCache
from modelmesh.errors import InvalidArgument
from modelmesh.registry.records import ModelRecord
from modelmesh.routing import wire
from modelmesh.runtimes.base import LoadedModel
from modelmesh.settings import from_sources
from modelmesh.tensor import ModelSignature
from placement import get_policy


def _request(name: str, n_inputs: int = 1, raw: bool = True) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=name, model_version="1", id="abc")
    req.parameters["k"].int64_param = 7
    for i in range(n_inputs):
        t = req.inputs.add(name=f"in{i}", datatype="FP32", shape=[1, 3])
        if not raw:
            t.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    if raw:
        req.raw_input_contents.extend(
            np.arange(3, dtype=np.float32).tobytes() for _ in range(n_inputs))
    req.outputs.add(name="out")
    return req


@given(name=st.text(max_size=300), n=st.integers(0, 5), raw=st.booleans())
@settings(max_examples=200, deadline=None)
def test_model_name_matches_protobuf(name: str, n: int, raw: bool) -> None:
    data = _request(name, n, raw).SerializeToString()
    assert wire.model_name(data) == pb.ModelInferRequest.FromString(data).model_name


def test_last_model_name_wins_like_protobuf() -> None:
    data = _request("first").SerializeToString() + pb.ModelInferRequest(
        model_name="second").SerializeToString()
    assert pb.ModelInferRequest.FromString(data).model_name == "second"
    assert wire.model_name(data) == "second"


def test_empty_request_has_no_name() -> None:
    assert wire.model_name(b"") == ""


@pytest.mark.parametrize("data", [
    b"\x0a\x05ab",  # length runs past the end
    b"\x0a",  # truncated length
    b"\x0b",  # wire type 3 (groups): not in this message
    b"\x0a\x02\xff\xfe",  # model_name not UTF-8
    b"\x08" + b"\xff" * 11,  # varint too long
])
def test_malformed_requests_are_invalid_argument(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match="malformed request"):
        wire.model_name(data)


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_garbage_never_crashes(data: bytes) -> None:
    try:
        wire.model_name(data)
    except InvalidArgument:
        pass


# -- settings --------------------------------------------------------------------------


def test_placement_setting_parses_name_and_parameters() -> None:
    s = from_sources(environ={"MM_PLACEMENT": "density:settle_s=2.5,max_fill_loads=3"})
    assert s.placement == ("density", {"settle_s": 2.5, "max_fill_loads": 3})
    assert from_sources(environ={}).placement == ("density", {})
    assert from_sources(environ={"MM_PLACEMENT": "lru"}).placement == ("lru", {})


@pytest.mark.parametrize("value, message", [
    ("nosuch", "unknown placement policy"),
    ("density:bogus=1", "has no parameter"),
    ("density:settle_s", "is not PARAM=VALUE"),
    ("density:target_utilization=0", "target_utilization"),
])
def test_bad_placement_setting_names_the_problem(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_sources(environ={"MM_PLACEMENT": value})


def test_max_hops_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max-hops"):
        from_sources(environ={"MM_MAX_HOPS": "0"})


# -- eviction through the placement policy ------------------------------------------------


class _Model(LoadedModel):
    def __init__(self, size: int) -> None:
        self.size_bytes = size
        self.signature = ModelSignature((), ())

    def predict(self, inputs, parameters):
        return []


class _Loader:
    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes

    def predict_size(self, record: ModelRecord) -> int:
        return self.sizes[record.model_id]

    def load(self, record: ModelRecord) -> LoadedModel:
        return _Model(self.sizes[record.model_id])


def _rec(model_id: str) -> ModelRecord:
    return ModelRecord(model_id, "identity", f"{model_id}.json")


async def _use(cache: ModelCache, model_id: str, times: int = 1) -> None:
    for _ in range(times):
        entry = await cache.acquire(_rec(model_id))
        cache.release(entry)


async def test_density_keeps_the_busy_small_model_over_the_recent_big_one() -> None:
    sizes = {"small-hot": 100, "big": 600, "new": 400}
    cache = ModelCache(1000, _Loader(sizes), policy=get_policy("density"))
    try:
        await _use(cache, "small-hot", 20)
        await _use(cache, "big")
        await _use(cache, "new")  # needs 400: evicting "big" (used once, large) frees enough
        assert cache.get("small-hot") is not None
        assert cache.get("big") is None
        assert cache.get("new") is not None
    finally:
        await cache.close()


async def test_lru_policy_evicts_least_recently_used() -> None:
    sizes = {"a": 400, "b": 400, "c": 400}
    cache = ModelCache(1000, _Loader(sizes), policy=get_policy("lru"))
    try:
        await _use(cache, "a", 5)
        await asyncio.sleep(0.01)
        await _use(cache, "b")
        await asyncio.sleep(0.01)
        await _use(cache, "c")
        assert cache.get("a") is None and cache.get("b") is not None
    finally:
        await cache.close()


async def test_models_in_use_are_never_evicted() -> None:
    sizes = {"held": 600, "other": 600}
    cache = ModelCache(1000, _Loader(sizes), policy=get_policy("density"), space_wait=0.2)
    try:
        held = await cache.acquire(_rec("held"))
        with pytest.raises(Exception, match="no room"):
            await _use(cache, "other")
        assert cache.get("held") is not None
        cache.release(held)
        await _use(cache, "other")
        assert cache.get("held") is None
    finally:
        await cache.close()


# -- the single-copy shortcut ------------------------------------------------------------


def _router_with(copies: dict, instances: dict, cached: bool = False):
    """A Router over stand-in registry and cache objects (test doubles, no etcd)."""
    from types import SimpleNamespace

    from modelmesh.routing.router import Router

    registry = SimpleNamespace(copies=copies, instances=instances)
    cache = SimpleNamespace(policy=get_policy("density"),
                            get=lambda model_id: object() if cached else None)
    instance = SimpleNamespace(settings=from_sources(environ={}), registry=registry,
                               cache=cache, instance_id="me")
    return Router(instance)  # type: ignore[arg-type]


@pytest.mark.parametrize(("state", "where", "draining", "cached", "excluded", "expected"), [
    ("LOADED", "peer", False, False, frozenset(), "peer"),
    ("LOADING", "peer", False, False, frozenset(), None),  # waits are placement's business
    ("LOADED", "peer", True, False, frozenset(), None),  # shutting down: ask placement
    ("LOADED", "peer", False, True, frozenset(), None),  # an entry here: not this shortcut
    ("LOADED", "peer", False, False, frozenset({"peer"}), None),  # tried or suspect
    ("LOADED", "me", False, False, frozenset(), None),
])
def test_single_loaded_copy_elsewhere_is_taken_directly(state, where, draining, cached,
                                                        excluded, expected):
    from types import SimpleNamespace

    from modelmesh.registry.records import CopyRecord, CopyState

    copies = {"m": {where: CopyRecord("m", where, CopyState[state])}}
    instances = {where: SimpleNamespace(shutting_down=draining)}
    router = _router_with(copies, instances, cached)
    assert router._only_copy("m", excluded) == expected
    two = {"m": {**copies["m"], "other": CopyRecord("m", "other", CopyState.LOADED)}}
    assert _router_with(two, instances)._only_copy("m", frozenset()) is None
