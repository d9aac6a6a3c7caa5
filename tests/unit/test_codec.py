"""V2 tensor codec: every datatype both ways, every validation error.

Requests are built with the real ``tritonclient`` (the same code path its
``infer`` uses) and responses read back with its ``InferResult``, so the codec
is checked against the client, not only against itself.
"""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult, service_pb2
from tritonclient.grpc._utils import _get_inference_request

from modelmesh import codec
from modelmesh.codec import (
    DATATYPES,
    datatype_of,
    decode_inputs,
    decode_outputs,
    element_size,
    encode_inputs,
    encode_outputs,
    params_to_python,
    python_to_params,
    to_numpy_dtype,
)
from modelmesh.errors import InvalidArgument
from modelmesh.tensor import Tensor

NUMERIC = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
TYPED = [d for d in DATATYPES if DATATYPES[d].contents_field is not None]


def sample(datatype: str) -> np.ndarray:
    """A [2, 3] array with each datatype's extremes (and NaN/inf for floats)."""
    if datatype == "BYTES":
        return np.array(
            [[b"", b"a", b"\x00\xff"], ["h\u00e9".encode(), b"x" * 300, b"z"]], dtype=object
        )
    if datatype == "BF16":
        return np.array([[0.0, -1.5, 3.0e38], [np.inf, -np.inf, 1e-40]], dtype=np.float32)
    dt = np.dtype(NUMERIC[datatype])
    if dt.kind == "b":
        return np.array([[True, False, True], [False, False, True]])
    if dt.kind == "f":
        info = np.finfo(dt)
        return np.array([[0.0, -0.0, info.max], [info.min, np.inf, info.tiny]], dtype=dt)
    info = np.iinfo(dt)
    return np.array([[0, 1, info.max], [info.min, info.max - 1, 7]], dtype=dt)


def client_request(
    arrays: dict[str, tuple[str, np.ndarray]],
    outputs: list[str] | None = None,
    parameters: dict | None = None,
) -> service_pb2.ModelInferRequest:
    """A request exactly as tritonclient 2.73 builds it for ``infer`` (raw contents)."""
    inputs = []
    for name, (datatype, array) in arrays.items():
        if datatype == "BF16" and array.dtype != ml_dtypes.bfloat16:
            array = array.astype(ml_dtypes.bfloat16)
        inp = InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    requested = [InferRequestedOutput(n) for n in outputs] if outputs is not None else None
    return _get_inference_request(
        "m", inputs, "", "", requested, 0, False, False, 0, None, parameters
    )


def bits(a: np.ndarray) -> np.ndarray:
    """Compare floats bit for bit (NaN == NaN, -0.0 != 0.0)."""
    a = np.ascontiguousarray(a)
    if a.dtype.kind == "f":
        return a.view(f"u{a.dtype.itemsize}")
    return a


def roundtrip_response(tensors: list[Tensor], requested=None) -> InferResult:
    response = service_pb2.ModelInferResponse()
    encode_outputs(tensors, requested, response)
    return InferResult(response)


# --------------------------------------------------------------------------- datatypes


def test_datatype_table_covers_v2():
    assert set(DATATYPES) == set(NUMERIC) | {"BYTES", "BF16"}
    for name, np_type in NUMERIC.items():
        assert to_numpy_dtype(name) == np.dtype(np_type)
        assert element_size(name) == np.dtype(np_type).itemsize
        assert datatype_of(np.dtype(np_type)) == name
    assert to_numpy_dtype("BF16") == np.float32 and element_size("BF16") == 2
    assert to_numpy_dtype("BYTES") == np.dtype(object) and element_size("BYTES") is None


@pytest.mark.parametrize("dtype", [object, "S3", "U3"])
def test_datatype_of_strings_is_bytes(dtype):
    assert datatype_of(np.dtype(dtype)) == "BYTES"


def test_datatype_of_big_endian_and_bfloat16():
    assert datatype_of(np.dtype(">f4")) == "FP32"
    assert datatype_of(np.dtype(ml_dtypes.bfloat16)) == "BF16"


