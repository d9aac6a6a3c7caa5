"""The input and output conventions shared by the tabular runtimes.

sklearn, xgboost and lightgbm models take a feature matrix. A request gives it
either as one input of shape ``[N, F]`` or as several inputs of shape ``[N]``
or ``[N, 1]``, taken as columns in request order (names are free). Any
numeric datatype is accepted: floating data keeps its precision (FP16 widens
to float32), integers and booleans become float64.

Outputs are named ``predict`` (always) and ``predict_proba`` (classifiers:
``[N, n_classes]``). For boosters trained with a classification objective,
``predict`` is the class index (INT64) as the libraries' sklearn wrappers
return it. The runtime returns every output; the data plane filters what the
client asked for.
"""

from __future__ import annotations

import numpy as np

from modelmesh.codec import datatype_of
from modelmesh.errors import InvalidArgument
from modelmesh.tensor import ModelSignature, Tensor, TensorSpec

#: Name of the feature-matrix input in tabular signatures.
INPUT_NAME = "input__0"
PREDICT = "predict"
PREDICT_PROBA = "predict_proba"


def feature_matrix(inputs: list[Tensor], n_features: int | None, model_id: str) -> np.ndarray:
    """The ``[N, F]`` matrix a request describes, validated against the model's F."""
    if not inputs:
        raise InvalidArgument(f"model '{model_id}' needs a feature matrix input; got no inputs")
    for t in inputs:
        if t.data.dtype.kind not in "biuf":
            raise InvalidArgument(
                f"input '{t.name}' has datatype {t.datatype}; model '{model_id}' takes "
                "numeric features"
            )
    if len(inputs) == 1 and inputs[0].data.ndim == 2:
        matrix = inputs[0].data
    else:
        columns = []
        for t in inputs:
            if t.data.ndim == 1 or (t.data.ndim == 2 and t.data.shape[1] == 1):
                columns.append(t.data.reshape(-1))
                continue
            how = "one input [N, F] or one input per feature column, each [N] or [N, 1]"
            raise InvalidArgument(
                f"input '{t.name}' has shape {list(t.shape)}; model '{model_id}' takes {how}"
            )
        rows = {c.shape[0] for c in columns}
        if len(rows) > 1:
            raise InvalidArgument(
                f"feature columns of model '{model_id}' have different lengths "
                f"{[c.shape[0] for c in columns]}; every column needs one value per row"
            )
        matrix = np.column_stack(columns)
    if matrix.shape[0] == 0:
        raise InvalidArgument(f"model '{model_id}' needs at least one row of features, got 0")
    if n_features is not None and matrix.shape[1] != n_features:
        raise InvalidArgument(
            f"model '{model_id}' expects {n_features} features per row, got {matrix.shape[1]} "
            f"(input shape {list(matrix.shape)})"
        )
    if matrix.dtype.kind in "biu":
        return matrix.astype(np.float64)
    if matrix.dtype == np.float16:
        return matrix.astype(np.float32)
    return matrix


def output(name: str, data: np.ndarray) -> Tensor:
    """A result tensor whose datatype follows its numpy dtype."""
    data = np.asarray(data)
    if data.dtype.kind == "U":  # class labels as str: keep them BYTES-encodable
        data = data.astype(object)
    return Tensor(name, datatype_of(data.dtype), data)


def signature(
    n_features: int | None, input_datatype: str, outputs: tuple[TensorSpec, ...]
) -> ModelSignature:
    """Tabular signature: one ``[-1, F]`` input (``-1`` when F is unknown)."""
    features = -1 if n_features is None else n_features
    return ModelSignature(
        inputs=(TensorSpec(INPUT_NAME, input_datatype, (-1, features)),), outputs=outputs
    )


def specs_of(outputs: list[Tensor]) -> tuple[TensorSpec, ...]:
    """Output specs from one prediction's results, with the batch dimension variable."""
    return tuple(TensorSpec(t.name, t.datatype, (-1, *t.shape[1:])) for t in outputs)


def binary_proba(p: np.ndarray) -> np.ndarray:
    """``[N]`` positive-class probabilities -> ``[N, 2]`` as sklearn's predict_proba."""
    p = np.asarray(p).reshape(-1)
    return np.column_stack([1.0 - p, p])


def class_index(proba: np.ndarray) -> np.ndarray:
    """Predicted class index from ``[N, K]`` probabilities (argmax, first on ties)."""
    return np.argmax(proba, axis=1).astype(np.int64)


def classifier_outputs(kind: str, y: np.ndarray) -> list[Tensor]:
    """Outputs of a booster's raw prediction ``y`` for its objective ``kind``.

    ``"binary"``: ``y`` is the positive-class probability -> label and [N, 2] probabilities;
    ``"multiclass"``: ``y`` is [N, K] probabilities -> label and probabilities;
    anything else: ``y`` is returned as ``predict`` unchanged (regression, ranking, ...).
    """
    if kind == "binary":
        proba = binary_proba(y)
        return [output(PREDICT, (proba[:, 1] > 0.5).astype(np.int64)),
                output(PREDICT_PROBA, proba)]
    if kind == "multiclass":
        return [output(PREDICT, class_index(y)), output(PREDICT_PROBA, y)]
    return [output(PREDICT, y)]
