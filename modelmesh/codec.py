"""V2 (KServe Open Inference Protocol) tensors <-> numpy, in one place.

Requests arrive as ``inference.ModelInferRequest`` messages (the classes that
ship in ``tritonclient.grpc.service_pb2``); runtimes see ``Tensor`` objects
holding numpy arrays. This module translates between the two and validates
everything a client can get wrong, raising ``InvalidArgument`` with a message
that names the tensor and says what is wrong.

Wire rules followed (those of the V2 protocol and of Triton):

- Tensor data comes either as typed ``contents`` or as ``raw_input_contents``
  (one entry per input, in input order), never both in one request.
- Raw data is little-endian, row-major. BYTES elements are each a 4-byte
  little-endian length followed by that many bytes.
- Typed contents: BOOL in ``bool_contents``; INT8/INT16/INT32 in
  ``int_contents``; INT64 in ``int64_contents``; UINT8/UINT16/UINT32 in
  ``uint_contents``; UINT64 in ``uint64_contents``; FP32 in ``fp32_contents``;
  FP64 in ``fp64_contents``; BYTES in ``bytes_contents``. FP16 and BF16 have
  no typed field and must be sent raw.
- BF16 is decoded to float32 (widening is exact); numpy has no bfloat16.
  On encode, a BF16 tensor's floats are rounded to nearest-even bfloat16,
  which returns decoded values bit for bit. ``ml_dtypes.bfloat16`` arrays are
  also accepted on encode.
- Responses always carry data in ``raw_output_contents``, as Triton does.

The hot path is raw numeric data: it is decoded with ``np.frombuffer`` (no
copy; the resulting arrays are read-only views of the request's bytes) and
encoded with one ``tobytes`` per tensor. Only BYTES tensors loop in Python.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from modelmesh.errors import InvalidArgument
from modelmesh.tensor import ParamValue, Tensor

if TYPE_CHECKING:  # the messages are only annotated: importing tritonclient.grpc is slow
    from tritonclient.grpc import service_pb2

__all__ = [
    "DATATYPES",
    "DatatypeInfo",
    "MAX_DIMS",
    "SHOWN_CHARS",
    "check_raw_tensor",
    "check_shape",
    "clip",
    "datatype_of",
    "decode_inputs",
    "decode_outputs",
    "element_size",
    "encode_inputs",
    "encode_outputs",
    "params_to_python",
    "python_to_params",
    "to_numpy_dtype",
]


@dataclass(frozen=True, slots=True)
class DatatypeInfo:
    """One V2 datatype: its name, the numpy dtype it decodes to, its wire size."""

    name: str
    #: dtype of the decoded array (float32 for BF16, object for BYTES).
    dtype: np.dtype
    #: Bytes per element on the wire; ``None`` for BYTES (variable length).
    size: int | None
    #: Typed ``InferTensorContents`` field, or ``None`` where V2 has none.
    contents_field: str | None
    #: Little-endian dtype of the raw wire format (``None`` for BYTES).
    wire_dtype: np.dtype | None


def _info(
    name: str, dtype: Any, size: int | None, field: str | None, wire: str | None
) -> DatatypeInfo:
    return DatatypeInfo(
        name, np.dtype(dtype), size, field, np.dtype(wire) if wire is not None else None
    )


#: The V2 datatype table, by V2 name.
DATATYPES: Mapping[str, DatatypeInfo] = {
    i.name: i
    for i in (
        _info("BOOL", np.bool_, 1, "bool_contents", "|b1"),
        _info("UINT8", np.uint8, 1, "uint_contents", "|u1"),
        _info("UINT16", np.uint16, 2, "uint_contents", "<u2"),
        _info("UINT32", np.uint32, 4, "uint_contents", "<u4"),
        _info("UINT64", np.uint64, 8, "uint64_contents", "<u8"),
        _info("INT8", np.int8, 1, "int_contents", "|i1"),
        _info("INT16", np.int16, 2, "int_contents", "<i2"),
        _info("INT32", np.int32, 4, "int_contents", "<i4"),
        _info("INT64", np.int64, 8, "int64_contents", "<i8"),
        _info("FP16", np.float16, 2, None, "<f2"),
        _info("FP32", np.float32, 4, "fp32_contents", "<f4"),
        _info("FP64", np.float64, 8, "fp64_contents", "<f8"),
        _info("BF16", np.float32, 2, None, "<u2"),
        _info("BYTES", np.object_, None, "bytes_contents", None),
    )
}

_CONTENTS_FIELDS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)

_BY_DTYPE: Mapping[np.dtype, str] = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
}

#: How much of a client's text (a name, a datatype, a shape) an error message repeats.
SHOWN_CHARS = 64
#: The most dimensions a tensor may have (numpy's limit).
MAX_DIMS = 64
#: The most elements across a shape's non-zero dimensions: numpy must address them
#: at up to 8 bytes each in a signed 64-bit size, even for an empty tensor.
_MAX_ELEMENTS = (2**63 - 1) // 8

_U32 = struct.Struct("<I")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_UINT64_MAX = 2**64 - 1


# --------------------------------------------------------------------------- datatypes


def to_numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype a V2 datatype decodes to (BF16 -> float32, BYTES -> object)."""
    info = DATATYPES.get(datatype)
    if info is None:
        raise InvalidArgument(_unknown_datatype(datatype))
    return info.dtype