def test_datatype_of_unsupported_dtype():
    with pytest.raises(ValueError, match="complex128"):
        datatype_of(np.dtype(np.complex128))


def test_unknown_datatype_in_helpers():
    with pytest.raises(InvalidArgument, match="unknown datatype 'FP8'"):
        to_numpy_dtype("FP8")
    with pytest.raises(InvalidArgument, match="unknown datatype"):
        element_size("fp32")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_raw_roundtrip_every_datatype(datatype):
    array = sample(datatype)
    request = client_request({"x": (datatype, array)})
    [tensor] = decode_inputs(request)
    assert tensor.name == "x" and tensor.datatype == datatype and tensor.shape == (2, 3)
    assert tensor.data.dtype == to_numpy_dtype(datatype)
    if datatype == "BF16":
        np.testing.assert_array_equal(
            bits(tensor.data), bits(array.astype(ml_dtypes.bfloat16).astype(np.float32))
        )
    elif datatype == "BYTES":
        assert tensor.data.tolist() == array.tolist()
    else:
        np.testing.assert_array_equal(bits(tensor.data), bits(array))

    result = roundtrip_response([tensor])
    back = result.as_numpy("x")
    out = result.get_output("x")
    assert out.datatype == datatype and list(out.shape) == [2, 3]
    if datatype == "BF16":
        np.testing.assert_array_equal(bits(back.astype(np.float32)), bits(tensor.data))
    elif datatype == "BYTES":
        assert back.tolist() == array.tolist()
    else:
        np.testing.assert_array_equal(bits(back), bits(array))


@pytest.mark.parametrize("datatype", TYPED)
def test_typed_roundtrip_every_datatype(datatype):
    array = sample(datatype)
    request = service_pb2.ModelInferRequest()
    encode_inputs([Tensor("x", datatype, array)], request, raw=False)
    assert not request.raw_input_contents
    field = DATATYPES[datatype].contents_field
    assert len(getattr(request.inputs[0].contents, field)) == array.size
    [tensor] = decode_inputs(request)
    assert tensor.datatype == datatype and tensor.data.dtype == to_numpy_dtype(datatype)
    if datatype == "BYTES":
        assert tensor.data.tolist() == array.tolist()
    else:
        np.testing.assert_array_equal(bits(tensor.data), bits(array))


def test_typed_contents_built_by_hand():
    """Typed fields as a non-Python client fills them (INT8 widened into int_contents)."""
    request = service_pb2.ModelInferRequest()
    a = request.inputs.add(name="a", datatype="INT8", shape=[3])
    a.contents.int_contents.extend([-128, 0, 127])
    b = request.inputs.add(name="b", datatype="UINT16", shape=[1, 2])
    b.contents.uint_contents.extend([0, 65535])
    c = request.inputs.add(name="c", datatype="BYTES", shape=[2])
    c.contents.bytes_contents.extend([b"hi", b""])
    d = request.inputs.add(name="d", datatype="FP64", shape=[])
    d.contents.fp64_contents.append(2.5)
    ta, tb, tc, td = decode_inputs(request)
    assert ta.data.dtype == np.int8 and ta.data.tolist() == [-128, 0, 127]
    assert tb.data.dtype == np.uint16 and tb.data.tolist() == [[0, 65535]]
    assert tc.data.tolist() == [b"hi", b""]
    assert td.shape == () and td.data.item() == 2.5


