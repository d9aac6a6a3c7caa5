"""Model formats the mesh can serve, behind the ``Runtime`` interface (``base.py``).

``get_runtime(model_type)`` returns the runtime for a registered model's type.
Each format's library is imported only when a model of that type loads, so
importing this package is cheap and a missing extra is reported as a load
failure naming the package to install.

| type       | file                         | inputs -> outputs                                  |
|------------|------------------------------|----------------------------------------------------|
| `sklearn`  | joblib / pickle              | feature matrix -> `predict`, `predict_proba`        |
| `xgboost`  | `.json` / `.ubj` booster     | feature matrix -> `predict`, `predict_proba`        |
| `lightgbm` | text model (`.txt`)          | feature matrix -> `predict`, `predict_proba`        |
| `onnx`     | `.onnx` (onnxruntime, CPU)   | the model's own tensor names                       |
| `torchscript` | `.pt` (torch.jit; GPU if any) | `forward` arguments -> `output-N` / dict keys   |
| `identity` | JSON (optional signature)    | every input unchanged + `parameters` (BYTES, JSON) |

The feature-matrix convention is in ``modelmesh.runtimes.tabular``.
"""

from __future__ import annotations

from modelmesh.errors import InvalidArgument
from modelmesh.runtimes.base import LoadedModel, Runtime
from modelmesh.runtimes.identity import IdentityRuntime
from modelmesh.runtimes.lightgbm import LightGBMRuntime
from modelmesh.runtimes.onnx import OnnxRuntime
from modelmesh.runtimes.sklearn import SklearnRuntime
from modelmesh.runtimes.torchscript import TorchScriptRuntime
from modelmesh.runtimes.xgboost import XGBoostRuntime

__all__ = ["MODEL_TYPES", "LoadedModel", "Runtime", "get_runtime"]

# Runtimes hold no state between models, so one instance per type serves all.
_RUNTIMES: dict[str, Runtime] = {
    r.model_type: r
    for r in (
        SklearnRuntime(),
        XGBoostRuntime(),
        LightGBMRuntime(),
        OnnxRuntime(),
        TorchScriptRuntime(),
        IdentityRuntime(),
    )
}

#: The model types users can register, in documentation order.
MODEL_TYPES: tuple[str, ...] = tuple(_RUNTIMES)


def get_runtime(model_type: str) -> Runtime:
    """The runtime for ``model_type``; ``InvalidArgument`` listing known types otherwise."""
    runtime = _RUNTIMES.get(model_type)
    if runtime is None:
        raise InvalidArgument(
            f"unknown model type '{model_type}'; known types: {', '.join(MODEL_TYPES)}"
        )
    return runtime
