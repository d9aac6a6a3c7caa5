"""Runtimes against their libraries, on the demo models.

Each runtime must predict what the format's own library predicts on the same
rows, report positive sizes, refuse corrupt and wrong-format files with a
reason, refuse bad inputs with ``InvalidArgument``, and give the same answers
from many threads at once.
"""

from __future__ import annotations

import json
import pickle
import re
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from tritonclient.grpc import InferInput, InferResult, service_pb2
from tritonclient.grpc._utils import _get_inference_request

from modelmesh.codec import decode_inputs, encode_outputs
from modelmesh.demo import DemoModel, demo_input, iris, write_demo_models
from modelmesh.errors import InvalidArgument, ModelLoadFailed
from modelmesh.runtimes import MODEL_TYPES, LoadedModel, Runtime, get_runtime
from modelmesh.runtimes.sklearn import memory_bytes, pickled_size
from modelmesh.tensor import Tensor

ONNX_INPUT = "input"
# The demo writes one model of each type but torchscript (tests/unit/test_torchscript.py).
DEMO_TYPES = tuple(t for t in MODEL_TYPES if t != "torchscript")


@pytest.fixture(scope="module")
def demo_written(tmp_path_factory) -> tuple[Path, dict[str, DemoModel]]:
    directory = tmp_path_factory.mktemp("demo")
    return directory, {m.model_type: m for m in write_demo_models(directory)}


@pytest.fixture(scope="module")
def demo_dir(demo_written) -> Path:
    return demo_written[0]


@pytest.fixture(scope="module")
def demo_by_type(demo_written) -> dict[str, DemoModel]:
    return demo_written[1]


@pytest.fixture(scope="module")
def loaded(demo_dir, demo_by_type) -> dict[str, LoadedModel]:
    return {t: get_runtime(t).load(demo_dir / m.path, m.model_id) for t, m in demo_by_type.items()}


def batch(n: int = 20) -> np.ndarray:
    return demo_input(n)


def run(model: LoadedModel, x: np.ndarray, name: str = "features", params=None):
    outputs = model.predict([Tensor(name, "FP32", x)], params or {})
    return {t.name: t for t in outputs}


# --------------------------------------------------------------------------- registry


def test_model_types_and_unknown_type():
    assert set(MODEL_TYPES) == {"sklearn", "xgboost", "lightgbm", "onnx", "torchscript",
                                "identity"}
    for t in MODEL_TYPES:
        assert isinstance(get_runtime(t), Runtime) and get_runtime(t).model_type == t
    with pytest.raises(InvalidArgument) as info:
        get_runtime("pytorch")
    assert "'pytorch'" in info.value.message
    assert all(t in info.value.message for t in MODEL_TYPES)


