"""Requests written to hurt: they are refused cheaply, with short messages, and only ever
as ``InvalidArgument`` (codec, wire), answered without keeping the request alive and
without flooding the log (api/status), and a bad one on a stream answers alone.

The integration side (a real server's memory and latency) is in
tests/integration/test_hostile_requests.py.
"""

from __future__ import annotations

import gc
import logging
import struct
import time
import tracemalloc
import weakref
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from modelmesh import codec, wire
from modelmesh.api import status
from modelmesh.api.inference import InferenceServicer
from modelmesh.dataplane import DataPlane
from modelmesh.errors import InvalidArgument, ModelNotFound, Rejected
from modelmesh.metrics import Metrics
from tests.support.mirror import in_memory_registry

MiB = 1024 * 1024


def _ld(field: int, body: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return wire.varint(field << 3 | 2) + wire.varint(len(body)) + body


def _bytes_request(shape: list[int], raw: bytes, name: str = "x") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name=name, datatype="BYTES", shape=shape)
    req.raw_input_contents.append(raw)
    return req


def _assert_refused_cheaply(req: pb.ModelInferRequest) -> None:
    """Decoding ``req`` raises InvalidArgument having allocated little beyond its raw data.

    Reading a bytes field from a (upb) protobuf message hands out a copy, so one
    copy of the raw data is the floor; splitting BYTES data into elements costs
    a list slot (8 bytes) per element at least, several times the 4-byte prefix.
    """
    data = sum(len(r) for r in req.raw_input_contents)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument):
            codec.decode_inputs(req)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < data + 256 * 1024, (
        f"refusing a request of {data / MiB:.1f} MiB of raw data allocated {peak / MiB:.1f} MiB")


# --------------------------------------------------------------------------- codec: memory


def test_a_bytes_flood_is_refused_before_it_is_split():
    """2 MiB of 2-byte elements for a shape of one: refused at the second element."""
    req = _bytes_request([1], b"\x02\x00\x00\x00ab" * (2 * MiB // 6))
    _assert_refused_cheaply(req)


def test_a_bytes_shape_larger_than_its_data_is_refused_before_splitting():
    req = _bytes_request([2**40], b"\x00\x00\x00\x00" * (MiB // 4))
    _assert_refused_cheaply(req)


def test_every_input_is_checked_before_any_is_decoded():
    """A valid 1 MiB BYTES input followed by a bad one: nothing is decoded."""
    req = _bytes_request([MiB // 4], b"\x00\x00\x00\x00" * (MiB // 4))
    req.inputs.add(name="y", datatype="FP128", shape=[1])
    req.raw_input_contents.append(b"\x00" * 16)
    _assert_refused_cheaply(req)


def test_raw_bytes_still_decode_exactly():
    elements = [b"", b"a", b"\x00" * 300, "é".encode()]
    raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    (t,) = codec.decode_inputs(_bytes_request([2, 2], raw))
    assert t.data.shape == (2, 2) and t.data.ravel().tolist() == elements
    with pytest.raises(InvalidArgument, match="more than 3 BYTES elements"):
        codec.decode_inputs(_bytes_request([3], raw))


# --------------------------------------------------------------------------- codec: shapes


def _raw_request(datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype=datatype, shape=shape)
    req.raw_input_contents.append(raw)
    return req


@pytest.mark.parametrize("datatype", ["FP32", "BYTES", "BF16", "BOOL", "INT64", "FP16"])
@pytest.mark.parametrize("shape", [
    [0, 2**62, 2**62],  # no elements, but numpy cannot address the shape
    [0, 2**31, 2**31],
    [2**40, 0, 2**30],
    [1] * 65,  # more dimensions than numpy has
    [0] * 100_000,
])
@pytest.mark.parametrize("typed", [False, True])
def test_impossible_shapes_are_invalid_argument(datatype, shape, typed):
    if typed:
        req = pb.ModelInferRequest(model_name="m")
        req.inputs.add(name="x", datatype=datatype, shape=shape)
    else:
        req = _raw_request(datatype, shape, b"")
    with pytest.raises(InvalidArgument) as info:
        codec.decode_inputs(req)
    assert len(info.value.message) < 300


def test_the_largest_empty_shape_numpy_takes_still_decodes():
    (t,) = codec.decode_inputs(_raw_request("FP64", [0, 2**59], b""))
    assert t.data.shape == (0, 2**59)
    (t,) = codec.decode_inputs(_raw_request("UINT8", [1] * codec.MAX_DIMS, b"\x07"))
    assert t.data.ndim == codec.MAX_DIMS


_DATATYPES = [*codec.DATATYPES, "FP128", "", "bytes"]
_DIM = st.one_of(st.integers(0, 4), st.sampled_from([2**31, 2**62, 2**63 - 1]))


@st.composite
def _requests(draw) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    raw = draw(st.booleans())
    for i in range(draw(st.integers(1, 3))):
        t = req.inputs.add(name=draw(st.sampled_from(["x", "y", f"in{i}"])),
                           datatype=draw(st.sampled_from(_DATATYPES)),
                           shape=draw(st.lists(_DIM, max_size=draw(st.sampled_from([4, 70])))))
        if draw(st.booleans()):
            t.parameters["p"].string_param = "v"
        if draw(st.booleans()):
            t.parameters["empty"].SetInParent()  # no value set
        if raw:
            if draw(st.booleans()):  # well-framed BYTES elements
                items = draw(st.lists(st.binary(max_size=6), max_size=8))
                req.raw_input_contents.append(
                    b"".join(struct.pack("<I", len(b)) + b for b in items))
            else:
                req.raw_input_contents.append(draw(st.binary(max_size=64)))
        else:
            field = draw(st.sampled_from(codec._CONTENTS_FIELDS))
            n = draw(st.integers(0, 6))
            values = getattr(t.contents, field)
            if field == "bytes_contents":
                values.extend(draw(st.lists(st.binary(max_size=4), min_size=n, max_size=n)))
            elif field == "bool_contents":
                values.extend([True] * n)
            elif field in ("fp32_contents", "fp64_contents"):
                values.extend(draw(st.lists(st.floats(width=32), min_size=n, max_size=n)))
            elif field.startswith("uint"):
                values.extend(draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n)))
            else:
                values.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1),
                                            min_size=n, max_size=n)))
    if draw(st.booleans()) and raw:
        req.raw_input_contents.append(b"")  # one raw entry too many
    return req