@settings(max_examples=40, deadline=None)
@given(
    datatype=st.sampled_from(list(NUMERIC)),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    data=st.data(),
)
def test_raw_roundtrip_random_arrays(datatype, shape, data):
    array = data.draw(hnp.arrays(np.dtype(NUMERIC[datatype]), shape))
    [tensor] = decode_inputs(client_request({"t": (datatype, array)}))
    assert tensor.shape == array.shape
    np.testing.assert_array_equal(bits(tensor.data), bits(array))
    back = roundtrip_response([tensor]).as_numpy("t")
    np.testing.assert_array_equal(bits(back), bits(array))
    # And through our own request encoder and response decoder.
    request = service_pb2.ModelInferRequest()
    encode_inputs([tensor], request)
    assert (
        request.raw_input_contents[0]
        == client_request({"t": (datatype, array)}).raw_input_contents[0]
    )
    response = service_pb2.ModelInferResponse()
    encode_outputs([tensor], None, response)
    [decoded] = decode_outputs(response)
    np.testing.assert_array_equal(bits(decoded.data), bits(array))


@settings(max_examples=40, deadline=None)
@given(
    datatype=st.sampled_from([d for d in TYPED if d != "BYTES"]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5),
    data=st.data(),
)
def test_typed_roundtrip_random_arrays(datatype, shape, data):
    array = data.draw(hnp.arrays(np.dtype(NUMERIC[datatype]), shape))
    request = service_pb2.ModelInferRequest()
    encode_inputs([Tensor("t", datatype, array)], request, raw=False)
    [tensor] = decode_inputs(request)
    np.testing.assert_array_equal(bits(tensor.data), bits(array))


@settings(max_examples=40, deadline=None)
@given(items=st.lists(st.binary(max_size=40), max_size=12))
def test_bytes_roundtrip_random(items):
    array = np.empty(len(items), dtype=object)
    array[:] = items
    [tensor] = decode_inputs(client_request({"s": ("BYTES", array)}))
    assert tensor.data.tolist() == items
    assert roundtrip_response([tensor]).as_numpy("s").tolist() == items


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 20), elements=st.floats(width=32)))
def test_bf16_encode_rounds_like_ml_dtypes(values):
    response = service_pb2.ModelInferResponse()
    encode_outputs([Tensor("b", "BF16", values)], None, response)
    got = np.frombuffer(response.raw_output_contents[0], dtype="<u2")
    want = values.astype(ml_dtypes.bfloat16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(got[~nan], want[~nan].view(np.uint16))
    assert np.isnan(InferResult(response).as_numpy("b").astype(np.float32)[nan]).all()
    # Decoding widens exactly: a second round trip changes nothing.
    [decoded] = decode_outputs(response)
    assert decoded.datatype == "BF16" and decoded.data.dtype == np.float32
    np.testing.assert_array_equal(bits(decoded.data[~nan]), bits(want[~nan].astype(np.float32)))


def test_bf16_ties_round_to_even():
    # 0x3F80_8000 lies halfway between bf16 0x3F80 and 0x3F81: round to the even 0x3F80;
    # 0x3F81_8000 lies halfway between 0x3F81 and 0x3F82: round to the even 0x3F82.
    values = np.array([0x3F808000, 0x3F818000, 0x3F808001], dtype=np.uint32).view(np.float32)
    response = service_pb2.ModelInferResponse()
    encode_outputs([Tensor("b", "BF16", values)], None, response)
    got = np.frombuffer(response.raw_output_contents[0], dtype="<u2").tolist()
    assert got == [0x3F80, 0x3F82, 0x3F81]


def test_bool_raw_nonzero_bytes_are_true():
    [tensor] = decode_inputs(raw_request("BOOL", [3], b"\x00\x01\x02"))
    assert tensor.data.tolist() == [False, True, True]
    response = service_pb2.ModelInferResponse()
    encode_outputs([tensor], None, response)
    assert response.raw_output_contents[0] == b"\x00\x01\x01"


def test_bfloat16_arrays_encode_directly():
    values = np.array([1.0, -2.5, 0.15625], dtype=ml_dtypes.bfloat16)
    result = roundtrip_response([Tensor("b", "BF16", values)])
    assert result.get_output("b").datatype == "BF16"
    np.testing.assert_array_equal(result.as_numpy("b"), values)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.array(["a", "h\u00e9"]), [b"a", "h\u00e9".encode()]),
        (np.array([b"a", b"bc"]), [b"a", b"bc"]),
        (np.array(["x", b"y", 3], dtype=object), [b"x", b"y", b"3"]),
    ],
)
def test_str_and_object_arrays_encode_as_bytes(array, expected):
    result = roundtrip_response([Tensor("s", "", array)])
    assert result.get_output("s").datatype == "BYTES"
    assert result.as_numpy("s").tolist() == expected