def test_import_is_lazy():
    import subprocess

    code = (
        "import sys, modelmesh.runtimes; "
        "print([m for m in ('sklearn', 'xgboost', 'lightgbm', 'onnxruntime', 'onnx', "
        "'joblib', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- demo


def test_demo_by_type_are_deterministic_and_need_no_network(tmp_path, demo_dir, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the demo tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    models = write_demo_models(tmp_path)
    assert [m.model_type for m in models] == list(DEMO_TYPES)
    assert len({m.model_id for m in models}) == len(models)
    for m in models:
        assert not m.path.is_absolute()
        assert (tmp_path / m.path).read_bytes() == (demo_dir / m.path).read_bytes(), m.model_id
    x = demo_input()
    assert x.dtype == np.float32 and x.shape == (5, 4)
    assert set(iris()[1][[0, 30, 60, 90, 120]]) == {0, 1, 2}


# --------------------------------------------------------------------------- vs the libraries


@pytest.mark.parametrize("model_type", ["sklearn", "xgboost", "lightgbm"])
def test_a_load_runs_no_probe_prediction(demo_dir, demo_by_type, model_type):
    """The probe that learns the output specs runs on the first metadata request."""
    m = demo_by_type[model_type]
    model = get_runtime(model_type).load(demo_dir / m.path, m.model_id)
    assert "signature" not in vars(model)
    calls = []
    predict = model.predict
    model.predict = lambda *a: calls.append(a) or predict(*a)  # type: ignore[method-assign]
    if model_type == "sklearn":  # the probe runs the estimator through _run
        run_ = model._run
        model._run = lambda *a: calls.append(a) or run_(*a)  # type: ignore[method-assign]
    outputs = [s.name for s in model.signature.outputs]
    assert "predict" in outputs and calls  # probed now, once
    assert model.signature is model.signature


def test_sklearn_matches_estimator(demo_dir, demo_by_type, loaded):
    import joblib

    estimator = joblib.load(demo_dir / demo_by_type["sklearn"].path)
    x = batch()
    out = run(loaded["sklearn"], x)
    np.testing.assert_array_equal(out["predict"].data, estimator.predict(x))
    np.testing.assert_array_equal(out["predict_proba"].data, estimator.predict_proba(x))
    assert out["predict"].datatype == "INT64" and out["predict_proba"].datatype == "FP64"


def test_xgboost_matches_sklearn_api_and_booster(demo_dir, demo_by_type, loaded):
    import xgboost as xgb

    path = demo_dir / demo_by_type["xgboost"].path
    clf = xgb.XGBClassifier()
    clf.load_model(path)
    x = batch()
    out = run(loaded["xgboost"], x)
    np.testing.assert_array_equal(out["predict"].data, clf.predict(x))
    np.testing.assert_allclose(out["predict_proba"].data, clf.predict_proba(x), rtol=1e-6)
    booster = xgb.Booster(model_file=str(path))
    np.testing.assert_allclose(
        out["predict_proba"].data, booster.predict(xgb.DMatrix(x)), rtol=1e-6
    )


def test_lightgbm_matches_booster(demo_dir, demo_by_type, loaded):
    import lightgbm as lgb

    booster = lgb.Booster(model_file=str(demo_dir / demo_by_type["lightgbm"].path))
    x = batch()
    out = run(loaded["lightgbm"], x)
    proba = booster.predict(x)
    np.testing.assert_array_equal(out["predict_proba"].data, proba)
    np.testing.assert_array_equal(out["predict"].data, proba.argmax(axis=1))


def test_onnx_matches_session_and_logistic_regression(demo_dir, demo_by_type, loaded):
    import onnxruntime as ort
    from sklearn.linear_model import LogisticRegression

    session = ort.InferenceSession(
        str(demo_dir / demo_by_type["onnx"].path), providers=["CPUExecutionProvider"]
    )
    x = batch()
    out = run(loaded["onnx"], x, name=ONNX_INPUT)
    label, proba = session.run(["label", "probabilities"], {ONNX_INPUT: x})
    np.testing.assert_array_equal(out["label"].data, label)
    np.testing.assert_array_equal(out["probabilities"].data, proba)
    lr = LogisticRegression(max_iter=1000).fit(*iris())
    np.testing.assert_array_equal(out["label"].data, lr.predict(x))
    np.testing.assert_allclose(out["probabilities"].data, lr.predict_proba(x), atol=1e-5)


def test_predict_outputs_computes_only_what_is_asked(demo_dir, demo_by_type, loaded,
                                                      monkeypatch):
    """Asked only for labels, a classifier skips its probabilities; the values agree.

    scikit-learn's own methods here: the fast path (test_sklearn_fast) gets a forest's
    labels from its probabilities, as the forest's predict() does."""
    x = batch()
    sk = loaded["sklearn"]  # a random forest: its predict() calls predict_proba() itself
    fast = {t.name: t.data for t in sk.predict([Tensor("features", "FP32", x)], {})}
    monkeypatch.setattr(sk, "_fast", None)
    calls = []
    original = sk.estimator.predict_proba
    monkeypatch.setattr(sk.estimator, "predict_proba",
                        lambda *a: calls.append(1) or original(*a), raising=False)
    full = {t.name: t for t in sk.predict([Tensor("features", "FP32", x)], {})}
    assert len(calls) == 2
    only = sk.predict_outputs([Tensor("features", "FP32", x)], {}, ["predict"])
    assert [t.name for t in only] == ["predict"] and len(calls) == 3
    np.testing.assert_array_equal(only[0].data, full["predict"].data)
    for name, data in fast.items():
        np.testing.assert_array_equal(data, full[name].data)
    both = sk.predict_outputs([Tensor("features", "FP32", x)], {}, ["predict_proba"])
    assert {t.name for t in both} == {"predict", "predict_proba"} and len(calls) == 5
    # An unknown name gets every output, so the codec's error can list them.
    assert len(sk.predict_outputs([Tensor("features", "FP32", x)], {}, ["nope"])) == 2

    onnx = loaded["onnx"]
    label = onnx.predict_outputs([Tensor(ONNX_INPUT, "FP32", x)], {}, ["label"])
    assert [t.name for t in label] == ["label"]
    every = {t.name: t for t in onnx.predict([Tensor(ONNX_INPUT, "FP32", x)], {})}
    np.testing.assert_array_equal(label[0].data, every["label"].data)
    swapped = onnx.predict_outputs([Tensor(ONNX_INPUT, "FP32", x)], {},
                                   ["probabilities", "label"])
    assert [t.name for t in swapped] == ["probabilities", "label"]
    assert len(onnx.predict_outputs([Tensor(ONNX_INPUT, "FP32", x)], {}, ["nope"])) == 2


@pytest.fixture(scope="module")
def iris_xy():
    x, y = iris()
    return x, y


@pytest.mark.parametrize("kind", ["binary", "regression"])
def test_xgboost_binary_and_regression(tmp_path, iris_xy, kind):
    import xgboost as xgb

    x, y = iris_xy
    if kind == "binary":
        trained = xgb.XGBClassifier(n_estimators=5, max_depth=2, n_jobs=1).fit(x, y == 1)
    else:
        trained = xgb.XGBRegressor(n_estimators=5, max_depth=2, n_jobs=1).fit(x, x[:, 0])
    path = tmp_path / "model.ubj"
    trained.save_model(path)
    model = get_runtime("xgboost").load(path, kind)
    out = run(model, x.astype(np.float32))
    np.testing.assert_array_equal(out["predict"].data, trained.predict(x.astype(np.float32)))
    if kind == "binary":
        assert out["predict"].datatype == "INT64"
        np.testing.assert_allclose(out["predict_proba"].data, trained.predict_proba(x), rtol=1e-6)
        assert [s.name for s in model.signature.outputs] == ["predict", "predict_proba"]
    else:
        assert set(out) == {"predict"} and out["predict"].datatype == "FP32"
        assert [s.shape for s in model.signature.outputs] == [(-1,)]


@pytest.mark.parametrize("kind", ["binary", "regression"])
def test_lightgbm_binary_and_regression(tmp_path, iris_xy, kind):
    import lightgbm as lgb

    x, y = iris_xy
    common = {"n_estimators": 5, "num_leaves": 4, "n_jobs": 1, "verbose": -1}
    if kind == "binary":
        trained = lgb.LGBMClassifier(**common).fit(x, (y == 1).astype(int))
    else:
        trained = lgb.LGBMRegressor(**common).fit(x, x[:, 0])
    path = tmp_path / "model.txt"
    trained.booster_.save_model(path)
    out = run(get_runtime("lightgbm").load(path, kind), x)
    np.testing.assert_array_equal(out["predict"].data, trained.predict(x))
    if kind == "binary":
        np.testing.assert_array_equal(out["predict_proba"].data, trained.predict_proba(x))
    else:
        assert set(out) == {"predict"} and out["predict"].datatype == "FP64"


def test_sklearn_regressor_and_string_labels(tmp_path, iris_xy):
    import joblib
    from sklearn.linear_model import LinearRegression
    from sklearn.tree import DecisionTreeClassifier

    x, y = iris_xy
    regressor = LinearRegression().fit(x[:, 1:], x[:, 0])
    joblib.dump(regressor, tmp_path / "reg.joblib")
    model = get_runtime("sklearn").load(tmp_path / "reg.joblib", "reg")
    out = run(model, x[:, 1:].astype(np.float32))
    assert set(out) == {"predict"} and model.signature.inputs[0].shape == (-1, 3)
    np.testing.assert_array_equal(
        out["predict"].data, regressor.predict(x[:, 1:].astype(np.float32))
    )

    names = np.array(["setosa", "versicolor", "virginica"])[y]
    tree = DecisionTreeClassifier(max_depth=2, random_state=0).fit(x, names)
    joblib.dump(tree, tmp_path / "tree.joblib", compress=3)
    model = get_runtime("sklearn").load(tmp_path / "tree.joblib", "tree")
    out = run(model, x[:3].astype(np.float32))
    assert out["predict"].datatype == "BYTES"
    assert model.signature.outputs[0].datatype == "BYTES"
    response = service_pb2.ModelInferResponse()
    encode_outputs(list(out.values()), ["predict"], response)
    assert InferResult(response).as_numpy("predict").tolist() == [b"setosa"] * 3
    # Compressed joblib files are estimated with the larger factor.
    compressed = get_runtime("sklearn").predict_size(tmp_path / "tree.joblib")
    assert compressed == int((tmp_path / "tree.joblib").stat().st_size * 5.0)


def test_identity_echoes_inputs_and_parameters(loaded):
    x = np.arange(6, dtype=np.int16).reshape(2, 3)
    names = np.array([b"a", b"b"], dtype=object)
    outputs = loaded["identity"].predict(
        [Tensor("x", "INT16", x, {"unit": "m"}), Tensor("names", "BYTES", names)],
        {"b": True, "a": 1.5, "s": "t"},
    )
    assert [t.name for t in outputs] == ["x", "names", "parameters"]
    assert outputs[0].data is x and outputs[0].parameters == {"unit": "m"}
    assert outputs[1].data is names
    params = outputs[2]
    assert params.datatype == "BYTES" and params.shape == (1,)
    assert json.loads(params.data[0]) == {"a": 1.5, "b": True, "s": "t"}


def test_identity_end_to_end_every_datatype_through_the_codec(loaded):
    """tritonclient request -> codec -> identity -> codec -> tritonclient result."""
    arrays = {
        "bool": np.array([True, False]),
        "u8": np.array([0, 255], np.uint8),
        "u64": np.array([2**64 - 1], np.uint64),
        "i8": np.array([-128, 127], np.int8),
        "i64": np.array([[-(2**63)]], np.int64),
        "f16": np.array([65504.0, -0.5], np.float16),
        "f32": np.array([np.inf, 1.5], np.float32),
        "f64": np.array([1e300], np.float64),
        "bf16": np.array([1.5, -3.0e38], ml_dtypes.bfloat16),
        "bytes": np.array([b"\x00x", b""], dtype=object),
    }
    inputs = []
    for name, array in arrays.items():
        datatype = "BF16" if name == "bf16" else None
        inp = InferInput(name, list(array.shape), datatype or _v2(array))
        inputs.append(inp.set_data_from_numpy(array))
    request = _get_inference_request(
        "echo", inputs, "", "", None, 0, False, False, 0, None, {"k": 7, "flag": False}
    )
    outputs = loaded["identity"].predict(decode_inputs(request), {"k": 7, "flag": False})
    response = service_pb2.ModelInferResponse()
    encode_outputs(outputs, None, response)
    result = InferResult(response)
    for name, array in arrays.items():
        back = result.as_numpy(name)
        assert result.get_output(name).datatype == inputs[list(arrays).index(name)].datatype()
        assert back.dtype == array.dtype and back.tolist() == array.tolist(), name
    assert json.loads(result.as_numpy("parameters")[0]) == {"flag": False, "k": 7}


def _v2(array: np.ndarray) -> str:
    from modelmesh.codec import datatype_of

    return datatype_of(array.dtype)


# --------------------------------------------------------------------------- input conventions


@pytest.mark.parametrize("model_type", ["sklearn", "xgboost", "lightgbm"])
def test_tabular_columns_and_dtypes_agree_with_matrix(loaded, model_type):
    model = loaded[model_type]
    x = batch(10)
    want = run(model, x)
    columns = [Tensor(f"f{i}", "FP32", x[:, i]) for i in range(4)]
    as_columns = {t.name: t for t in model.predict(columns, {})}
    column_vectors = [Tensor(f"f{i}", "FP32", x[:, i : i + 1]) for i in range(4)]
    as_vectors = {t.name: t for t in model.predict(column_vectors, {})}
    for name, tensor in want.items():
        np.testing.assert_array_equal(as_columns[name].data, tensor.data)
        np.testing.assert_array_equal(as_vectors[name].data, tensor.data)
    ints = (x * 10).astype(np.int32)
    from_ints = {t.name: t for t in model.predict([Tensor("x", "INT32", ints)], {})}
    from_floats = run(model, ints.astype(np.float64))
    np.testing.assert_array_equal(from_ints["predict"].data, from_floats["predict"].data)


@pytest.mark.parametrize("model_type", ["sklearn", "xgboost", "lightgbm", "onnx"])
def test_signature_is_truthful(loaded, model_type):
    model = loaded[model_type]
    [spec] = model.signature.inputs
    assert spec.shape == (-1, 4)
    name = spec.name if model_type == "onnx" else "anything"
    outputs = model.predict([Tensor(name, "FP32", batch(3))], {})
    assert [(s.name, s.datatype) for s in model.signature.outputs] == [
        (t.name, t.datatype) for t in outputs
    ]
    for s, t in zip(model.signature.outputs, outputs, strict=True):
        assert len(s.shape) == t.data.ndim
        assert all(d in (-1, got) for d, got in zip(s.shape, t.shape, strict=True))
    if model_type != "onnx":
        assert spec.name == "input__0"
        assert [s.name for s in model.signature.outputs] == ["predict", "predict_proba"]


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("model_type", ["sklearn", "xgboost", "lightgbm"])
@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ([Tensor("x", "FP32", np.zeros((2, 3), np.float32))], "expects 4 features per row, got 3"),
        ([Tensor("x", "FP32", np.zeros((2, 2, 2), np.float32))], "has shape [2, 2, 2]"),
        (
            [Tensor("x", "FP32", np.zeros(4, np.float32)), Tensor("y", "FP32", np.zeros(3))],
            "different lengths",
        ),
        ([Tensor("x", "BYTES", np.array([[b"1"] * 4], dtype=object))], "numeric features"),
        ([Tensor("x", "FP32", np.zeros((0, 4), np.float32))], "at least one row"),
        ([], "got no inputs"),
    ],
)
def test_tabular_bad_inputs(loaded, model_type, inputs, fragment):
    with pytest.raises(InvalidArgument) as info:
        loaded[model_type].predict(inputs, {})
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        (
            [Tensor("features", "FP32", np.zeros((2, 4), np.float32))],
            "missing input; unknown features",
        ),
        ([Tensor(ONNX_INPUT, "FP32", np.zeros((2, 3), np.float32))], "has shape [2, 3]"),
        ([Tensor(ONNX_INPUT, "FP32", np.zeros(4, np.float32))], "takes [-1, 4]"),
        ([Tensor(ONNX_INPUT, "BYTES", np.array([[b"a"] * 4], dtype=object))], "takes FP32"),
    ],
)
def test_onnx_bad_inputs(loaded, inputs, fragment):
    with pytest.raises(InvalidArgument) as info:
        loaded["onnx"].predict(inputs, {})
    assert fragment in info.value.message


