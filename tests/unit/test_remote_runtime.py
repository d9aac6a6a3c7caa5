"""Remote runtimes without a server: the raw model-name rewrite, addresses, settings,
the limits a runtime reports, and the files the repository adapter writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from google.protobuf.internal.encoder import _VarintBytes
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from modelmesh import codec
from modelmesh.errors import InvalidArgument, ModelLoadFailed
from modelmesh.headers import runtime_id_headers
from modelmesh.registry.records import ModelRecord
from modelmesh.runtimes.loader import EmbeddedLoader
from modelmesh.runtimes.remote import RepositoryRuntimeLoader, RuntimeBinding
from modelmesh.runtimes.remote.model import _forward_metadata
from modelmesh.runtimes.remote.repository import MARKER
from modelmesh.settings import RuntimeAddress, Settings, from_sources
from modelmesh.storage import ModelFiles
from modelmesh.tensor import Tensor
from modelmesh.wire import varint as _varint
from modelmesh.wire import with_string_field


def full_request(model_name: str) -> pb.ModelInferRequest:
    """A request using every kind of field: the rewrite must leave all but the name alone."""
    req = pb.ModelInferRequest(model_name=model_name, model_version="3", id="req-7")
    req.parameters["priority"].int64_param = 2
    req.parameters["tag"].string_param = "ünïcode"
    codec.encode_inputs([Tensor("x", "FP32", np.arange(12, dtype=np.float32).reshape(3, 4)),
                         Tensor("s", "BYTES", np.array([b"a", b"bc"], dtype=object))], req)
    typed = req.inputs.add(name="t", datatype="INT64", shape=[2])
    typed.contents.int64_contents.extend([5, -6])
    req.raw_input_contents.append(b"")  # one raw entry per input
    out = req.outputs.add(name="predict_proba")
    out.parameters["binary_data"].bool_param = True
    return req


def test_rewritten_name_parses_with_everything_else_intact():
    original = full_request("the-vmodel")
    raw = with_string_field(original.SerializeToString(), 1, "concrete-model-id")
    parsed = pb.ModelInferRequest.FromString(raw)
    assert parsed.model_name == "concrete-model-id"
    expected = pb.ModelInferRequest()
    expected.CopyFrom(original)
    expected.model_name = "concrete-model-id"
    assert parsed == expected
    # Nothing else moved: bytes before the appended field are the original's.
    assert raw.startswith(original.SerializeToString())


def test_rewrite_sets_a_name_the_request_did_not_have():
    original = full_request("")
    parsed = pb.ModelInferRequest.FromString(with_string_field(original.SerializeToString(), 1,
                                                               "m"))
    assert parsed.model_name == "m" and parsed.id == "req-7" and len(parsed.inputs) == 3


@settings(max_examples=200, deadline=None)
@given(before=st.text(max_size=300), after=st.text(max_size=300),
       request_id=st.text(max_size=20))
def test_rewrite_property(before, after, request_id):
    req = pb.ModelInferRequest(model_name=before, id=request_id)
    req.raw_input_contents.append(b"\x00\x01")
    parsed = pb.ModelInferRequest.FromString(with_string_field(req.SerializeToString(), 1, after))
    assert parsed.model_name == after
    assert parsed.id == request_id and list(parsed.raw_input_contents) == [b"\x00\x01"]


@given(st.integers(min_value=0, max_value=2**63))
def test_varint_matches_protobuf(n):
    assert _varint(n) == _VarintBytes(n)


def test_forwarded_metadata_carries_the_model_id_and_drops_transport_and_mesh_headers():
    md = (("mm-vmodel-id", "v"), ("mm-model-id", "old"), ("mm-hops", "1"), ("user-agent", "x"),
          ("grpc-timeout", "1S"), ("x-request-id", "r1"), ("trace-bin", b"\x00"))
    assert _forward_metadata(md, "m1") == (
        ("x-request-id", "r1"), ("trace-bin", b"\x00"), ("mm-model-id", "m1"),
        ("mm-model-id-bin", b"m1"))


@pytest.mark.parametrize(("model_id", "expected"), [
    ("plain-id", (("mm-model-id", "plain-id"), ("mm-model-id-bin", b"plain-id"))),
    ("caf\u00e9", (("mm-model-id-bin", "caf\u00e9".encode()),)),
    ("del\x7f", (("mm-model-id-bin", b"del\x7f"),)),
    ("line\u2028sep", (("mm-model-id-bin", "line\u2028sep".encode()),)),
])
def test_runtimes_always_get_the_binary_id_and_the_text_one_when_it_fits(model_id, expected):
    assert runtime_id_headers(model_id) == expected


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize("text,kind,target", [
    ("embedded", "embedded", ""),
    ("", "embedded", ""),
    ("mmesh:127.0.0.1:8085", "mmesh", "127.0.0.1:8085"),
    ("mmesh:unix:/run/mm/runtime.sock", "mmesh", "unix:/run/mm/runtime.sock"),
    ("mmesh:[::1]:9000", "mmesh", "[::1]:9000"),
    ("mlserver:localhost:8081", "mlserver", "localhost:8081"),
    ("triton:triton.svc:8001", "triton", "triton.svc:8001"),
])
def test_runtime_addresses(text, kind, target):
    address = RuntimeAddress.parse(text)
    assert (address.kind, address.target) == (kind, target)
    assert RuntimeAddress.parse(str(address)) == address


@pytest.mark.parametrize("text,fragment", [
    ("grpc:localhost:1", "expected embedded, mmesh:HOST:PORT"),
    ("localhost:8085", "expected embedded"),
    ("mmesh:localhost", "port 1-65535"),
    ("mmesh:localhost:0", "port 1-65535"),
    ("mmesh:localhost:http", "port 1-65535"),
    ("mmesh:unix:", "needs a socket path"),
    ("mlserver:unix:/tmp/s", "TCP only"),
])
def test_bad_runtime_addresses(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        RuntimeAddress.parse(text)


def test_runtime_settings_from_flags_and_environment():
    assert Settings().runtime == "embedded" and Settings().runtime_repository is None
    s = from_sources(environ={"MM_RUNTIME": "mlserver:127.0.0.1:8081",
                              "MM_RUNTIME_REPOSITORY": "/srv/repo"})
    assert s.runtime == "mlserver:127.0.0.1:8081" and s.runtime_repository == Path("/srv/repo")

    class Args:
        runtime = "mmesh:unix:/tmp/rt.sock"

    flag_wins = from_sources(Args(), environ={"MM_RUNTIME": "embedded"})  # type: ignore[arg-type]
    assert flag_wins.runtime == "mmesh:unix:/tmp/rt.sock"
    with pytest.raises(ValueError, match="MM_RUNTIME: runtime 'mmesh:nohost'"):
        from_sources(environ={"MM_RUNTIME": "mmesh:nohost"})


def test_binding_applies_the_runtime_limits_and_keeps_the_rest():
    base = Settings(capacity=100, max_concurrent_loads=2, load_timeout=120.0)
    binding = RuntimeBinding(RuntimeAddress.parse("mmesh:h:1"), loader=None,  # type: ignore[arg-type]
                             capacity_bytes=300, max_loading_concurrency=None, load_timeout_s=9.5)
    applied = binding.apply(base)
    assert (applied.capacity, applied.max_concurrent_loads, applied.load_timeout) == (300, 2, 9.5)
    assert applied.port == base.port and applied.runtime == base.runtime


# --------------------------------------------------------------------------- repository files


@pytest.fixture
def models(tmp_path) -> Path:
    root = tmp_path / "models"
    (root / "iris").mkdir(parents=True)
    (root / "iris" / "model.joblib").write_bytes(b"\x80\x05not really a pickle")
    (root / "bst.json").write_text('{"learner": {}}')
    (root / "onnx").mkdir()
    (root / "onnx" / "model.onnx").write_bytes(b"\x08\x07")
    (root / "custom").mkdir()
    (root / "custom" / "model-settings.json").write_text(
        json.dumps({"name": "x", "implementation": "my.Model"}))
    (root / "custom" / "weights.bin").write_bytes(b"w")
    return root


def repo_loader(kind: str, repository: Path, models: Path) -> RepositoryRuntimeLoader:
    # The channel connects lazily: no server is needed to write files.
    return RepositoryRuntimeLoader(RuntimeAddress.parse(f"{kind}:127.0.0.1:1"), repository,
                                   EmbeddedLoader(ModelFiles(models)))


def test_mlserver_layout(tmp_path, models):
    repo = tmp_path / "repo"
    repo.mkdir()
    loader = repo_loader("mlserver", repo, models)
    record = ModelRecord("iris-1", "sklearn", "iris")
    with loader.files.local_files(record) as source:
        loader._materialise(record, source, loader.runtime_name("iris-1"))
    settings = json.loads((repo / "iris-1" / "model-settings.json").read_text())
    assert settings == {"name": "iris-1", "implementation": "mlserver_sklearn.SKLearnModel",
                        "parameters": {"uri": "./model.joblib"}}
    linked = repo / "iris-1" / "model.joblib"
    assert linked.read_bytes() == (models / "iris" / "model.joblib").read_bytes()
    assert os.stat(linked).st_ino == os.stat(models / "iris" / "model.joblib").st_ino  # a link
    assert (repo / "iris-1" / MARKER).read_text() == "iris-1"
    # A single file works too, and the directory is replaced on a second write.
    record = ModelRecord("iris-1", "xgboost", "bst.json")
    with loader.files.local_files(record) as source:
        loader._materialise(record, source, "iris-1")
    assert sorted(p.name for p in (repo / "iris-1").iterdir()) == [
        MARKER, "bst.json", "model-settings.json"]
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no staging left


def test_mlserver_layout_keeps_the_models_own_settings_but_its_name(tmp_path, models):
    repo = tmp_path / "repo"
    repo.mkdir()
    loader = repo_loader("mlserver", repo, models)
    record = ModelRecord("any/id with spaces", "custom", "custom")
    name = loader.runtime_name(record.model_id)
    assert name.startswith("mm-") and "/" not in name
    with loader.files.local_files(record) as source:
        loader._materialise(record, source, name)
    settings = json.loads((repo / name / "model-settings.json").read_text())
    assert settings == {"name": name, "implementation": "my.Model"}
    assert (repo / name / "weights.bin").read_bytes() == b"w"
    # The source's own settings file is untouched (the copy was replaced, not edited).
    assert json.loads((models / "custom" / "model-settings.json").read_text())["name"] == "x"


def test_triton_layout(tmp_path, models):
    repo = tmp_path / "repo"
    repo.mkdir()
    loader = repo_loader("triton", repo, models)
    record = ModelRecord("o", "onnx", "onnx")
    with loader.files.local_files(record) as source:
        loader._materialise(record, source, "o")
    assert (repo / "o" / "1" / "model.onnx").read_bytes() == b"\x08\x07"
    assert 'backend: "onnxruntime"' in (repo / "o" / "config.pbtxt").read_text()


def test_unsupported_type_fails_the_load_with_the_reason(tmp_path, models):
    loader = repo_loader("mlserver", tmp_path / "repo", models)
    (tmp_path / "repo").mkdir()
    with pytest.raises(ModelLoadFailed) as info:
        loader.load(ModelRecord("o", "onnx", "onnx"))
    assert "MLServer has no runtime here for model type 'onnx'" in info.value.reason
    assert list((tmp_path / "repo").iterdir()) == []
    with pytest.raises(InvalidArgument):
        loader._mlserver_layout(ModelRecord("o", "onnx", "onnx"), models / "onnx", "o",
                                tmp_path / "out")


def test_repository_sizes_are_the_formats_prediction(tmp_path, models):
    from modelmesh.runtimes import get_runtime

    loader = repo_loader("mlserver", tmp_path / "repo", models)
    assert loader.predict_size(ModelRecord("a", "sklearn", "iris")) == \
        get_runtime("sklearn").predict_size(models / "iris")
    custom = loader.predict_size(ModelRecord("b", "custom", "custom"))
    on_disk = sum(p.stat().st_size for p in (models / "custom").iterdir())
    assert custom == int(on_disk * 2.0)


def test_runtime_names(tmp_path, models):
    loader = repo_loader("mlserver", tmp_path / "repo", models)
    assert loader.runtime_name("iris-sklearn_v1.2") == "iris-sklearn_v1.2"
    for unsafe in ("..", ".hidden", "a/b", "x" * 101, "é"):
        name = loader.runtime_name(unsafe)
        assert name.startswith("mm-") and len(name) == 35
    assert loader.runtime_name("a/b") != loader.runtime_name("a/c")