def test_empty_and_scalar_tensors():
    request = client_request(
        {"e": ("FP32", np.zeros((0, 3), np.float32)), "s": ("INT64", np.array(5, np.int64))}
    )
    empty, scalar = decode_inputs(request)
    assert empty.shape == (0, 3) and scalar.shape == () and scalar.data.item() == 5
    # FP16 has no typed field, but an empty FP16 tensor needs no data at all.
    request = service_pb2.ModelInferRequest()
    request.inputs.add(name="h", datatype="FP16", shape=[0])
    [h] = decode_inputs(request)
    assert h.shape == (0,) and h.data.dtype == np.float16


def test_raw_decode_does_not_copy():
    request = client_request({"x": ("FP32", np.arange(4, dtype=np.float32))})
    [tensor] = decode_inputs(request)
    assert not tensor.data.flags.owndata and not tensor.data.flags.writeable


def test_tensor_parameters_pass_through():
    request = client_request({"x": ("INT32", np.arange(3, dtype=np.int32))})
    request.inputs[0].parameters["unit"].string_param = "cm"
    [tensor] = decode_inputs(request)
    assert tensor.parameters == {"unit": "cm"}
    result = roundtrip_response([Tensor("y", "INT32", tensor.data, {"scale": 2, "ok": True})])
    params = params_to_python(result.get_output("y").parameters)
    assert params == {"scale": 2, "ok": True}


# --------------------------------------------------------------------------- parameters


def test_params_every_kind():
    request = service_pb2.ModelInferRequest()
    request.parameters["b"].bool_param = False
    request.parameters["i"].int64_param = -(2**63)
    request.parameters["s"].string_param = ""
    request.parameters["d"].double_param = 0.5
    request.parameters["u"].uint64_param = 2**64 - 1
    values = params_to_python(request.parameters)
    assert values == {"b": False, "i": -(2**63), "s": "", "d": 0.5, "u": 2**64 - 1}
    assert type(values["b"]) is bool and type(values["d"]) is float
    target = service_pb2.ModelInferResponse()
    python_to_params(values, target.parameters)
    kinds = {k: p.WhichOneof("parameter_choice") for k, p in target.parameters.items()}
    assert kinds == {
        "b": "bool_param",
        "i": "int64_param",
        "s": "string_param",
        "d": "double_param",
        "u": "uint64_param",
    }
    assert params_to_python(target.parameters) == values


def test_params_from_tritonclient():
    request = client_request(
        {"x": ("FP32", np.zeros(1, np.float32))},
        parameters={"temperature": 0.7, "top_k": 3, "mode": "fast", "stream": True},
    )
    assert params_to_python(request.parameters) == {
        "temperature": 0.7,
        "top_k": 3,
        "mode": "fast",
        "stream": True,
    }


def test_python_to_params_numpy_scalars_and_bool_before_int():
    target = service_pb2.ModelInferResponse().parameters
    python_to_params(
        {"a": np.int32(4), "b": np.float32(0.5), "c": np.bool_(True), "d": True}, target
    )
    assert target["a"].int64_param == 4 and target["b"].double_param == 0.5
    assert target["c"].WhichOneof("parameter_choice") == "bool_param"
    assert target["d"].WhichOneof("parameter_choice") == "bool_param"