def test_onnx_casts_same_kind_and_refuses_float_to_int(tmp_path, loaded):
    x = batch(4)
    want = run(loaded["onnx"], x, name=ONNX_INPUT)["probabilities"].data
    as_f64 = run(loaded["onnx"], x.astype(np.float64), name=ONNX_INPUT)["probabilities"].data
    np.testing.assert_array_equal(as_f64, want)

    model = get_runtime("onnx").load(_onnx_echo(tmp_path, "INT64"), "ids")
    ints = model.predict([Tensor("v", "INT32", np.array([1, 2], np.int32))], {})
    assert ints[0].datatype == "INT64" and ints[0].data.tolist() == [1, 2]
    with pytest.raises(InvalidArgument, match="takes INT64; FP32 cannot be converted"):
        model.predict([Tensor("v", "FP32", np.array([1.0], np.float32))], {})


def test_onnx_string_tensors(tmp_path):
    model = get_runtime("onnx").load(_onnx_echo(tmp_path, "STRING"), "strings")
    assert model.signature.inputs[0].datatype == "BYTES"
    [out] = model.predict([Tensor("v", "BYTES", np.array(["h\u00e9".encode(), b"x"], object))], {})
    assert out.datatype == "BYTES"
    response = service_pb2.ModelInferResponse()
    encode_outputs([out], None, response)
    assert InferResult(response).as_numpy("out").tolist() == ["h\u00e9".encode(), b"x"]
    with pytest.raises(InvalidArgument, match="not valid UTF-8"):
        model.predict([Tensor("v", "BYTES", np.array([b"\xff"], object))], {})