@given(_requests())
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_decoding_any_request_fails_only_as_invalid_argument(req):
    try:
        tensors = codec.decode_inputs(req)
    except InvalidArgument as exc:
        assert len(exc.message) < 400, exc.message
        return
    for t, declared in zip(tensors, req.inputs, strict=True):
        assert t.data.shape == tuple(declared.shape)


# --------------------------------------------------------------------------- messages

LONG = "n" * 10_000


@pytest.mark.parametrize("make", [
    lambda: _raw_request("FP32", [1], b"\x00" * 3),  # tensor name, in a size error
    lambda: _raw_request(LONG, [1], b"\x00" * 4),  # datatype
    lambda: _raw_request("FP32", [-1] + [2**62] * 60, b""),  # shape
])
def test_error_messages_quote_only_a_prefix_of_client_text(make):
    req = make()
    req.inputs[0].name = LONG
    with pytest.raises(InvalidArgument) as info:
        codec.decode_inputs(req)
    assert len(info.value.message) < 400, len(info.value.message)


def test_parameter_and_output_names_are_quoted_short():
    req = _raw_request("FP32", [1], b"\x00" * 4)
    req.inputs[0].parameters[LONG].SetInParent()
    with pytest.raises(InvalidArgument) as info:
        codec.decode_inputs(req)
    assert len(info.value.message) < 300
    from modelmesh.tensor import Tensor

    outputs = [Tensor("y", "FP32", np.zeros(1, np.float32))]
    for requested in ([LONG], [LONG, LONG]):
        with pytest.raises(InvalidArgument) as info:
            codec.encode_outputs(outputs, requested, pb.ModelInferResponse())
        assert len(info.value.message) < 300


def test_clip_keeps_short_text_and_cuts_long_text():
    assert codec.clip("short") == "short"
    assert codec.clip("x" * 100) == "x" * codec.SHOWN_CHARS + "…"


def _plane() -> DataPlane:
    return DataPlane(registry=in_memory_registry(), cache=SimpleNamespace(), metrics=Metrics(),
                     executor=None, load_timeout=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "model_id", "vmodel_id", "what"), [
    (LONG, "", "", "model name"),
    ("", LONG, "", "mm-model-id"),
    ("", "", LONG, "mm-vmodel-id"),
])
async def test_over_long_names_are_invalid_argument(name, model_id, vmodel_id, what):
    with pytest.raises(InvalidArgument) as info:
        _plane().resolve(name, model_id, vmodel_id)
    assert what in info.value.message and len(info.value.message) < 300


