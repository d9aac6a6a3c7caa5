"""V2 REST (JSON, and Triton's binary tensor extension) and KServe V1 <-> V2 protobuf.

The REST transport translates once, here, at the edge: a request becomes the
same ``inference.ModelInferRequest`` a gRPC client would send (every input in
``raw_input_contents``), which is routed and forwarded as bytes like any gRPC
request; the ``ModelInferResponse`` that comes back becomes JSON (and binary).

Everything a client can get wrong is checked before anything is decoded, with
the gRPC codec's own checks where the data is raw (``codec.check_raw_tensor``):
datatypes, shapes, element counts against the data, ``binary_data_size``
against the bytes after the JSON header. A mistake is ``InvalidArgument``
(HTTP 400) naming the tensor and what is wrong.

JSON rules (the V2 REST protocol, as Triton and MLServer read it):

- ``data`` is a flat or nested (row-major) JSON array; BOOL as true/false,
  integers and floats as numbers, BYTES as strings (UTF-8). FP16 and BF16 have
  no JSON form on input: send them binary. On output they are JSON numbers.
- Binary: an input's ``parameters.binary_data_size`` says its data is that
  many bytes of the binary part, inputs in order; raw little-endian, BYTES
  elements each a 4-byte little-endian length and the bytes. The JSON header's
  length is the ``Inference-Header-Content-Length`` header.
- Outputs come back binary where the requested output says
  ``parameters.binary_data: true``, else where the request's
  ``parameters.binary_data_output`` is true; JSON otherwise. Those REST-only
  parameters are not passed on to the model.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from tritonclient.grpc import service_pb2 as pb

from modelmesh import codec
from modelmesh.errors import InvalidArgument

__all__ = [
    "OutputChoice",
    "encode_infer_response",
    "encode_v1_predictions",
    "json_object",
    "parse_infer_request",
    "parse_v1_predict",
]

BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"
#: The V1 protocol's tensor, as the tabular runtimes take it (``runtimes.tabular``).
V1_INPUT = "input__0"
V1_OUTPUT = "predict"

_U32 = struct.Struct("<I")
_JSON_ONLY_BINARY = ("FP16", "BF16")
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class OutputChoice:
    """Which outputs of an answer go binary (the client's ``binary_data`` choices)."""

    default: bool = False
    by_name: dict[str, bool] = field(default_factory=dict)

    def binary(self, name: str) -> bool:
        return self.by_name.get(name, self.default)


# --------------------------------------------------------------------------- requests


def _json(doc: bytes | memoryview, what: str) -> Any:
    try:
        return orjson.loads(doc)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {codec.clip(str(exc), 120)}") from None


def json_object(doc: bytes | memoryview, what: str) -> dict[str, Any]:
    """``doc`` parsed as a JSON object, or ``InvalidArgument`` naming ``what`` it is."""
    return _object(_json(doc, what), what)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, not {_kind(value)}")
    return value


def split_body(body: bytes, header_length: int | None) -> tuple[memoryview, memoryview]:
    """(JSON header, binary part) of a body, by ``Inference-Header-Content-Length``."""
    view = memoryview(body)
    if header_length is None:
        return view, view[len(body):]
    if not 0 <= header_length <= len(body):
        raise InvalidArgument(
            f"Inference-Header-Content-Length is {header_length} but the body has "
            f"{len(body)} bytes")
    return view[:header_length], view[header_length:]


def parse_infer_request(body: bytes, header_length: int | None, model_name: str,
                        model_version: str = "") -> tuple[pb.ModelInferRequest, OutputChoice]:
    """A V2 REST infer body -> (the ModelInferRequest it means, its binary-output choice)."""
    header, binary = split_body(body, header_length)
    doc = json_object(header, "the request")
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    if "id" in doc:
        request.id = _string(doc["id"], "'id'")
    params = dict(_object(doc.get("parameters") or {}, "the request's 'parameters'"))
    default = params.pop(BINARY_DATA_OUTPUT, False)
    if not isinstance(default, bool):
        raise InvalidArgument(f"parameter '{BINARY_DATA_OUTPUT}' must be true or false")
    _params_into(params, request.parameters, "the request")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument("the request needs 'inputs': an array of tensors "
                              "({\"name\", \"datatype\", \"shape\", \"data\"})")
    offset = 0
    seen: set[str] = set()
    for i, spec in enumerate(inputs):
        offset = _input_into(request, _object(spec, f"inputs[{i}]"), i, binary, offset, seen)
    if offset != len(binary):
        raise InvalidArgument(
            f"the body has {len(binary)} bytes after the JSON header but the inputs' "
            f"{BINARY_DATA_SIZE} add up to {offset}")
    choice = OutputChoice(default, _outputs_into(request, doc.get("outputs")))
    return request, choice


def _input_into(request: pb.ModelInferRequest, spec: dict[str, Any], i: int,
                binary: memoryview, offset: int, seen: set[str]) -> int:
    name = _string(spec.get("name"), f"inputs[{i}].name")
    what = f"input '{codec.clip(name)}'"
    if name in seen:
        raise InvalidArgument(f"{what} appears more than once in the request")
    seen.add(name)
    datatype = _string(spec.get("datatype"), f"{what}: 'datatype'")
    info = codec.DATATYPES.get(datatype)
    if info is None:
        codec.to_numpy_dtype(datatype)  # raises the codec's message, listing the datatypes
        raise AssertionError("unreachable")
    shape = _shape(spec.get("shape"), what)
    _, count = codec.check_shape(what, shape)
    params = dict(_object(spec.get("parameters") or {}, f"{what}: 'parameters'"))
    size = params.pop(BINARY_DATA_SIZE, None)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    _params_into(params, tensor.parameters, what)
    if size is not None:
        if "data" in spec:
            raise InvalidArgument(f"{what} has both 'data' and '{BINARY_DATA_SIZE}'; "
                                  "send its data one way")
        if type(size) is not int or size < 0:
            raise InvalidArgument(f"{what}: '{BINARY_DATA_SIZE}' must be a non-negative integer")
        if offset + size > len(binary):
            raise InvalidArgument(
                f"{what}: '{BINARY_DATA_SIZE}' is {size} but only {len(binary) - offset} bytes "
                "of binary data remain after the JSON header and the inputs before it")
        raw = bytes(binary[offset:offset + size])
        codec.check_raw_tensor("input", name, datatype, shape, raw)
        request.raw_input_contents.append(raw)
        return offset + size
    if "data" not in spec:
        raise InvalidArgument(f"{what} has no 'data' (nor '{BINARY_DATA_SIZE}' for binary data)")
    request.raw_input_contents.append(_json_data(what, info, tuple(shape), count, spec["data"]))
    return offset


def _shape(value: Any, what: str) -> list[int]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{what}: 'shape' must be an array of non-negative integers")
    if len(value) > codec.MAX_DIMS:
        raise InvalidArgument(
            f"{what} has {len(value)} dimensions; at most {codec.MAX_DIMS} are supported")
    for d in value:
        if type(d) is not int or not 0 <= d <= _INT64_MAX:
            raise InvalidArgument(f"{what}: 'shape' must be an array of non-negative "
                                  f"integers, got {codec.clip(str(value))}")
    return value


def _json_data(what: str, info: codec.DatatypeInfo, shape: tuple[int, ...], count: int,
               data: Any) -> bytes:
    """JSON ``data`` -> the tensor's raw wire bytes, checked against its shape and datatype."""
    if info.name in _JSON_ONLY_BINARY:
        raise InvalidArgument(f"{what} has datatype {info.name}, which JSON cannot carry; "
                              f"send it binary ('{BINARY_DATA_SIZE}')")
    if not isinstance(data, list):
        raise InvalidArgument(f"{what}: 'data' must be an array, not {_kind(data)}")
    needs = f"shape {codec.clip(str(list(shape)))} needs {count}"
    if info.name == "BYTES":
        items = list(_strings(what, data, count, needs))
        if len(items) != count:
            raise InvalidArgument(f"{what} has {len(items)} elements in 'data' but {needs}")
        return b"".join(part for b in items for part in (_U32.pack(len(b)), b))
    if data and not isinstance(data[0], list) and len(data) != count:  # flat: no numpy yet
        raise InvalidArgument(f"{what} has {len(data)} elements in 'data' but {needs}")
    try:  # object first: one pointer per element, whatever the values (no string widths)
        values = np.array(data, dtype=object)
    except ValueError:
        values = None
    flat = values.reshape(-1) if values is not None else None
    kinds = set(map(type, flat)) if flat is not None else {list}
    if list in kinds:
        raise InvalidArgument(f"{what}: nested 'data' is not rectangular (rows of "
                              "different lengths, or arrays mixed with values)")
    assert flat is not None and info.wire_dtype is not None
    if flat.size != count:
        raise InvalidArgument(f"{what} has {flat.size} elements in 'data' but {needs}")
    allowed = _ALLOWED[info.dtype.kind]
    if not kinds <= allowed:
        wrong = sorted({_TYPE_TEXT.get(k, k.__name__) for k in kinds - allowed})
        raise InvalidArgument(f"{what} has datatype {info.name}: its 'data' must be "
                              f"{_ALLOWED_TEXT[info.dtype.kind]}, not {', '.join(wrong)}")
    try:
        arr = flat.astype(info.dtype)
    except OverflowError:
        limits = np.iinfo(info.dtype)
        raise InvalidArgument(f"{what} has values outside the {info.name} range "
                              f"[{limits.min}, {limits.max}]") from None
    return arr.astype(info.wire_dtype, copy=False).tobytes()


#: The JSON value types each kind of datatype takes (JSON integers are floats' too).
_ALLOWED: dict[str, set[type]] = {"b": {bool}, "i": {int}, "u": {int}, "f": {int, float}}
_ALLOWED_TEXT = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers"}
_TYPE_TEXT = {bool: "booleans", int: "integers", float: "fractions", str: "strings",
              dict: "objects", type(None): "null"}


def _strings(what: str, data: list[Any], count: int, needs: str) -> Iterator[bytes]:
    """The BYTES elements of nested ``data``, as UTF-8; stops past ``count``."""
    stack: list[Iterator[Any]] = [iter(data)]
    n = 0
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > codec.MAX_DIMS:
                    raise InvalidArgument(f"{what}: 'data' is nested too deeply")
                stack.append(iter(item))
                break
            if not isinstance(item, str):
                raise InvalidArgument(f"{what} has datatype BYTES: its 'data' must be "
                                      f"strings, not {_kind(item)}")
            n += 1
            if n > count:
                raise InvalidArgument(f"{what} has more than {count} elements in 'data' "
                                      f"but {needs}")
            yield item.encode("utf-8")
        else:
            stack.pop()


def _params_into(values: dict[str, Any], target: Any, owner: str) -> None:
    try:
        codec.python_to_params(values, target)
    except TypeError as exc:
        raise InvalidArgument(f"{owner}: {exc}") from None


def _outputs_into(request: pb.ModelInferRequest, outputs: Any) -> dict[str, bool]:
    if outputs is None:
        return {}
    if not isinstance(outputs, list):
        raise InvalidArgument("'outputs' must be an array of {\"name\", \"parameters\"}")
    binary: dict[str, bool] = {}
    for i, spec in enumerate(outputs):
        spec = _object(spec, f"outputs[{i}]")
        name = _string(spec.get("name"), f"outputs[{i}].name")
        what = f"requested output '{codec.clip(name)}'"
        params = dict(_object(spec.get("parameters") or {}, f"{what}: 'parameters'"))
        choice = params.pop(BINARY_DATA, None)
        if choice is not None:
            if not isinstance(choice, bool):
                raise InvalidArgument(f"{what}: '{BINARY_DATA}' must be true or false")
            binary[name] = choice
        out = request.outputs.add(name=name)
        _params_into(params, out.parameters, what)
    return binary


# --------------------------------------------------------------------------- responses


def encode_infer_response(raw: bytes, choice: OutputChoice) -> tuple[bytes, int | None]:
    """A serialized ModelInferResponse -> (REST body, JSON header length when binary follows)."""
    response = pb.ModelInferResponse.FromString(raw)
    if response.outputs and not response.raw_output_contents:  # typed (a runtime server's)
        tensors = codec.decode_outputs(response)
        response = pb.ModelInferResponse(model_name=response.model_name,
                                         model_version=response.model_version,
                                         id=response.id, parameters=response.parameters)
        codec.encode_outputs(tensors, None, response)
    doc: dict[str, Any] = {"model_name": response.model_name,
                           "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = codec.params_to_python(response.parameters)
    decoded = None
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for i, out in enumerate(response.outputs):
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype,
                                 "shape": list(out.shape)}
        params = codec.params_to_python(out.parameters) if out.parameters else {}
        if choice.binary(out.name):
            payload = response.raw_output_contents[i]
            params[BINARY_DATA_SIZE] = len(payload)
            chunks.append(payload)
        else:
            if decoded is None:
                decoded = codec.decode_outputs(response)
            entry["data"] = _json_values(decoded[i].data)
        if params:
            entry["parameters"] = params
        outputs.append(entry)
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join((header, *chunks)), len(header)


def _json_values(data: np.ndarray) -> Any:
    """A decoded tensor as a flat JSON-ready array (numpy arrays go to orjson as they are)."""
    flat = data.reshape(-1)
    if flat.dtype == np.object_:
        return [b.decode("utf-8", errors="replace") if isinstance(b, bytes) else str(b)
                for b in flat]
    return np.ascontiguousarray(flat)


# --------------------------------------------------------------------------- KServe V1


def parse_v1_predict(body: bytes, model_name: str) -> pb.ModelInferRequest:
    """``{"instances": [[f, ...], ...]}`` (or ``"inputs"``) -> one FP64 ``[N, F]`` input."""
    doc = json_object(body, "the request")
    key = "instances" if "instances" in doc else "inputs"
    rows = doc.get(key)
    if not isinstance(rows, list) or not rows:
        raise InvalidArgument("a V1 predict request needs 'instances': a non-empty array of "
                              "rows, each an array of feature values")
    try:
        arr = np.array(rows, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise InvalidArgument(f"'{key}' must be rows of numbers, all of one length") from None
    if arr.ndim != 2:
        raise InvalidArgument(f"'{key}' must be an array of rows (each an array of feature "
                              f"values); got {arr.ndim} dimension(s)")
    request = pb.ModelInferRequest(model_name=model_name)
    request.inputs.add(name=V1_INPUT, datatype="FP64", shape=list(arr.shape))
    request.raw_input_contents.append(arr.astype("<f8", copy=False).tobytes())
    return request


def encode_v1_predictions(raw: bytes) -> bytes:
    """A ModelInferResponse -> ``{"predictions": [...]}`` (the ``predict`` output, else the
    first), one prediction per row."""
    tensors = codec.decode_outputs(pb.ModelInferResponse.FromString(raw))
    if not tensors:
        return orjson.dumps({"predictions": []})
    tensor = next((t for t in tensors if t.name == V1_OUTPUT), tensors[0])
    data = tensor.data
    if data.dtype == np.object_:
        values: Any = np.vectorize(
            lambda b: b.decode("utf-8", errors="replace") if isinstance(b, bytes) else str(b),
            otypes=[object])(data).tolist() if data.size else []
    else:
        values = data.tolist()
    return orjson.dumps({"predictions": values})