@pytest.mark.parametrize("value", [[1], None, b"x", 2**64, -(2**63) - 1])
def test_python_to_params_rejects_unrepresentable(value):
    with pytest.raises(TypeError, match="'k'"):
        python_to_params({"k": value}, service_pb2.ModelInferResponse().parameters)


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(
            st.booleans(),
            st.integers(-(2**63), 2**64 - 1),
            st.floats(allow_nan=False),
            st.text(max_size=10),
        ),
        max_size=6,
    )
)
def test_params_roundtrip_random(values):
    target = service_pb2.ModelInferResponse().parameters
    python_to_params(values, target)
    back = params_to_python(target)
    assert back == values
    assert {k: type(v) for k, v in back.items()} == {k: type(v) for k, v in values.items()}


def test_unset_parameter_is_rejected():
    request = service_pb2.ModelInferRequest()
    request.parameters["empty"].SetInParent()
    with pytest.raises(InvalidArgument, match="parameter 'empty' has no value"):
        params_to_python(request.parameters)


# --------------------------------------------------------------------------- requested outputs


def three_outputs() -> list[Tensor]:
    return [
        Tensor("a", "FP32", np.zeros(2, np.float32)),
        Tensor("b", "INT64", np.arange(3)),
        Tensor("c", "BOOL", np.array([True])),
    ]


def test_no_requested_outputs_returns_all_in_order():
    response = service_pb2.ModelInferResponse()
    encode_outputs(three_outputs(), None, response)
    assert [o.name for o in response.outputs] == ["a", "b", "c"]
    assert len(response.raw_output_contents) == 3
    response = service_pb2.ModelInferResponse()
    encode_outputs(three_outputs(), service_pb2.ModelInferRequest().outputs, response)
    assert [o.name for o in response.outputs] == ["a", "b", "c"]


def test_requested_outputs_filter_and_order():
    request = client_request({"x": ("FP32", np.zeros(1, np.float32))}, outputs=["c", "a"])
    response = service_pb2.ModelInferResponse()
    encode_outputs(three_outputs(), request.outputs, response)
    assert [o.name for o in response.outputs] == ["c", "a"]
    assert [o.datatype for o in response.outputs] == ["BOOL", "FP32"]
    assert response.raw_output_contents[0] == b"\x01"
    assert len(response.raw_output_contents[1]) == 8
    response = service_pb2.ModelInferResponse()
    encode_outputs(three_outputs(), ["b"], response)
    assert [o.name for o in response.outputs] == ["b"]


def test_unknown_requested_output():
    with pytest.raises(InvalidArgument) as info:
        encode_outputs(three_outputs(), ["a", "nope"], service_pb2.ModelInferResponse())
    assert "'nope'" in info.value.message and "a, b, c" in info.value.message


def test_duplicate_requested_output():
    with pytest.raises(InvalidArgument, match="'a' is requested more than once"):
        encode_outputs(three_outputs(), ["a", "a"], service_pb2.ModelInferResponse())


def test_declared_datatype_must_match_data():
    with pytest.raises(ValueError, match="'y' declares datatype FP32 but holds float64"):
        encode_outputs([Tensor("y", "FP32", np.zeros(2))], None, service_pb2.ModelInferResponse())


def test_output_datatype_derived_when_undeclared():
    result = roundtrip_response([Tensor("y", "", np.arange(3, dtype=np.uint16))])
    assert result.get_output("y").datatype == "UINT16"


# --------------------------------------------------------------------------- errors


def raw_request(datatype: str, shape: list[int], raw: bytes) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest()
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def expect_invalid(request, *fragments: str) -> str:
    with pytest.raises(InvalidArgument) as info:
        decode_inputs(request)
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    return info.value.message


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "BYTES"])
def test_raw_byte_size_mismatch(datatype):
    size = element_size(datatype)
    expect_invalid(
        raw_request(datatype, [2, 3], b"\x00" * (6 * size - 1)),
        "input 'x'",
        f"{6 * size - 1} bytes",
        f"needs {6 * size}",
    )


def test_typed_element_count_mismatch():
    request = service_pb2.ModelInferRequest()
    inp = request.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    inp.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    expect_invalid(request, "input 'x'", "3 elements in fp32_contents", "needs 4")