def _onnx_echo(directory: Path, elem: str) -> Path:
    from onnx import TensorProto, helper

    dtype = getattr(TensorProto, elem)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["v"], ["out"])],
        "echo",
        [helper.make_tensor_value_info("v", dtype, ["N"])],
        [helper.make_tensor_value_info("out", dtype, ["N"])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = directory / f"echo-{elem}.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def test_identity_signature_validation(tmp_path):
    spec = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]}
    (tmp_path / "m.json").write_text(json.dumps(spec))
    model = get_runtime("identity").load(tmp_path / "m.json", "sig")
    assert [s.name for s in model.signature.outputs] == ["x", "parameters"]
    model.predict([Tensor("x", "FP32", np.zeros((3, 2), np.float32))], {})
    cases = [
        ([Tensor("y", "FP32", np.zeros((3, 2), np.float32))], "takes inputs x; got y"),
        ([Tensor("x", "FP64", np.zeros((3, 2)))], "takes FP32"),
        ([Tensor("x", "FP32", np.zeros((3, 3), np.float32))], "has shape [3, 3]"),
    ]
    for inputs, fragment in cases:
        with pytest.raises(InvalidArgument) as info:
            model.predict(inputs, {})
        assert fragment in info.value.message
    with pytest.raises(InvalidArgument, match="'parameters' is reserved"):
        model.predict([Tensor("parameters", "FP32", np.zeros(1, np.float32))], {})


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[1, 2]", "must hold a JSON object"),
        ('{"inputs": [{"name": "x"}]}', "bad tensor spec"),
        ('{"inputs": [{"name": "x", "datatype": "F32", "shape": [1]}]}', "bad tensor spec"),
        ('{"weights": 1}', "unknown keys ['weights']"),
        ('{"inputs": [{"name": "parameters", "datatype": "FP32", "shape": [1]}]}', "reserved"),
    ],
)
def test_identity_bad_description(tmp_path, content, fragment):
    (tmp_path / "m.json").write_text(content)
    with pytest.raises(ModelLoadFailed) as info:
        get_runtime("identity").load(tmp_path / "m.json", "bad")
    assert fragment in info.value.reason


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("model_type", DEMO_TYPES)
def test_sizes_positive_and_estimate_close(demo_dir, demo_by_type, loaded, model_type):
    path = demo_dir / demo_by_type[model_type].path
    estimate = get_runtime(model_type).predict_size(path)
    measured = loaded[model_type].size_bytes
    assert estimate > 0 and measured > 0
    assert estimate / 3 <= measured <= estimate * 3, (estimate, measured)
    # Directory paths work too, and give the same answers.
    assert get_runtime(model_type).predict_size(path.parent) == estimate
    again = get_runtime(model_type).load(path.parent, "again")
    assert again.size_bytes == measured


