"""The REST codec (modelmesh.rest.tensors): V2 JSON / binary <-> the gRPC codec's messages."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from modelmesh import codec
from modelmesh.errors import InvalidArgument, RequestTooLarge
from modelmesh.rest import tensors
from modelmesh.rest.app import _inflate
from modelmesh.tensor import Tensor

VALUES = {
    "BOOL": np.array([True, False]),
    "UINT8": np.array([0, 255], np.uint8),
    "UINT16": np.array([0, 65535], np.uint16),
    "UINT32": np.array([0, 2**32 - 1], np.uint32),
    "UINT64": np.array([0, 2**64 - 1], np.uint64),
    "INT8": np.array([-128, 127], np.int8),
    "INT16": np.array([-(2**15), 2**15 - 1], np.int16),
    "INT32": np.array([-(2**31), 2**31 - 1], np.int32),
    "INT64": np.array([-(2**63), 2**63 - 1], np.int64),
    "FP16": np.array([-1.5, 65504], np.float16),
    "FP32": np.array([-1.5, 3.25], np.float32),
    "FP64": np.array([0.1, -1e308], np.float64),
    "BF16": np.array([1.0, -2.0], np.float32),
    "BYTES": np.array([b"", "\u00e9\u2603".encode()], dtype=object),
}


def parse(doc: dict, binary: bytes = b"") -> tuple[pb.ModelInferRequest, tensors.OutputChoice]:
    header = json.dumps(doc).encode()
    return tensors.parse_infer_request(header + binary, len(header) if binary else None, "m")


def error(doc: dict, binary: bytes = b"") -> str:
    with pytest.raises(InvalidArgument) as info:
        parse(doc, binary)
    return info.value.message


def json_data(arr: np.ndarray) -> list:
    if arr.dtype == object:
        return [b.decode() for b in arr]
    return arr.tolist()


def respond(request: pb.ModelInferRequest) -> bytes:
    """What the identity runtime answers: the inputs as outputs (through the gRPC codec)."""
    response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    codec.encode_outputs(codec.decode_inputs(request), None, response)
    return response.SerializeToString()


@pytest.mark.parametrize("datatype", sorted(VALUES))
def test_binary_round_trip_per_datatype(datatype):
    arr = VALUES[datatype]
    payload = pb.ModelInferRequest()
    codec.encode_inputs([Tensor("x", datatype, arr)], payload)
    raw = payload.raw_input_contents[0]
    request, choice = parse({"id": "i", "inputs": [
        {"name": "x", "datatype": datatype, "shape": [2],
         "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "x", "parameters": {"binary_data": True}}]}, raw)
    assert request.raw_input_contents[0] == raw and not request.outputs[0].parameters
    body, n = tensors.encode_infer_response(respond(request), choice)
    assert n is not None
    doc = json.loads(body[:n])
    assert doc["id"] == "i" and doc["outputs"][0]["parameters"] == {"binary_data_size": len(raw)}
    assert body[n:] == raw


@pytest.mark.parametrize("datatype", sorted(set(VALUES) - {"FP16", "BF16"}))
def test_json_round_trip_per_datatype(datatype):
    arr = VALUES[datatype]
    request, choice = parse({"inputs": [{"name": "x", "datatype": datatype, "shape": [1, 2],
                                         "data": [json_data(arr)]}]})
    decoded = codec.decode_inputs(request)[0]
    assert decoded.data.shape == (1, 2)
    assert decoded.data.reshape(-1).tolist() == arr.tolist()
    body, n = tensors.encode_infer_response(respond(request), choice)
    assert n is None
    out = json.loads(body)["outputs"][0]
    assert out["datatype"] == datatype and out["shape"] == [1, 2]
    assert out["data"] == json_data(arr)


def test_fp16_and_bf16_outputs_become_json_numbers():
    for datatype in ("FP16", "BF16"):
        response = pb.ModelInferResponse()
        codec.encode_outputs([Tensor("y", datatype, VALUES[datatype])], None, response)
        body, _ = tensors.encode_infer_response(response.SerializeToString(),
                                                tensors.OutputChoice())
        assert json.loads(body)["outputs"][0]["data"] == VALUES[datatype].tolist()


def test_parameters_and_requested_outputs_pass_on_without_rest_only_keys():
    request, choice = parse({
        "parameters": {"binary_data_output": True, "a": 1, "b": "s", "c": 0.5, "d": False},
        "inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1],
                    "parameters": {"p": "q"}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": False, "classification": 2}}]})
    assert codec.params_to_python(request.parameters) == {"a": 1, "b": "s", "c": 0.5, "d": False}
    assert codec.params_to_python(request.inputs[0].parameters) == {"p": "q"}
    assert codec.params_to_python(request.outputs[0].parameters) == {"classification": 2}
    assert choice.binary("y") is False and choice.binary("other") is True


@pytest.mark.parametrize(("doc", "binary", "message"), [
    ({}, b"", "needs 'inputs'"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}, b"",
     "has 2 elements in 'data' but shape [3] needs 3"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3]]}]},
     b"", "not rectangular"),
    ({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}]}, b"",
     "must be integers, not fractions"),
    ({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [200]}]}, b"",
     "outside the INT8 range"),
    ({"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}]}, b"",
     "true/false"),
    ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]}]}, b"",
     "must be strings"),
    ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a", "b"]}]}, b"",
     "more than 1 elements"),
    ({"inputs": [{"name": "x", "datatype": "FP16", "shape": [1], "data": [1.0]}]}, b"",
     "send it binary"),
    ({"inputs": [{"name": "x", "datatype": "NOPE", "shape": [1], "data": [1]}]}, b"",
     "unknown datatype 'NOPE'"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": "3", "data": [1]}]}, b"",
     "'shape' must be an array"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [True], "data": [1]}]}, b"",
     "non-negative integers"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1] * 65, "data": [1]}]}, b"",
     "at most 64"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, b"", "has no 'data'"),
    ({"inputs": [{"name": 3, "datatype": "FP32", "shape": [1], "data": [1]}]}, b"",
     "inputs[0].name must be a string"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2],
                  "parameters": {"binary_data_size": 8}}]}, b"\0" * 4, "only 4 bytes"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2],
                  "parameters": {"binary_data_size": 4}}]}, b"\0" * 4,
     "4 bytes of raw data but shape [2] x FP32 (4 bytes each) needs 8"),
    ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [2],
                  "parameters": {"binary_data_size": 4}}]}, b"\0" * 4, "malformed BYTES"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                  "parameters": {"binary_data_size": -1}}]}, b"\0", "non-negative integer"),
    ({"inputs": [], "parameters": {"binary_data_output": "yes"}}, b"", "true or false"),
    ({"inputs": [], "parameters": {"x": [1]}}, b"", "expected bool, int, float or str"),
    ({"inputs": [], "outputs": {"name": "y"}}, b"", "'outputs' must be an array"),
])
def test_malformed_requests_are_clear_400s(doc, binary, message):
    assert message in error(doc, binary)


def test_strings_cost_no_more_than_their_pointers():
    """A long string among many numbers must not make numpy allocate fixed-width strings."""
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [100_001],
                       "data": ["a" * 100_000] + [1] * 100_000}]}
    assert "must be numbers, not strings" in error(doc)


def test_body_split_by_header_length():
    with pytest.raises(InvalidArgument, match="Inference-Header-Content-Length is 9"):
        tensors.parse_infer_request(b"{}", 9, "m")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        tensors.parse_infer_request(b"{", None, "m")
    with pytest.raises(InvalidArgument, match="must be a JSON object"):
        tensors.parse_infer_request(b"[]", None, "m")


def test_v1_predict_request_and_predictions():
    request = tensors.parse_v1_predict(b'{"instances": [[1, 2], [3, 4]]}', "m")
    assert request.inputs[0].name == "input__0" and list(request.inputs[0].shape) == [2, 2]
    assert codec.decode_inputs(request)[0].data.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    response = pb.ModelInferResponse()
    codec.encode_outputs([Tensor("predict_proba", "FP64", np.ones((2, 2))),
                          Tensor("predict", "INT64", np.array([1, 0]))], None, response)
    assert json.loads(tensors.encode_v1_predictions(response.SerializeToString())) == {
        "predictions": [1, 0]}
    for bad, text in ((b'{"instances": []}', "non-empty"), (b'{"instances": [1, 2]}', "rows"),
                      (b'{"instances": [["a"]]}', "rows of numbers")):
        with pytest.raises(InvalidArgument, match=text):
            tensors.parse_v1_predict(bad, "m")


def test_inflate_is_bounded():
    data = b"x" * 5000
    assert _inflate(zlib.compress(data), 15, 5000) == data
    with pytest.raises(RequestTooLarge):
        _inflate(zlib.compress(b"\0" * (10 << 20)), 15, 1 << 20)
    with pytest.raises(InvalidArgument, match="truncated"):
        _inflate(zlib.compress(data)[:-4], 15, 10_000)
