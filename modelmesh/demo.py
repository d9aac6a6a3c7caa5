"""Small, deterministic demo models of every type, for the quick start and the tests.

``write_demo_models(directory)`` trains on the iris data set that ships inside
scikit-learn (read from the installed package; nothing is downloaded) with
fixed seeds and single-threaded training, and writes one model per type:

| model id         | type       | file                         | what                             |
|------------------|------------|------------------------------|----------------------------------|
| `iris-sklearn`   | `sklearn`  | `iris-sklearn/model.joblib`  | RandomForestClassifier           |
| `iris-xgboost`   | `xgboost`  | `iris-xgboost/model.json`    | XGBClassifier (multi:softprob)   |
| `iris-lightgbm`  | `lightgbm` | `iris-lightgbm/model.txt`    | LGBMClassifier booster           |
| `iris-onnx`      | `onnx`     | `iris-onnx/model.onnx`       | multinomial LogisticRegression   |
| `echo`           | `identity` | `echo/model.json`            | returns its inputs               |

The ONNX graph is written with ``onnx.helper`` from the fitted logistic
regression's coefficients (``input`` FP32 ``[N, 4]`` -> ``label`` INT64 ``[N]``,
``probabilities`` FP32 ``[N, 3]``), so only the ``models`` extra is needed.
Needs the ``models`` extra (scikit-learn, xgboost, lightgbm, onnx).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEED = 0
N_FEATURES = 4
N_CLASSES = 3
ONNX_INPUT = "input"
ONNX_OUTPUTS = ("label", "probabilities")


@dataclass(frozen=True, slots=True)
class DemoModel:
    model_id: str
    model_type: str
    #: The model file, relative to the directory given to ``write_demo_models``.
    path: Path


def iris() -> tuple[np.ndarray, np.ndarray]:
    """The 150 x 4 iris features (float64) and labels 0..2, from scikit-learn's package data."""
    from sklearn.datasets import load_iris

    data = load_iris()
    return np.asarray(data.data, dtype=np.float64), np.asarray(data.target, dtype=np.int64)


def demo_input(n: int = 5) -> np.ndarray:
    """A float32 ``[n, 4]`` batch: every 30th iris row, so all three classes appear."""
    x, _ = iris()
    rows = np.arange(n) * 30 % len(x) + np.arange(n) // 5
    return x[rows].astype(np.float32)


def write_demo_models(directory: Path) -> list[DemoModel]:
    """Train and write the demo models under ``directory``; return what was written."""
    directory = Path(directory)
    x, y = iris()
    writers = (
        ("iris-sklearn", "sklearn", "model.joblib", _write_sklearn),
        ("iris-xgboost", "xgboost", "model.json", _write_xgboost),
        ("iris-lightgbm", "lightgbm", "model.txt", _write_lightgbm),
        ("iris-onnx", "onnx", "model.onnx", _write_onnx),
        ("echo", "identity", "model.json", _write_identity),
    )
    models = []
    for model_id, model_type, filename, write in writers:
        relative = Path(model_id) / filename
        (directory / model_id).mkdir(parents=True, exist_ok=True)
        write(directory / relative, x, y)
        models.append(DemoModel(model_id, model_type, relative))
    return models


def _write_sklearn(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    import joblib
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=10, max_depth=4, random_state=SEED, n_jobs=1)
    joblib.dump(model.fit(x, y), path)


def _write_xgboost(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    from xgboost import XGBClassifier

    model = XGBClassifier(n_estimators=10, max_depth=3, random_state=SEED, n_jobs=1)
    model.fit(x, y).save_model(path)


def _write_lightgbm(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    from lightgbm import LGBMClassifier

    model = LGBMClassifier(
        n_estimators=10,
        num_leaves=7,
        random_state=SEED,
        n_jobs=1,
        deterministic=True,
        verbose=-1,
    )
    model.fit(x, y).booster_.save_model(path)


def _write_onnx(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    from onnx import TensorProto, checker, helper, numpy_helper
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=1000).fit(x, y)
    weights = model.coef_.T.astype(np.float32)  # [4, 3]
    bias = model.intercept_.astype(np.float32)  # [3]
    graph = helper.make_graph(
        nodes=[
            helper.make_node("MatMul", [ONNX_INPUT, "weights"], ["xw"]),
            helper.make_node("Add", ["xw", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], [ONNX_OUTPUTS[1]], axis=1),
            helper.make_node("ArgMax", ["logits"], [ONNX_OUTPUTS[0]], axis=1, keepdims=0),
        ],
        name="iris_logistic_regression",
        inputs=[helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, ["N", N_FEATURES])],
        outputs=[
            helper.make_tensor_value_info(ONNX_OUTPUTS[0], TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info(ONNX_OUTPUTS[1], TensorProto.FLOAT, ["N", N_CLASSES]),
        ],
        initializer=[
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    # Opset 17 / IR 8: loadable by every onnxruntime the onnx extra allows.
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="modelmesh.demo"
    )
    proto.ir_version = 8
    checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())


def _write_identity(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    path.write_text(json.dumps({"description": "returns its inputs and the request parameters"}))