def test_unknown_datatype():
    expect_invalid(raw_request("FLOAT", [1], b"\x00" * 4), "input 'x'", "unknown datatype 'FLOAT'")


def test_raw_contents_count_mismatch():
    request = raw_request("FP32", [1], b"\x00" * 4)
    request.inputs.add(name="y", datatype="FP32", shape=[1])
    expect_invalid(request, "1 raw_input_contents entries but 2 inputs")


def test_mixing_raw_and_typed_contents():
    request = raw_request("FP32", [1], b"\x00" * 4)
    y = request.inputs.add(name="y", datatype="FP32", shape=[1])
    y.contents.fp32_contents.append(1.0)
    request.raw_input_contents.append(b"\x00" * 4)
    expect_invalid(request, "input 'y'", "typed contents", "raw_input_contents")


def test_negative_dims():
    expect_invalid(raw_request("FP32", [-1, 2], b""), "input 'x'", "[-1, 2]", "negative")


def test_bytes_truncated_length_prefix():
    raw = struct.pack("<I", 1) + b"a" + b"\x02\x00"
    expect_invalid(raw_request("BYTES", [2], raw), "input 'x'", "malformed BYTES", "element 1")


def test_bytes_length_overruns_buffer():
    raw = struct.pack("<I", 10) + b"abc"
    expect_invalid(
        raw_request("BYTES", [1], raw), "malformed BYTES", "declares 10 bytes", "only 3 remain"
    )


def test_bytes_element_count_mismatch():
    raw = struct.pack("<I", 1) + b"a" + struct.pack("<I", 0)
    expect_invalid(raw_request("BYTES", [3], raw), "input 'x'", "2 BYTES elements", "needs 3")


def test_typed_contents_in_wrong_field():
    request = service_pb2.ModelInferRequest()
    inp = request.inputs.add(name="x", datatype="INT32", shape=[1])
    inp.contents.int64_contents.append(1)
    expect_invalid(request, "input 'x'", "int64_contents", "expected int_contents")


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_floats_have_no_typed_field(datatype):
    request = service_pb2.ModelInferRequest()
    inp = request.inputs.add(name="x", datatype=datatype, shape=[1])
    inp.contents.fp32_contents.append(1.0)
    expect_invalid(request, "input 'x'", "no typed contents field", "raw_input_contents")


def test_missing_data_for_typed_input():
    request = service_pb2.ModelInferRequest()
    request.inputs.add(name="x", datatype="INT64", shape=[2])
    expect_invalid(request, "input 'x'", "0 elements", "needs 2")


@pytest.mark.parametrize(
    ("datatype", "value"),
    [("INT8", 128), ("INT8", -129), ("INT16", 40000), ("UINT8", 256), ("UINT16", 65536)],
)
def test_narrow_typed_values_out_of_range(datatype, value):
    """V2 widens 8/16-bit ints to 32 bits on the wire; values must still fit the datatype."""
    request = service_pb2.ModelInferRequest()
    inp = request.inputs.add(name="x", datatype=datatype, shape=[1])
    getattr(inp.contents, DATATYPES[datatype].contents_field).append(value)
    expect_invalid(request, "input 'x'", f"outside the {datatype} range")


def test_duplicate_input_names():
    request = client_request({"x": ("FP32", np.zeros(1, np.float32))})
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    request.raw_input_contents.append(b"\x00" * 4)
    expect_invalid(request, "input 'x' appears more than once")


def test_typed_encoding_refuses_half_floats():
    with pytest.raises(InvalidArgument, match="FP16 has no typed contents field"):
        encode_inputs(
            [Tensor("h", "FP16", np.zeros(1, np.float16))],
            service_pb2.ModelInferRequest(),
            raw=False,
        )


def test_module_exports():
    assert set(codec.__all__) >= {
        "decode_inputs",
        "encode_outputs",
        "params_to_python",
        "python_to_params",
        "datatype_of",
        "to_numpy_dtype",
    }