def element_size(datatype: str) -> int | None:
    """Wire bytes per element of a V2 datatype; ``None`` for BYTES."""
    info = DATATYPES.get(datatype)
    if info is None:
        raise InvalidArgument(_unknown_datatype(datatype))
    return info.size


def datatype_of(dtype: np.dtype | type) -> str:
    """The V2 datatype for a numpy dtype: object, str and bytes arrays are BYTES.

    ``ml_dtypes.bfloat16`` maps to BF16. Other dtypes (complex, datetime, ...)
    have no V2 datatype and raise ``ValueError``.
    """
    dt = np.dtype(dtype)
    name = _BY_DTYPE.get(dt if dt.isnative else dt.newbyteorder("="))
    if name is not None:
        return name
    if dt.kind in "OSU":
        return "BYTES"
    if dt.name == "bfloat16":
        return "BF16"
    raise ValueError(f"numpy dtype {dt} has no V2 datatype")


def _unknown_datatype(datatype: str) -> str:
    return f"unknown datatype '{clip(datatype)}'; expected one of {', '.join(DATATYPES)}"


def clip(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` (a client's name, datatype ...) as an error message may repeat it.

    At most ``limit`` characters, then '…': a message must stay far below the
    client's metadata limit (it travels in a trailer), whatever was sent.
    """
    return text if len(text) <= limit else text[:limit] + "…"


# --------------------------------------------------------------------------- parameters


def params_to_python(params: Mapping[str, Any], owner: str = "") -> dict[str, ParamValue]:
    """Turn a protobuf ``map<string, InferParameter>`` into a plain dict.

    ``owner`` (e.g. "input 'x'") names whose parameters they are in error messages.
    """
    out: dict[str, ParamValue] = {}
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        if kind is None:
            of = f" of {owner}" if owner else ""
            raise InvalidArgument(f"parameter '{clip(key)}'{of} has no value set")
        out[key] = getattr(param, kind)
    return out


def python_to_params(values: Mapping[str, Any], target: MutableMapping[str, Any]) -> None:
    """Write plain values into a protobuf ``map<string, InferParameter>``.

    bool -> bool_param, int -> int64_param (uint64_param above the int64
    range), float -> double_param, str -> string_param. numpy scalars are
    accepted. Anything else raises ``TypeError``.
    """
    for key, value in values.items():
        param = target[key]
        if isinstance(value, bool | np.bool_):
            param.bool_param = bool(value)
        elif isinstance(value, int | np.integer):
            v = int(value)
            if _INT64_MIN <= v <= _INT64_MAX:
                param.int64_param = v
            elif 0 <= v <= _UINT64_MAX:
                param.uint64_param = v
            else:
                raise TypeError(f"parameter '{key}': integer {v} does not fit in 64 bits")
        elif isinstance(value, float | np.floating):
            param.double_param = float(value)
        elif isinstance(value, str):
            param.string_param = value
        else:
            raise TypeError(
                f"parameter '{key}' has type {type(value).__name__}; "
                "expected bool, int, float or str"
            )


# --------------------------------------------------------------------------- decoding


def decode_inputs(request: service_pb2.ModelInferRequest) -> list[Tensor]:
    """Decode and validate every input of a ``ModelInferRequest``.

    Every input's datatype, shape and data size is checked before any is
    decoded, so a bad request is refused before it costs memory.
    """
    inputs = request.inputs
    raw = request.raw_input_contents
    if raw:
        if len(raw) != len(inputs):
            raise InvalidArgument(
                f"request has {len(raw)} raw_input_contents entries but {len(inputs)} "
                "inputs; send exactly one raw entry per input, in input order"
            )
        for tensor in inputs:  # HasField first: reading the eight fields costs ~10 us
            if tensor.HasField("contents") and _typed_fields(tensor.contents):
                raise InvalidArgument(
                    f"input '{clip(tensor.name)}' has typed contents but the request also "
                    "uses raw_input_contents; send every input one way, not both"
                )
    seen: set[str] = set()
    checked: list[_Checked] = []
    for i, tensor in enumerate(inputs):
        name = tensor.name
        if name in seen:
            raise InvalidArgument(f"input '{clip(name)}' appears more than once in the request")
        seen.add(name)
        checked.append(_check_tensor("input", name, tensor.datatype, tensor.shape,
                                     tensor.contents, raw[i] if raw else None))
    return [_decode_tensor(c, tensor.parameters) for c, tensor in zip(checked, inputs, strict=True)]


def decode_outputs(response: service_pb2.ModelInferResponse) -> list[Tensor]:
    """Decode a ``ModelInferResponse`` (raw or typed) into tensors; for clients and tests."""
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise InvalidArgument(
            f"response has {len(raw)} raw_output_contents entries but "
            f"{len(response.outputs)} outputs"
        )
    checked = [_check_tensor("output", t.name, t.datatype, t.shape, t.contents,
                             raw[i] if raw else None)
               for i, t in enumerate(response.outputs)]
    return [_decode_tensor(c, t.parameters)
            for c, t in zip(checked, response.outputs, strict=True)]


def _typed_fields(contents: Any) -> list[str]:
    return [f for f in _CONTENTS_FIELDS if len(getattr(contents, f))]


@dataclass(frozen=True, slots=True)
class _Checked:
    """A tensor whose datatype, shape and data size passed ``_check_tensor``."""

    kind: str
    name: str
    info: DatatypeInfo
    shape: tuple[int, ...]
    count: int
    contents: Any
    raw: bytes | None


def _check_tensor(
    kind: str,
    name: str,
    datatype: str,
    shape_field: Sequence[int],
    contents: Any,
    raw: bytes | None,
) -> _Checked:
    """Everything about a tensor that can be checked without decoding its data."""
    what = f"{kind} '{clip(name)}'"
    info = DATATYPES.get(datatype)
    if info is None:
        raise InvalidArgument(f"{what}: {_unknown_datatype(datatype)}")
    shape, count = check_shape(what, shape_field)
    if raw is not None:
        _check_raw(what, info, shape, count, raw)
    else:
        _check_typed(what, info, shape, count, contents)
    return _Checked(kind, name, info, shape, count, contents, raw)


def check_shape(what: str, shape_field: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """(shape, element count) of a tensor's shape field, or ``InvalidArgument``.

    ``what`` names the tensor in the message ("input 'x'"). Checked before the
    shape is copied: it may be millions long.
    """
    if len(shape_field) > MAX_DIMS:
        raise InvalidArgument(
            f"{what} has {len(shape_field)} dimensions; at most {MAX_DIMS} are supported"
        )
    shape = tuple(shape_field)
    if any(d < 0 for d in shape):
        raise InvalidArgument(
            f"{what} has shape {_shape_text(shape)}: dimensions must not be negative"
        )
    count = 1
    sized = 1  # product of the non-zero dimensions: what numpy must be able to address
    for d in shape:
        count *= d
        if d:
            sized *= d
            if sized > _MAX_ELEMENTS:
                raise InvalidArgument(
                    f"{what} has shape {_shape_text(shape)}: too many elements "
                    f"(more than {_MAX_ELEMENTS} across its non-zero dimensions)"
                )
    return shape, count


def check_raw_tensor(kind: str, name: str, datatype: str, shape: Sequence[int],
                     raw: bytes) -> None:
    """The checks ``decode_inputs`` makes of one raw tensor, without decoding it.

    For transports that assemble raw data themselves (REST's binary extension):
    the same messages as a gRPC request with the same tensor would get.
    """
    _check_tensor(kind, name, datatype, shape, None, raw)


def _check_raw(
    what: str, info: DatatypeInfo, shape: tuple[int, ...], count: int, raw: bytes
) -> None:
    if info.size is None:  # BYTES: every element takes its 4-byte length at least
        if 4 * count > len(raw):
            fit = len(raw) // 4
            raise InvalidArgument(
                f"{what}: malformed BYTES data: at most {fit} BYTES elements fit in "
                f"{len(raw)} bytes (each starts with a 4-byte length) but shape "
                f"{_shape_text(shape)} needs {count}; element {fit} has no room"
            )
        return
    if len(raw) != count * info.size:
        raise InvalidArgument(
            f"{what} has {len(raw)} bytes of raw data but shape {_shape_text(shape)} "
            f"x {info.name} ({info.size} bytes each) needs {count * info.size}"
        )


def _check_typed(
    what: str, info: DatatypeInfo, shape: tuple[int, ...], count: int, contents: Any
) -> None:
    present = _typed_fields(contents)
    field = info.contents_field
    if field is None:
        if count == 0 and not present:
            return
        raise InvalidArgument(
            f"{what} has datatype {info.name}, which has no typed contents field; "
            "send it in raw_input_contents"
        )
    wrong = [f for f in present if f != field]
    if wrong:
        raise InvalidArgument(
            f"{what} has datatype {info.name} but its data is in {', '.join(wrong)}; "
            f"expected {field}"
        )
    n = len(getattr(contents, field))
    if n != count:
        raise InvalidArgument(
            f"{what} has {n} elements in {field} but shape {_shape_text(shape)} needs {count}"
        )


def _decode_tensor(checked: _Checked, parameters: Mapping[str, Any]) -> Tensor:
    c = checked
    what = f"{c.kind} '{clip(c.name)}'"
    if c.raw is not None:
        data = _decode_raw(what, c.info, c.shape, c.count, c.raw)
    else:
        data = _decode_typed(what, c.info, c.shape, c.count, c.contents)
    params = params_to_python(parameters, what) if parameters else {}
    return Tensor(c.name, c.info.name, data, params)


def _decode_raw(
    what: str, info: DatatypeInfo, shape: tuple[int, ...], count: int, raw: bytes
) -> np.ndarray:
    if info.wire_dtype is None:  # BYTES
        return _object_array(_split_bytes(what, raw, count, shape), shape)
    if info.name == "BOOL":
        return np.frombuffer(raw, dtype=np.uint8).reshape(shape) != 0
    if info.name == "BF16":
        return _bf16_to_float32(np.frombuffer(raw, dtype=info.wire_dtype)).reshape(shape)
    arr = np.frombuffer(raw, dtype=info.wire_dtype)
    if not arr.dtype.isnative:  # big-endian host: swap into native order
        arr = arr.astype(info.dtype)
    return arr.reshape(shape)


def _decode_typed(
    what: str, info: DatatypeInfo, shape: tuple[int, ...], count: int, contents: Any
) -> np.ndarray:
    field = info.contents_field
    if field is None:  # no data (checked): an empty tensor
        return np.empty(shape, dtype=info.dtype)
    values = getattr(contents, field)
    if info.name == "BYTES":
        return _object_array(list(values), shape)
    if field in ("int_contents", "uint_contents") and info.dtype.itemsize < 4 and count:
        # V2 widens INT8/16 and UINT8/16 to 32 bits on the wire: values must fit.
        wide = np.fromiter(values, dtype=np.int64, count=count)
        limits = np.iinfo(info.dtype)
        if wide.min() < limits.min or wide.max() > limits.max:
            raise InvalidArgument(
                f"{what} has values outside the {info.name} range "
                f"[{limits.min}, {limits.max}]"
            )
        return wide.astype(info.dtype).reshape(shape)
    return np.fromiter(values, dtype=info.dtype, count=count).reshape(shape)


def _split_bytes(what: str, raw: bytes, count: int, shape: tuple[int, ...]) -> list[bytes]:
    """The ``count`` elements of raw BYTES data; stops at ``count`` (more is an error)."""
    items: list[bytes] = []
    offset, end = 0, len(raw)
    unpack = _U32.unpack_from
    append = items.append
    for i in range(count):
        if offset == end:
            raise InvalidArgument(
                f"{what} has {i} BYTES elements but shape {_shape_text(shape)} needs {count}"
            )
        if offset + 4 > end:
            raise InvalidArgument(
                f"{what}: malformed BYTES data: element {i} starts at byte {offset} but only "
                f"{end - offset} bytes remain for its 4-byte length prefix"
            )
        (length,) = unpack(raw, offset)
        offset += 4
        if offset + length > end:
            raise InvalidArgument(
                f"{what}: malformed BYTES data: element {i} declares {length} bytes but only "
                f"{end - offset} remain"
            )
        append(raw[offset : offset + length])
        offset += length
    if offset != end:
        raise InvalidArgument(
            f"{what} has more than {count} BYTES elements ({end - offset} bytes left after "
            f"element {count - 1}) but shape {_shape_text(shape)} needs {count}"
        )
    return items


def _object_array(items: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    arr = np.empty(len(items), dtype=np.object_)
    arr[:] = items
    return arr.reshape(shape)


def _shape_text(shape: tuple[int, ...]) -> str:
    return clip(str(list(shape)))


def _bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits, nearest-even; NaNs stay (quiet) NaNs."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


# --------------------------------------------------------------------------- encoding


def encode_outputs(
    outputs: Sequence[Tensor],
    requested: Iterable[Any] | None,
    response: service_pb2.ModelInferResponse,
) -> None:
    """Fill ``response.outputs`` and ``response.raw_output_contents`` from tensors.

    ``requested`` is the request's ``outputs`` field (or a list of names, or
    ``None``). If it names outputs, only those are returned, in the requested
    order; an unknown name raises ``InvalidArgument`` listing the available
    ones. The wire datatype is derived from each array's dtype (BF16 is kept
    when the tensor declares it over floats); a declared datatype that
    disagrees with the data is a runtime bug and raises ``ValueError``.
    """
    selected = _select_outputs(outputs, requested)
    for tensor in selected:
        datatype, payload = _encode_tensor("output", tensor)
        out = response.outputs.add()
        out.name = tensor.name
        out.datatype = datatype
        out.shape.extend(tensor.data.shape)
        if tensor.parameters:
            python_to_params(tensor.parameters, out.parameters)
        response.raw_output_contents.append(payload)


def encode_inputs(
    inputs: Sequence[Tensor], request: service_pb2.ModelInferRequest, *, raw: bool = True
) -> None:
    """Fill ``request.inputs`` (raw, or typed contents with ``raw=False``); for clients/tests.

    Typed contents cannot carry FP16 or BF16 (``InvalidArgument``).
    """
    for tensor in inputs:
        datatype = _wire_datatype("input", tensor)
        msg = request.inputs.add()
        msg.name = tensor.name
        msg.datatype = datatype
        msg.shape.extend(tensor.data.shape)
        if tensor.parameters:
            python_to_params(tensor.parameters, msg.parameters)
        if raw:
            request.raw_input_contents.append(_encode_tensor("input", tensor)[1])
            continue
        field = DATATYPES[datatype].contents_field
        if field is None:
            raise InvalidArgument(
                f"input '{clip(tensor.name)}': {datatype} has no typed contents field; use raw"
            )
        flat = tensor.data.ravel()
        if datatype == "BYTES":
            getattr(msg.contents, field).extend(_to_bytes(v) for v in flat)
        else:
            getattr(msg.contents, field).extend(flat.tolist())


def _select_outputs(outputs: Sequence[Tensor], requested: Iterable[Any] | None) -> list[Tensor]:
    names = [r if isinstance(r, str) else r.name for r in requested or ()]
    if not names:
        return list(outputs)
    by_name = {t.name: t for t in outputs}
    selected = []
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidArgument(f"output '{clip(name)}' is requested more than once")
        seen.add(name)
        tensor = by_name.get(name)
        if tensor is None:
            raise InvalidArgument(
                f"unknown requested output '{clip(name)}'; available outputs: "
                f"{', '.join(by_name) or '(none)'}"
            )
        selected.append(tensor)
    return selected


def _wire_datatype(kind: str, tensor: Tensor) -> str:
    data = tensor.data
    if tensor.datatype == "BF16" and data.dtype.kind == "f":
        return "BF16"
    derived = datatype_of(data.dtype)
    if tensor.datatype and tensor.datatype != derived:
        raise ValueError(
            f"{kind} '{tensor.name}' declares datatype {tensor.datatype} but holds "
            f"{data.dtype} data ({derived})"
        )
    return derived


def _encode_tensor(kind: str, tensor: Tensor) -> tuple[str, bytes]:
    datatype = _wire_datatype(kind, tensor)
    data = tensor.data
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in data.ravel():
            b = _to_bytes(item)
            parts.append(_U32.pack(len(b)))
            parts.append(b)
        return datatype, b"".join(parts)
    if datatype == "BF16":
        if data.dtype.name == "bfloat16":
            return datatype, np.ascontiguousarray(data).tobytes()
        return datatype, _float32_to_bf16(data).astype("<u2", copy=False).tobytes()
    wire = DATATYPES[datatype].wire_dtype
    return datatype, np.ascontiguousarray(data, dtype=wire).tobytes()


def _to_bytes(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, bytearray | memoryview):
        return bytes(item)
    return str(item).encode("utf-8")  # as tritonclient serializes non-bytes objects