def test_measured_sizes_follow_the_documented_method(demo_dir, demo_by_type, loaded):
    import lightgbm  # noqa: F401 - loaded by the fixture already
    import xgboost as xgb

    lgb_file = demo_dir / demo_by_type["lightgbm"].path
    assert loaded["lightgbm"].size_bytes == lgb_file.stat().st_size
    booster = xgb.Booster(model_file=str(demo_dir / demo_by_type["xgboost"].path))
    assert loaded["xgboost"].size_bytes == len(booster.save_raw("ubj"))
    onnx_file = demo_dir / demo_by_type["onnx"].path
    weights = 4 * 3 * 4 + 3 * 4  # float32 [4, 3] weights and [3] bias
    extra = loaded["onnx"].size_bytes - onnx_file.stat().st_size
    assert weights <= extra <= weights + 100  # + names and dims of the two initializers
    forest = loaded["sklearn"].estimator
    arrays = sum(t.tree_.value.nbytes + t.tree_.threshold.nbytes for t in forest.estimators_)
    assert loaded["sklearn"].size_bytes >= arrays
    sk_file = demo_dir / demo_by_type["sklearn"].path
    # A plain pickle: sized from its file, before the load and after it alike.
    assert loaded["sklearn"].size_bytes == memory_bytes(sk_file.stat().st_size)
    assert abs(memory_bytes(pickled_size(forest)) - loaded["sklearn"].size_bytes) < 2_000


