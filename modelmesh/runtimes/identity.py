"""A diagnostic runtime that returns its inputs: for testing datatypes and parameters.

The model file is a small JSON object. ``{}`` accepts any inputs; an optional
signature restricts them::

    {"description": "echo",
     "inputs":  [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
     "outputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]}

``predict`` returns every input unchanged, under the same name and datatype
(BF16 included) with its parameters, plus an output ``parameters``: BYTES,
shape ``[1]``, holding the request parameters as JSON (keys sorted). With a
declared signature, inputs must match it by name, datatype and shape
(``-1``: any size). Declared outputs default to the inputs.

Two optional keys make it stand in for a real model in tests and load
experiments: ``"delay_ms"`` (each ``predict`` takes at least this long, like a
heavier model; at most 60000) and ``"memory_bytes"`` (the size it reports and is
accounted at, like a bigger model).

Size: ``predict_size`` and the measured size are both the file's size, or
``memory_bytes`` when given.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from modelmesh.codec import DATATYPES
from modelmesh.errors import InvalidArgument
from modelmesh.runtimes._model_files import (
    BadModelFile,
    load_failures,
    looks_like,
    model_file,
    total_size,
)
from modelmesh.runtimes.base import LoadedModel, Runtime
from modelmesh.storage.paths import FileScope
from modelmesh.tensor import ModelSignature, Parameters, Tensor, TensorSpec

SUFFIXES = (".json",)
#: Name of the output that carries the request parameters as JSON.
PARAMETERS_OUTPUT = "parameters"
_KEYS = {"description", "inputs", "outputs", "delay_ms", "memory_bytes"}


class IdentityRuntime(Runtime):
    model_type = "identity"
    suffixes = SUFFIXES

    def predict_size(self, path: Path, scope: FileScope | None = None) -> int:
        scope = scope or FileScope.of_model(path)
        try:
            spec = json.loads(scope.read_bytes(
                model_file(path, self.model_type, SUFFIXES, scope), resolved=True))
            declared = spec.get("memory_bytes") if isinstance(spec, dict) else None
            if isinstance(declared, int) and declared > 0:
                return declared
        except (OSError, ValueError, BadModelFile):
            pass  # the load reports what is wrong with the file
        return max(1, total_size(path, scope))

    def load(self, path: Path, model_id: str, scope: FileScope | None = None) -> LoadedModel:
        scope = scope or FileScope.of_model(path)
        with load_failures(model_id, self.model_type, path):
            file = model_file(path, self.model_type, SUFFIXES, scope)
        with load_failures(model_id, self.model_type, file):
            raw = scope.read_bytes(file, resolved=True)
            try:
                spec = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BadModelFile(
                    f"{file.name} is not a JSON identity model description ({exc}); it looks "
                    f"like {looks_like(raw[:64])}"
                ) from exc
            sig = parse_signature(spec, file.name)
            delay, memory = _knobs(spec, file.name)
            return IdentityModel(model_id, sig, memory or len(raw), delay)


def _knobs(spec: dict[str, Any], filename: str) -> tuple[float, int]:
    """(delay in seconds, declared memory bytes or 0) from an identity model file."""
    delay = spec.get("delay_ms", 0)
    memory = spec.get("memory_bytes", 0)
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= 60000:
        raise BadModelFile(f"{filename}: delay_ms must be a number of milliseconds in [0, 60000]")
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
        raise BadModelFile(f"{filename}: memory_bytes must be a non-negative integer")
    return delay / 1000, memory


def parse_signature(spec: Any, filename: str) -> ModelSignature:
    """The signature an identity model file declares (empty inputs: anything goes)."""
    if not isinstance(spec, dict):
        raise BadModelFile(f"{filename} must hold a JSON object, not {type(spec).__name__}")
    extra = set(spec) - _KEYS
    if extra:
        raise BadModelFile(f"{filename} has unknown keys {sorted(extra)}; allowed: {sorted(_KEYS)}")
    inputs = tuple(_tensor_spec(s, filename) for s in _spec_list(spec, "inputs", filename))
    if "outputs" in spec:
        outputs = tuple(_tensor_spec(s, filename) for s in _spec_list(spec, "outputs", filename))
    else:
        outputs = inputs
    if any(s.name == PARAMETERS_OUTPUT for s in inputs + outputs):
        raise BadModelFile(f"{filename}: the name '{PARAMETERS_OUTPUT}' is reserved")
    return ModelSignature(inputs, (*outputs, TensorSpec(PARAMETERS_OUTPUT, "BYTES", (1,))))


def _spec_list(spec: dict[str, Any], key: str, filename: str) -> list[Any]:
    value = spec.get(key, [])
    if not isinstance(value, list):
        raise BadModelFile(f"{filename}: '{key}' must be a list of tensor specs")
    return value


def _tensor_spec(s: Any, filename: str) -> TensorSpec:
    try:
        name, datatype, shape = s["name"], s["datatype"], s["shape"]
        ok = (
            isinstance(name, str)
            and datatype in DATATYPES
            and all(isinstance(d, int) and d >= -1 for d in shape)
        )
    except (TypeError, KeyError):
        ok = False
    if not ok:
        raise BadModelFile(
            f"{filename}: bad tensor spec {s!r}; expected "
            f'{{"name": str, "datatype": one of {", ".join(DATATYPES)}, "shape": [int, ...]}}'
        )
    return TensorSpec(name, datatype, tuple(shape))


class IdentityModel(LoadedModel):
    def __init__(self, model_id: str, signature: ModelSignature, size: int,
                 delay: float = 0.0) -> None:
        self.model_id = model_id
        self.signature = signature
        self.size_bytes = max(1, size)
        self.delay = delay

    def predict(self, inputs: list[Tensor], parameters: Parameters) -> list[Tensor]:
        for t in inputs:
            if t.name == PARAMETERS_OUTPUT:
                raise InvalidArgument(
                    f"input name '{PARAMETERS_OUTPUT}' is reserved by the identity runtime "
                    "for the request parameters"
                )
        if self.signature.inputs:
            self._check(inputs)
        if self.delay:
            time.sleep(self.delay)
        echoed = json.dumps(dict(parameters), sort_keys=True).encode("utf-8")
        params = np.empty(1, dtype=object)
        params[0] = echoed
        return [*inputs, Tensor(PARAMETERS_OUTPUT, "BYTES", params)]

    def _check(self, inputs: list[Tensor]) -> None:
        given = {t.name: t for t in inputs}
        declared = {s.name: s for s in self.signature.inputs}
        if set(given) != set(declared):
            raise InvalidArgument(
                f"model '{self.model_id}' takes inputs {', '.join(declared)}; "
                f"got {', '.join(given) or 'none'}"
            )
        for name, spec in declared.items():
            t = given[name]
            shape = t.shape
            if t.datatype != spec.datatype:
                raise InvalidArgument(
                    f"input '{name}' has datatype {t.datatype}; model '{self.model_id}' "
                    f"takes {spec.datatype}"
                )
            if len(shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
            ):
                raise InvalidArgument(
                    f"input '{name}' has shape {list(shape)}; model '{self.model_id}' takes "
                    f"{list(spec.shape)} (-1: any size)"
                )
