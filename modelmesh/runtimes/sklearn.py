"""scikit-learn estimators saved with joblib (``.joblib``) or pickle (``.pkl``).

Security: loading a joblib or pickle file runs arbitrary code stored in it.
As in KServe ModelMesh and MLServer, models are trusted: register only models
from sources you trust.

Inputs and outputs follow ``modelmesh.runtimes.tabular``: a feature matrix in,
``predict`` out, plus ``predict_proba`` when the estimator has it. The
signature's output shapes and datatypes come from predicting one row of zeros
(a probe, so they are what the model really returns), on the first metadata
request rather than at load: a load does nothing but read the file.

Size, before and after the load alike, from the file: a plain pickle/joblib
file holds the estimator's arrays inline and little else, and the memory the
unpickled estimator takes is that plus the allocator's slack on its arrays and
a few Python objects. ``MEMORY_FACTOR`` and ``MEMORY_OVERHEAD`` are a straight
line through what a mesh instance's RSS grew by per model on this machine
(glibc malloc, scikit-learn 1.9, loads in the instance's threads; the density
benchmark's method): random forests of 2 trees (108.5 KB files) took 117.8 KB
each, of 8 trees (430.2 KB) 453.9 KB. A compressed file says little about its
contents: the estimator is measured once loaded (pickled with protocol 5
without copying its arrays) and the same line applied; before the load it is
guessed at 5x the file (typical zlib/lzma ratio on float arrays).

``predict`` only reads the fitted estimator, which scikit-learn estimators
allow from several threads at once. Linear classifiers, decision trees and
random/extra forests predict through ``sklearn_fast`` (the same answers without
scikit-learn's per-call validation); everything else through the estimator.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from modelmesh.errors import InvalidArgument
from modelmesh.runtimes import tabular  # the module, not the package
from modelmesh.runtimes._model_files import (
    BadModelFile,
    first_line,
    is_compressed,
    load_failures,
    looks_like,
    model_file,
    require,
    total_size,
)
from modelmesh.runtimes.base import LoadedModel, Runtime
from modelmesh.runtimes.sklearn_fast import fast_predictor
from modelmesh.storage.paths import FileScope
from modelmesh.tensor import ModelSignature, Parameters, Tensor, TensorSpec

log = logging.getLogger(__name__)

SUFFIXES = (".joblib", ".pkl", ".pickle", ".sav")
#: Memory of an unpickled estimator per byte of its plain pickle, and per model.
MEMORY_FACTOR = 1.045
MEMORY_OVERHEAD = 4500
COMPRESSED_FACTOR = 5.0


def memory_bytes(pickle_bytes: int) -> int:
    """Bytes an estimator takes in memory, from the bytes of its plain pickle."""
    return int(pickle_bytes * MEMORY_FACTOR) + MEMORY_OVERHEAD


class SklearnRuntime(Runtime):
    model_type = "sklearn"
    suffixes = SUFFIXES

    def predict_size(self, path: Path, scope: FileScope | None = None) -> int:
        scope = scope or FileScope.of_model(path)
        size = total_size(path, scope)
        try:
            compressed = is_compressed(scope.read_head(
                model_file(path, self.model_type, SUFFIXES, scope), resolved=True))
        except BadModelFile:
            compressed = False  # load will report the problem; this is only an estimate
        return int(size * COMPRESSED_FACTOR) if compressed else memory_bytes(size)

    def load(self, path: Path, model_id: str, scope: FileScope | None = None) -> LoadedModel:
        scope = scope or FileScope.of_model(path)
        with load_failures(model_id, self.model_type, path):
            file = model_file(path, self.model_type, SUFFIXES, scope)
        with load_failures(model_id, self.model_type, file), \
                scope.open(file, resolved=True) as f:  # model_file resolved and checked it
            joblib = require("joblib", self.model_type)
            head = f.read(64)
            compressed = is_compressed(head)
            if not (head.startswith(b"\x80") or compressed):
                raise BadModelFile(
                    f"{file.name} is not a joblib or pickle file; it looks like "
                    f"{looks_like(head)}. Is it registered with the wrong model type?"
                )
            f.seek(0)  # the file whole in one buffer (not the head and the rest joined)
            data = f.read()
            try:
                estimator = _unpickle(joblib, data, compressed)
            except (EOFError, pickle.UnpicklingError) as exc:
                if isinstance(exc, pickle.UnpicklingError) and "truncated" not in str(exc):
                    raise
                raise BadModelFile(
                    f"{file.name} ends before its pickle does (is the file truncated?)"
                ) from exc
            except ModuleNotFoundError as exc:
                hint = "; pip install pymodelmesh[sklearn]" if exc.name == "sklearn" else ""
                raise BadModelFile(
                    f"{file.name} needs the Python module '{exc.name}', which is not installed"
                    f"{hint}"
                ) from exc
            if not callable(getattr(estimator, "predict", None)):
                raise BadModelFile(
                    f"{file.name} holds a {type(estimator).__name__}, "
                    "not an estimator with a predict() method"
                )
            size = memory_bytes(pickled_size(estimator) if compressed else len(data))
            return SklearnModel(model_id, estimator, size)


#: In a pickle written by ``joblib.dump``: its arrays follow their wrapper objects as
#: raw bytes, which only joblib's own unpickler reads.
_JOBLIB_MARK = b"joblib.numpy_pickle"


def _unpickle(joblib: Any, data: bytes, compressed: bool) -> Any:
    """The estimator in ``data``: a plain pickle through the C unpickler, else joblib's.

    joblib's unpickler is the pure-Python one (it must be, to read its wrapped
    arrays); on a plain pickle the C one is about 3x quicker, with the same result.
    """
    if compressed or _JOBLIB_MARK in data:
        return joblib.load(io.BytesIO(data))
    return pickle.loads(data)


class SklearnModel(LoadedModel):
    batchable = True  # estimators predict row by row

    def __init__(self, model_id: str, estimator: Any, size_bytes: int) -> None:
        self.model_id = model_id
        self.estimator = estimator
        n = getattr(estimator, "n_features_in_", None)
        self.n_features = int(n) if n is not None else None
        self.has_proba = hasattr(estimator, "predict_proba")
        self.size_bytes = size_bytes
        self._fast = fast_predictor(estimator)

    @cached_property
    def signature(self) -> ModelSignature:  # type: ignore[override]
        """Probed on first use (model metadata), not at load."""
        return tabular.signature(self.n_features, "FP64", self._output_specs())

    def predict(self, inputs: list[Tensor], parameters: Parameters) -> list[Tensor]:
        return self.predict_outputs(inputs, parameters, ())

    def predict_outputs(self, inputs: list[Tensor], parameters: Parameters,
                        requested: Sequence[str]) -> list[Tensor]:
        x = tabular.feature_matrix(inputs, self.n_features, self.model_id)
        # Labels only: skip the probabilities (about a third of a small model's time).
        proba = self.has_proba and set(requested) != {tabular.PREDICT}
        try:
            return self._run(x, proba)
        except ValueError as exc:  # scikit-learn's input validation (NaN, dtype, ...)
            raise InvalidArgument(
                f"model '{self.model_id}' rejected the input: {first_line(exc)}"
            ) from exc

    def _output_specs(self) -> tuple[TensorSpec, ...]:
        """Specs from predicting one row of zeros; from fitted attributes if that fails."""
        if self.n_features:
            try:
                return tabular.specs_of(self._run(np.zeros((1, self.n_features))))
            except Exception as exc:  # e.g. log(0) in a pipeline: describe it another way
                log.debug("model %s: probe prediction failed (%s)", self.model_id, exc)
        classes = getattr(self.estimator, "classes_", None)
        if classes is None:
            n_out = int(getattr(self.estimator, "n_outputs_", 1) or 1)
            shape = (-1,) if n_out == 1 else (-1, n_out)
            return (TensorSpec(tabular.PREDICT, "FP64", shape),)
        classes = np.asarray(classes)
        specs = [TensorSpec(tabular.PREDICT, tabular.output("", classes).datatype, (-1,))]
        if self.has_proba:
            specs.append(TensorSpec(tabular.PREDICT_PROBA, "FP64", (-1, len(classes))))
        return tuple(specs)

    def _run(self, x: np.ndarray, proba: bool = True) -> list[Tensor]:
        fast = self._fast(x, proba and self.has_proba) if self._fast is not None else None
        if fast is not None:  # the same answers as below (sklearn_fast): probabilities
            labels, probabilities = fast  # when asked for, else None
            outputs = [tabular.output(tabular.PREDICT, labels)]
            if probabilities is not None:
                outputs.append(tabular.output(tabular.PREDICT_PROBA, probabilities))
            return outputs
        outputs = [tabular.output(tabular.PREDICT, self.estimator.predict(x))]
        if proba and self.has_proba:
            outputs.append(tabular.output(tabular.PREDICT_PROBA, self.estimator.predict_proba(x)))
        return outputs


class _CountingWriter:
    def __init__(self) -> None:
        self.count = 0

    def write(self, b: bytes) -> int:
        n = memoryview(b).nbytes
        self.count += n
        return n


def pickled_size(obj: Any) -> int:
    """Pickle stream bytes plus out-of-band buffer bytes, without copying the buffers."""
    writer = _CountingWriter()
    buffers = 0

    def count_buffer(buf: pickle.PickleBuffer) -> None:
        nonlocal buffers
        buffers += memoryview(buf).nbytes  # returning None keeps it out of the stream

    pickle.Pickler(writer, protocol=5, buffer_callback=count_buffer).dump(obj)
    return writer.count + buffers