def test_pickled_size_counts_arrays_without_copying_them():
    big = {"weights": np.zeros((1000, 1000)), "bias": np.ones(1000, np.float32)}
    size = pickled_size(big)
    assert 8_000_000 + 4_000 <= size <= 8_000_000 + 4_000 + 1_000
    assert abs(size - len(pickle.dumps(big, protocol=5))) < 1_000


# --------------------------------------------------------------------------- load failures


@pytest.mark.parametrize(
    ("model_type", "fragment"),
    [
        ("sklearn", "ends before its pickle does (is the file truncated?)"),
        ("xgboost", "is not a valid xgboost model (XGBoostError: "),
        ("lightgbm", "is a damaged LightGBM model: no complete tree section"),
        ("onnx", "is not a valid onnx model (InvalidProtobuf: "),
        ("identity", "is not a JSON identity model description"),
    ],
)
def test_corrupt_file(tmp_path, demo_dir, demo_by_type, model_type, fragment):
    good = (demo_dir / demo_by_type[model_type].path).read_bytes()
    bad = tmp_path / demo_by_type[model_type].path.name
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelLoadFailed) as info:
        get_runtime(model_type).load(bad, "broken")
    assert info.value.model_id == "broken"
    assert info.value.reason.startswith(f"{bad.name} ")
    assert fragment in info.value.reason, info.value.reason
    assert "Stack trace" not in info.value.reason and "\n" not in info.value.reason