async def test_an_unknown_vmodel_is_quoted_short():
    with pytest.raises(ModelNotFound) as info:
        _plane().resolve("", "", "v" * 500)
    assert len(info.value.message) < 150


# --------------------------------------------------------------------------- wire: floods

FLOOD = 15 * MiB
_GOOD = _ld(1, b"m") + _ld(5, _ld(1, b"x") + _ld(2, b"FP32") + _ld(3, b"\x01")) + _ld(7, b"\0" * 4)


def _nested_input_flood(field_bytes: bytes) -> bytes:
    body = _ld(1, b"x") + _ld(2, b"BYTES") + _ld(3, b"\x01")
    return _ld(1, b"m") + _ld(5, body + field_bytes * ((FLOOD - 64) // len(field_bytes)))


FLOODS = {
    "unknown top-level fields": b"\x78\x00" * (FLOOD // 2) + _GOOD,
    "empty outputs": b"\x32\x00" * (FLOOD // 2) + _GOOD,
    "empty parameters": b"\x22\x00" * (FLOOD // 2) + _GOOD,
    "empty inputs": _GOOD + b"\x2a\x00" * (FLOOD // 2),
    "empty raw entries": _GOOD + b"\x3a\x00" * (FLOOD // 2),
    "an input's parameters": _nested_input_flood(b"\x22\x00"),
    "an input's unknown fields": _nested_input_flood(b"\x78\x00"),
    "typed BYTES elements": _ld(1, b"m") + _ld(5, _ld(2, b"BYTES") + _ld(3, b"\x01") + _ld(
        5, b"\x42\x00" * (FLOOD // 2 - 64))),
    "an output's parameters": _ld(1, b"m") + _ld(6, _ld(1, b"y") + b"\x12\x00" * (FLOOD // 2)),
}


@pytest.mark.parametrize("name", list(FLOODS))
def test_field_floods_are_refused_in_milliseconds(name):
    """15 MiB of tiny fields: refused after a bounded scan, before protobuf parses them."""
    data = FLOODS[name]
    checks = ["check_request"]
    if name in ("unknown top-level fields", "empty outputs", "empty parameters"):
        checks.insert(0, "model_name")  # what the ingress reads before routing
    for check in checks:
        start = time.perf_counter()
        with pytest.raises(InvalidArgument, match="more than"):
            getattr(wire, check)(data)
        took = time.perf_counter() - start
        assert took < 0.05, f"{name}: {check} took {took * 1000:.0f} ms"


def test_a_request_with_many_inputs_is_still_accepted():
    req = pb.ModelInferRequest(model_name="m", id="i")
    for i in range(1000):
        req.inputs.add(name=f"in{i}", datatype="FP32", shape=[1, 1])
        req.raw_input_contents.append(b"\0" * 4)
        req.outputs.add(name=f"out{i}").parameters["binary_data"].bool_param = True
    req.parameters["sequence_id"].int64_param = 1
    data = req.SerializeToString()
    wire.check_request(data)
    assert wire.model_name(data) == "m" and wire.string_field(data, 3) == "i"


@given(st.text(max_size=50), st.text(max_size=50), st.integers(0, 4), st.booleans())
@settings(max_examples=200, deadline=None)
def test_check_request_accepts_what_clients_send(name, request_id, n, typed):
    req = pb.ModelInferRequest(model_name=name, id=request_id, model_version="1")
    req.parameters["k"].string_param = "v"
    for i in range(n):
        t = req.inputs.add(name=f"in{i}", datatype="BYTES" if typed else "FP32", shape=[2])
        t.parameters["p"].int64_param = i
        if typed:
            t.contents.bytes_contents.extend([b"a", b""])
        else:
            req.raw_input_contents.append(b"\0" * 8)
    req.outputs.add(name="out")
    data = req.SerializeToString()
    wire.check_request(data)
    assert wire.model_name(data) == name and wire.string_field(data, 3) == request_id


@pytest.mark.parametrize("data", [b"\x2a\x05\x0a", b"\x2a\x03\x0a\x09a", b"\x2a\x01\x80"])
def test_check_request_refuses_malformed_nesting(data):
    with pytest.raises(InvalidArgument, match="malformed request"):
        wire.check_request(data)


# --------------------------------------------------------------------------- api/status


class FakeContext:
    """The parts of grpc.aio.ServicerContext that grpc_errors and ModelStreamInfer use."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: tuple = ()

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, md):
        self.trailing = tuple(md)

    async def abort(self, code, details="", trailing_metadata=()):
        self.set_code(code)
        self.set_details(details)
        self.set_trailing_metadata(trailing_metadata)
        raise grpc.aio.AbortError()

    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return None


class Big:
    """Stands for a decoded request: what an error answer must not keep alive."""


class Servicer:
    def __init__(self, error: Exception) -> None:
        self.node = SimpleNamespace(instance_id="inst-1")
        self.error = error

    @status.grpc_errors("Probe")
    async def call(self, request, context):
        decoded = Big()  # a local of the failing frame, as a decoded request is
        self.decoded = weakref.ref(decoded)
        raise self.error


@pytest.mark.parametrize(("error", "code", "trailing"), [
    (InvalidArgument("bad tensor"), grpc.StatusCode.INVALID_ARGUMENT, (("mm-instance", "inst-1"),)),
    (Rejected("draining"), grpc.StatusCode.UNAVAILABLE,
     (("mm-instance", "inst-1"), ("mm-reject", "1"))),
    (RuntimeError("bug"), grpc.StatusCode.INTERNAL, (("mm-instance", "inst-1"),)),
])
async def test_errors_are_answered_without_abort_and_free_the_request(error, code, trailing):
    servicer, context = Servicer(error), FakeContext()
    gc.disable()  # only reference counting may free it: grpc's gc is what lags
    try:
        assert await servicer.call(b"request", context) is None
        assert servicer.decoded() is None, "the failed call's frames are still alive"
    finally:
        gc.enable()
    assert (context.code, context.trailing) == (code, trailing)
    assert context.details.endswith(str(error))


async def test_unexpected_errors_log_one_traceback_per_minute(monkeypatch, caplog):
    now = [1000.0]
    monkeypatch.setattr(status, "_limiter", status._TracebackLimiter(clock=lambda: now[0]))
    servicer = Servicer(ValueError("numpy said no"))
    with caplog.at_level(logging.INFO, logger=status.log.name):
        for _ in range(100):
            await servicer.call(b"", FakeContext())
        now[0] += 61
        await servicer.call(b"", FakeContext())
    records = [r for r in caplog.records if r.name == status.log.name]
    assert len(records) == 2 and all(r.exc_info for r in records)
    assert "99 more" in records[1].getMessage()


def test_internal_messages_are_short():
    code, message = status.status_of(ValueError("v" * 10_000))
    assert code.name == "INTERNAL" and len(message) < 300


# --------------------------------------------------------------------------- streams


class StreamRouter:
    """Answers like an instance: unknown model, a bug, or an echo of the request."""

    async def invoke(self, method, raw, model_id, info, local):
        if model_id == "missing":
            raise ModelNotFound(model_id)
        if model_id == "buggy":
            raise RuntimeError("something of ours broke")
        req = pb.ModelInferRequest.FromString(raw)
        return pb.ModelInferResponse(model_name=req.model_name, id=req.id).SerializeToString()


async def test_a_stream_answers_every_request_even_after_errors():
    plane = _plane()
    servicer = InferenceServicer(
        node=SimpleNamespace(instance_id="i"), registry=None, cache=None, dataplane=plane,
        router=StreamRouter(), lifecycle=None, view=None, metrics=Metrics())  # type: ignore[arg-type]
    names = ["good", "missing", "buggy", "x" * 600, "good"]
    sent = [pb.ModelInferRequest(model_name=n, id=str(i)).SerializeToString()
            for i, n in enumerate(names)]
    sent.insert(3, FLOODS["empty outputs"])

    async def requests():
        for raw in sent:
            yield raw

    answers = [a async for a in servicer.ModelStreamInfer(requests(), FakeContext())]
    assert len(answers) == len(sent)
    errors = [a.error_message for a in answers]
    assert [bool(e) for e in errors] == [False, True, True, True, True, False]
    assert "missing" in errors[1] and "something of ours broke" in errors[2]
    assert "more than" in errors[3] and "model name" in errors[4] and len(errors[4]) < 300
    assert [a.infer_response.id for a in answers] == ["0", "1", "2", "", "3", "4"]

