"""The model type forms modelmesh-serving's controller sends, as the embedded runtimes read them."""

from __future__ import annotations

import json

import pytest

from modelmesh.errors import InvalidArgument
from modelmesh.runtimes.formats import accepted, model_format, parse_type


def _key(name: str, version: str | None = None) -> str:
    model_type = {"name": name} if version is None else {"name": name, "version": version}
    return json.dumps({"storage_key": "localMinIO", "model_type": model_type,
                       "storage_params": {"bucket": "models"}})


@pytest.mark.parametrize(("model_type", "key", "expected"), [
    ("onnx", "", "onnx"),
    ("mt:onnx", "", "onnx"),
    ("mt:sklearn:1", "", "sklearn"),
    ("mt:xgboost|pv:grpc-v2", "", "xgboost"),
    ("mt:lightgbm:3|pv:v2", "", "lightgbm"),
    ("mt:pytorch", "", "torchscript"),
    ("mt:torchscript", "", "torchscript"),
    ("mt:SKLearn", "", "sklearn"),
    ("rt:my-runtime", _key("onnx"), "onnx"),
    ("rt:mlserver-1.x", _key("sklearn", "1"), "sklearn"),
    ("mt:onnx", _key("sklearn"), "onnx"),  # the label wins over the key
])
def test_the_format_is_found_in_the_type_or_the_key(model_type, key, expected):
    assert model_format(model_type, key) == expected


@pytest.mark.parametrize(("model_type", "key", "message"), [
    ("mt:tensorflow", "", "unknown model type 'tensorflow'"),
    ("rt:triton-2.x", "", "names no model format"),
    ("rt:triton-2.x", "{not json", "names no model format"),
    ("nosuch", "", "unknown model type 'nosuch'"),
])
def test_a_format_the_mesh_cannot_run_is_refused(model_type, key, message):
    with pytest.raises(InvalidArgument, match=message):
        model_format(model_type, key)


def test_labels_split_into_their_parts():
    label = parse_type("mt:onnx:1.2|pv:grpc-v2")
    assert (label.format, label.version, label.protocol, label.runtime, label.plain) == \
        ("onnx", "1.2", "grpc-v2", "", "")
    assert parse_type("rt:ovms").runtime == "ovms"


@pytest.mark.parametrize(("model_type", "key", "allowed", "ok"), [
    ("onnx", "", frozenset(), True),
    ("onnx", "", frozenset({"onnx"}), True),
    ("mt:onnx", "", frozenset({"onnx"}), True),
    ("mt:onnx", "", frozenset({"mt:onnx"}), True),
    ("mt:pytorch", "", frozenset({"torchscript"}), True),
    ("rt:x", _key("sklearn"), frozenset({"sklearn"}), True),
    ("sklearn", "", frozenset({"onnx"}), False),
    ("sum-runtime-format", "", frozenset({"onnx"}), False),
    ("sum-runtime-format", "", frozenset({"sum-runtime-format"}), True),
])
def test_accepted_types_match_the_type_or_its_format(model_type, key, allowed, ok):
    assert accepted(model_type, key, allowed) is ok