@pytest.mark.parametrize("writer", ["pickle", "joblib", "joblib-compressed"])
def test_sklearn_files_of_every_writer_load_alike_and_truncated_ones_say_so(
        tmp_path, demo_dir, demo_by_type, writer):
    """Plain pickles take the C unpickler, joblib's files joblib's: same estimator."""
    import joblib

    estimator = joblib.load(demo_dir / demo_by_type["sklearn"].path)
    path = tmp_path / "model.joblib"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(estimator, protocol=5))
    else:
        joblib.dump(estimator, path, compress=3 if writer == "joblib-compressed" else 0)
    model = get_runtime("sklearn").load(path, "m")
    x = batch()
    np.testing.assert_array_equal(run(model, x)["predict_proba"].data,
                                  estimator.predict_proba(x))
    raw = path.read_bytes()
    # (zlib still inflates a stream cut short of its checksum: cut compressed ones deeper)
    for cut in (len(raw) // 2, len(raw) - (1 if writer != "joblib-compressed" else 64)):
        path.write_bytes(raw[:cut])
        with pytest.raises(ModelLoadFailed) as info:
            get_runtime("sklearn").load(path, "m")
        assert "\n" not in info.value.reason and info.value.reason.startswith("model.joblib ")


def test_damaged_lightgbm_trees_are_refused_before_lightgbm_parses_them(
    tmp_path, demo_dir, demo_by_type
):
    """LightGBM aborts the process on a malformed tree, so these must never reach it."""
    good = (demo_dir / demo_by_type["lightgbm"].path).read_bytes()
    damaged = {
        "short-array": good.replace(b"\nleaf_count=", b"\nleaf_count=1 ", 1),
        "garbage-number": good.replace(b"\nthreshold=", b"\nthreshold=x", 1),
        "wrong-tree-size": good.replace(b"tree_sizes=", b"tree_sizes=1", 1),
        "cut-parameters": good[: good.index(b"end of parameters")],
        "no-num-leaves": good.replace(b"\nnum_leaves=", b"\nnum_leafs=", 1),
        "feature-out-of-range": re.sub(
            rb"\nsplit_feature=\d ", b"\nsplit_feature=4 ", good, count=1
        ),
        # Same byte length as the original, so that tree_sizes still holds.
        "child-out-of-range": re.sub(rb"\nleft_child=\d ", b"\nleft_child=9 ", good, count=1),
    }
    for name, raw in damaged.items():
        assert raw != good, name
        path = tmp_path / f"{name}.txt"
        path.write_bytes(raw)
        with pytest.raises(ModelLoadFailed, match="damaged LightGBM model") as info:
            get_runtime("lightgbm").load(path, name)
        assert name in info.value.reason


@pytest.mark.parametrize(
    ("file_type", "registered_as", "fragment"),
    [
        ("xgboost", "sklearn", "looks like an XGBoost JSON model"),
        ("lightgbm", "sklearn", "looks like a LightGBM text model"),
        ("sklearn", "xgboost", "looks like a Python pickle"),
        ("lightgbm", "xgboost", "looks like a LightGBM text model"),
        ("xgboost", "lightgbm", "looks like an XGBoost JSON model"),
        ("onnx", "lightgbm", "looks like a protobuf message (ONNX?)"),
        ("sklearn", "onnx", "looks like a Python pickle"),
        ("xgboost", "onnx", "looks like an XGBoost JSON model"),
        ("sklearn", "identity", "not a JSON identity model"),
        ("identity", "xgboost", "not a valid xgboost model"),
    ],
)
def test_wrong_format(tmp_path, demo_dir, demo_by_type, file_type, registered_as, fragment):
    source = demo_dir / demo_by_type[file_type].path
    with pytest.raises(ModelLoadFailed) as info:
        get_runtime(registered_as).load(source, "mistyped")
    assert fragment in info.value.reason, info.value.reason


def test_damaged_lightgbm_parameters_section_is_not_given_to_lightgbm(
    tmp_path, demo_dir, demo_by_type
):
    """LightGBM segfaults on some damaged parameter lines; the runtime drops that section.

    Run in a child process, so that a regression crashes that process, not the tests.
    """
    import subprocess

    good = (demo_dir / demo_by_type["lightgbm"].path).read_bytes()
    damaged = good.replace(b"[saved_feature_importance_type:", b"[saved feature_importance_type:")
    assert damaged != good
    path = tmp_path / "model.txt"
    path.write_bytes(damaged)
    code = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from modelmesh.runtimes import get_runtime\n"
        "from modelmesh.tensor import Tensor\n"
        "m = get_runtime('lightgbm').load(Path(sys.argv[1]), 'p')\n"
        "x = np.ones((1, 4), np.float32)\n"
        "print(m.predict([Tensor('x', 'FP32', x)], {})[0].data.tolist())\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr[-2000:]
    want = run(
        get_runtime("lightgbm").load(demo_dir / demo_by_type["lightgbm"].path, "g"),
        np.ones((1, 4), np.float32),
    )
    assert child.stdout.strip() == str(want["predict"].data.tolist())


def test_sklearn_pickle_without_predict(tmp_path):

    (tmp_path / "model.pkl").write_bytes(pickle.dumps({"not": "a model"}))
    with pytest.raises(ModelLoadFailed, match="holds a dict, not an estimator"):
        get_runtime("sklearn").load(tmp_path / "model.pkl", "dict")


def test_plain_pickle_loads(tmp_path, loaded):

    (tmp_path / "model.pkl").write_bytes(pickle.dumps(loaded["sklearn"].estimator))
    model = get_runtime("sklearn").load(tmp_path / "model.pkl", "pickled")
    np.testing.assert_array_equal(
        run(model, batch())["predict"].data, run(loaded["sklearn"], batch())["predict"].data
    )


def test_missing_path_and_ambiguous_directory(tmp_path):
    with pytest.raises(ModelLoadFailed, match="does not exist"):
        get_runtime("onnx").load(tmp_path / "nope.onnx", "gone")
    (tmp_path / "a.onnx").write_bytes(b"")
    (tmp_path / "b.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadFailed, match="several candidate onnx model files"):
        get_runtime("onnx").load(tmp_path, "two")
    with pytest.raises(FileNotFoundError):
        get_runtime("onnx").predict_size(tmp_path / "nope.onnx")


def test_missing_extra_names_the_package(demo_dir, demo_by_type, monkeypatch):
    monkeypatch.setitem(sys.modules, "lightgbm", None)  # makes `import lightgbm` fail
    with pytest.raises(ModelLoadFailed) as info:
        get_runtime("lightgbm").load(demo_dir / demo_by_type["lightgbm"].path, "lgb")
    assert (
        "model type 'lightgbm' needs the lightgbm package: pip install pymodelmesh[lightgbm]"
        in info.value.reason
    )


# --------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("model_type", DEMO_TYPES)
def test_concurrent_predicts_match_sequential(loaded, model_type):
    model = loaded[model_type]
    name = ONNX_INPUT if model_type == "onnx" else "x"
    x, _ = iris()
    x = x.astype(np.float32)
    chunks = [x[i : i + 7] for i in range(0, len(x), 7)] * 4

    def predict(chunk):
        return [t.data for t in model.predict([Tensor(name, "FP32", chunk)], {"i": 1})]

    sequential = [predict(c) for c in chunks]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(predict, chunks))
    for want, got in zip(sequential, concurrent, strict=True):
        for w, g in zip(want, got, strict=True):
            np.testing.assert_array_equal(w, g)
