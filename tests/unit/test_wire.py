"""Reading a serialized ModelInferRequest without parsing it (``modelmesh.wire``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from modelmesh import wire
from modelmesh.errors import InvalidArgument


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
