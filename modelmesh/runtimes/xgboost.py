"""XGBoost models saved with ``save_model`` as JSON (``.json``) or UBJSON (``.ubj``).

Both a plain ``Booster`` and the sklearn API (``XGBClassifier``,
``XGBRegressor``: their ``save_model`` writes the same booster file) load. The
booster's objective decides the outputs, following ``modelmesh.runtimes.tabular``
and what ``XGBClassifier`` returns:

- ``binary:logistic``: ``predict`` = class index (probability > 0.5, INT64),
  ``predict_proba`` = ``[N, 2]``;
- ``multi:softprob``: ``predict`` = argmax (INT64), ``predict_proba`` = ``[N, K]``;
- ``multi:softmax``: ``predict`` = class index (INT64), no probabilities;
- any other objective (regression, ranking, ``binary:logitraw``, ...):
  ``predict`` = the booster's output as ``Booster.predict`` gives it (FP32).

Size:
- ``predict_size``: file size x 1.2 for JSON, x 1.0 for UBJSON (the measured
  size is the UBJSON form; JSON text of small models is about 20% smaller, of
  large ones about the same).
- measured: bytes of the booster serialized with ``save_raw("ubj")``, XGBoost's
  own compact form of the trees; stable across processes.

``predict`` uses ``Booster.inplace_predict``, which XGBoost documents as
thread-safe.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from modelmesh.errors import InvalidArgument
from modelmesh.runtimes import tabular  # the module, not the package
from modelmesh.runtimes._model_files import (
    BadModelFile,
    first_line,
    load_failures,
    looks_like,
    model_file,
    require,
    total_size,
)
from modelmesh.runtimes.base import LoadedModel, Runtime
from modelmesh.storage.paths import FileScope
from modelmesh.tensor import ModelSignature, Parameters, Tensor

SUFFIXES = (".json", ".ubj")
JSON_FACTOR = 1.2
UBJ_FACTOR = 1.0


class XGBoostRuntime(Runtime):
    model_type = "xgboost"
    suffixes = SUFFIXES

    def predict_size(self, path: Path, scope: FileScope | None = None) -> int:
        scope = scope or FileScope.of_model(path)
        size = total_size(path, scope)
        try:
            head = scope.read_head(
                model_file(path, self.model_type, SUFFIXES, scope), resolved=True)
        except BadModelFile:
            head = b""  # load will report the problem; this is only an estimate
        is_json = head.lstrip().startswith(b'{"') or head.lstrip().startswith(b"{\n")
        return max(1, int(size * (JSON_FACTOR if is_json else UBJ_FACTOR)))

    def load(self, path: Path, model_id: str, scope: FileScope | None = None) -> LoadedModel:
        scope = scope or FileScope.of_model(path)
        with load_failures(model_id, self.model_type, path):
            file = model_file(path, self.model_type, SUFFIXES, scope)
        with load_failures(model_id, self.model_type, file):
            xgb = require("xgboost", self.model_type)
            raw = scope.read_bytes(file, resolved=True)
            if not raw.lstrip()[:1] == b"{":
                raise BadModelFile(
                    f"{file.name} is not an XGBoost JSON or UBJSON model; it looks like "
                    f"{looks_like(raw[:64])}. Is it registered with the wrong model type?"
                )
            booster = xgb.Booster()
            booster.load_model(bytearray(raw))  # from memory: format from content, not suffix
            return XGBoostModel(model_id, booster)


class XGBoostModel(LoadedModel):
    batchable = True  # boosters predict row by row

    def __init__(self, model_id: str, booster: Any) -> None:
        self.model_id = model_id
        self.booster = booster
        self.n_features = int(booster.num_features())
        config = json.loads(booster.save_config())
        self.objective: str = config["learner"]["objective"]["name"]
        self.size_bytes = len(booster.save_raw(raw_format="ubj"))

    @cached_property
    def signature(self) -> ModelSignature:  # type: ignore[override]
        """From predicting one row of zeros, on first use (model metadata), not at load."""
        probe = self.predict([Tensor("probe", "FP32", np.zeros((1, self.n_features)))], {})
        return tabular.signature(self.n_features, "FP32", tabular.specs_of(probe))

    def predict(self, inputs: list[Tensor], parameters: Parameters) -> list[Tensor]:
        x = tabular.feature_matrix(inputs, self.n_features, self.model_id)
        try:
            y = self.booster.inplace_predict(x)
        except ValueError as exc:
            raise InvalidArgument(
                f"model '{self.model_id}' rejected the input: {first_line(exc)}"
            ) from exc
        if self.objective == "multi:softmax":
            return [tabular.output(tabular.PREDICT, y.astype(np.int64))]
        kind = {"binary:logistic": "binary", "multi:softprob": "multiclass"}.get(
            self.objective, "raw")
        return tabular.classifier_outputs(kind, y)

    def unload(self) -> None:
        self.booster = None
