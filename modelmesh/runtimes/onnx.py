"""ONNX models (``.onnx``), run by onnxruntime on CPU.

Inputs and outputs keep the model's own names. Request tensors are matched to
the model's inputs by name; a tensor whose datatype differs from the input's
is converted when the conversion keeps its kind (float64 -> float32,
int -> float, bool -> number: numpy's ``same_kind`` rule) and refused with
``InvalidArgument`` otherwise (float -> int, bytes <-> numbers). String inputs
take BYTES tensors (UTF-8). Outputs that are not tensors (e.g. the
``seq(map)`` ZipMap output of skl2onnx classifiers) cannot travel in V2 and
are left out of the signature and of every response.

Each session runs with ``INTRA_OP_THREADS`` threads: a mesh instance holds
many models, and per-session pools of one thread per core each would multiply
threads by models; requests run in parallel through the server's thread pool
instead (``InferenceSession.run`` is thread-safe).

Size:
- ``predict_size``: file size (plus external data files in the model's
  directory) x 2.0: onnxruntime keeps its own copy of the initializers next
  to the graph it builds from the file.
- measured: file size + bytes of the initializers, counted from the model's
  protobuf (the lengths of its ``initializer`` and ``sparse_initializer``
  messages) without the ``onnx`` package, + the sizes of external data files
  the initializers name. Initializers inside subgraphs (If/Loop bodies) are
  not counted.

External data: every file the main graph's initializers name is checked
before onnxruntime opens the model (``external_file``): relative, inside the
model's directory and its ``FileScope`` once symlinks are resolved, a regular
file. onnxruntime then opens them itself (recent versions check the
directory rule too); subgraph initializers' external data is left to it.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelmesh.errors import InvalidArgument, StorageError
from modelmesh.runtimes._model_files import (
    BadModelFile,
    first_line,
    load_failures,
    model_file,
    require,
    total_size,
)
from modelmesh.runtimes.base import LoadedModel, Runtime
from modelmesh.runtimes.tabular import output
from modelmesh.storage.paths import FileScope, check_path_text
from modelmesh.tensor import ModelSignature, Parameters, Tensor, TensorSpec

SUFFIXES = (".onnx",)
FACTOR = 2.0
INTRA_OP_THREADS = 1

#: onnxruntime type strings -> V2 datatypes (BF16 cannot be fed from numpy).
ONNX_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}


class OnnxRuntime(Runtime):
    model_type = "onnx"
    suffixes = SUFFIXES

    def predict_size(self, path: Path, scope: FileScope | None = None) -> int:
        return max(1, int(total_size(path, scope) * FACTOR))

    def load(self, path: Path, model_id: str, scope: FileScope | None = None) -> LoadedModel:
        scope = scope or FileScope.of_model(path)
        with load_failures(model_id, self.model_type, path):
            file = model_file(path, self.model_type, SUFFIXES, scope)
        with load_failures(model_id, self.model_type, file):
            ort = require("onnxruntime", self.model_type)
            # Before onnxruntime opens anything: every external data file the graph names
            # is checked (under the model's directory and the scope, regular, not too big).
            external_files(file, scope)
            options = ort.SessionOptions()
            options.intra_op_num_threads = INTRA_OP_THREADS
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(
                str(file), sess_options=options, providers=["CPUExecutionProvider"]
            )
            return OnnxModel(model_id, session, measured_size(file, scope))


class OnnxModel(LoadedModel):
    def __init__(self, model_id: str, session: Any, size: int) -> None:
        self.model_id = model_id
        self.session = session
        self.size_bytes = size
        inputs = []
        for arg in session.get_inputs():
            datatype = ONNX_TYPES.get(arg.type)
            if datatype is None:
                raise BadModelFile(
                    f"input '{arg.name}' has type {arg.type}, which V2 tensors cannot carry"
                )
            inputs.append(TensorSpec(arg.name, datatype, _dims(arg.shape)))
        outputs = [
            TensorSpec(arg.name, ONNX_TYPES[arg.type], _dims(arg.shape))
            for arg in session.get_outputs()
            if arg.type in ONNX_TYPES
        ]
        if not outputs:
            raise BadModelFile("the model has no tensor outputs that V2 can carry")
        self.signature = ModelSignature(tuple(inputs), tuple(outputs))
        # Requests can be merged only when every input and output starts with the same
        # named free dimension (a batch axis such as "N"); unnamed or fixed ones may mean
        # anything.
        first = {_first_dim(arg.shape) for arg in (*session.get_inputs(),
                                                   *session.get_outputs())}
        self.batchable = len(first) == 1 and isinstance(next(iter(first)), str)
        self._output_names = [s.name for s in outputs]
        self._output_set = frozenset(self._output_names)
        states = require("onnxruntime.capi.onnxruntime_pybind11_state", "onnx")
        self._ort_invalid_argument: type[Exception] = states.InvalidArgument

    def predict(self, inputs: list[Tensor], parameters: Parameters) -> list[Tensor]:
        return self.predict_outputs(inputs, parameters, ())

    def predict_outputs(self, inputs: list[Tensor], parameters: Parameters,
                        requested: Sequence[str]) -> list[Tensor]:
        # Only the requested outputs are computed (an unknown name: all, so the
        # codec's error can list the ones there are).
        names = self._output_names
        if requested and all(n in self._output_set for n in requested):
            names = list(dict.fromkeys(requested))
        given = {t.name: t for t in inputs}
        expected = [s.name for s in self.signature.inputs]
        missing = [n for n in expected if n not in given]
        unknown = [n for n in given if n not in expected]
        if missing or unknown:
            problems = []
            if missing:
                problems.append(f"missing {', '.join(missing)}")
            if unknown:
                problems.append(f"unknown {', '.join(unknown)}")
            raise InvalidArgument(
                f"model '{self.model_id}' takes inputs {', '.join(expected)}: {'; '.join(problems)}"
            )
        feeds = {s.name: self._feed(s, given[s.name]) for s in self.signature.inputs}
        try:
            results = self.session.run(names, feeds)
        except self._ort_invalid_argument as exc:
            raise InvalidArgument(
                f"model '{self.model_id}' rejected the input: {first_line(exc)}"
            ) from exc
        return [output(n, r) for n, r in zip(names, results, strict=True)]

    def _feed(self, spec: TensorSpec, tensor: Tensor) -> np.ndarray:
        data = tensor.data
        if spec.datatype == "BYTES":
            if tensor.datatype != "BYTES":
                raise InvalidArgument(
                    f"input '{spec.name}' of model '{self.model_id}' takes BYTES "
                    f"(strings), got {tensor.datatype}"
                )
            data = _to_str_array(tensor)
        else:
            target = _NUMPY[spec.datatype]
            if data.dtype.kind not in "biuf" or not np.can_cast(
                data.dtype, target, casting="same_kind"
            ):
                raise InvalidArgument(
                    f"input '{spec.name}' of model '{self.model_id}' takes {spec.datatype}; "
                    f"{tensor.datatype} cannot be converted to it without changing its kind"
                )
            data = data.astype(target, copy=False)
        shape = tuple(data.shape)
        if len(shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
        ):
            raise InvalidArgument(
                f"input '{spec.name}' of model '{self.model_id}' has shape {list(shape)}; "
                f"the model takes {list(spec.shape)} (-1: any size)"
            )
        return data

    def unload(self) -> None:
        self.session = None


def _first_dim(shape: Any) -> object:
    return shape[0] if isinstance(shape, list | tuple) and shape else None


def _dims(shape: Any) -> tuple[int, ...]:
    """onnxruntime shapes use None or a symbol for free dimensions; V2 uses -1."""
    if not isinstance(shape, list | tuple):
        return ()
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def _to_str_array(tensor: Tensor) -> np.ndarray:
    flat = tensor.data.ravel()
    out = np.empty(flat.shape[0], dtype=object)
    for i, item in enumerate(flat):
        if isinstance(item, bytes):
            try:
                out[i] = item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgument(
                    f"input '{tensor.name}' element {i} is not valid UTF-8; "
                    "ONNX string inputs take text"
                ) from exc
        else:
            out[i] = str(item)
    return out.reshape(tensor.data.shape)


# --------------------------------------------------------------------------- size


def measured_size(file: Path, scope: FileScope | None = None) -> int:
    """File size + initializer bytes + external data files (see the module docstring).

    Each external data file is checked by ``external_file``: one that may not be
    read refuses the model.
    """
    scope = scope or FileScope.of_model(file)
    size, initializers, locations = _scan(file, scope)
    external = sum(os.stat(external_file(file, loc, scope)).st_size for loc in sorted(locations))
    return size + initializers + external


def external_files(file: Path, scope: FileScope) -> list[Path]:
    """The external data files of the main graph, each checked by ``external_file``.

    A file this cannot parse names none: onnxruntime's own error is the report.
    """
    try:
        _size, _initializers_bytes, locations = _scan(file, scope)
    except (ValueError, IndexError):
        return []
    return [external_file(file, loc, scope) for loc in sorted(locations)]


def _scan(file: Path, scope: FileScope) -> tuple[int, int, set[str]]:
    """(file bytes, initializer bytes, external data locations), read within ``scope``."""
    with scope.open(file) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0, 0, set()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            buf = memoryview(m)
            try:
                initializers, locations = _initializers(buf)
            finally:
                buf.release()
    return size, initializers, locations


def external_file(model: Path, location: str, scope: FileScope) -> Path:
    """The external data file ``location`` of ``model``, resolved, if it may be read.

    As onnxruntime's rule: relative to the model file's directory and inside it;
    and, as for every file, inside ``scope``, a regular file, not too large.
    """
    where = f"{model.name}: external data location {location[:200]!r}"
    if not location or os.path.isabs(location) or "\x00" in location:
        raise StorageError(f"{where} must be a relative path in the model's directory")
    try:
        check_path_text(location, "external data location")
        real = scope.regular_file(model.parent / location)
    except (InvalidArgument, StorageError) as exc:
        raise StorageError(f"{where}: {exc.message}") from None
    directory = os.path.realpath(model.parent)
    if not str(real).startswith(directory.rstrip(os.sep) + os.sep):
        raise StorageError(f"{where} resolves outside the model's directory; refusing to "
                           "read it")
    return real


def _initializers(buf: memoryview) -> tuple[int, set[str]]:
    """Bytes of the main graph's initializer messages, and external data file names."""
    total = 0
    locations: set[str] = set()
    for field, start, end in _fields(buf, 0, len(buf)):
        if field != 7:  # ModelProto.graph
            continue
        for gfield, gstart, gend in _fields(buf, start, end):
            if gfield in (5, 15):  # GraphProto.initializer, .sparse_initializer
                total += gend - gstart
                if gfield == 5:
                    locations.update(_external_locations(buf, gstart, gend))
    return total, locations


def _external_locations(buf: memoryview, start: int, end: int) -> Iterator[str]:
    for field, s, e in _fields(buf, start, end):
        if field != 13:  # TensorProto.external_data (StringStringEntryProto)
            continue
        entry = {f: bytes(buf[a:b]).decode("utf-8", "replace") for f, a, b in _fields(buf, s, e)}
        if entry.get(1) == "location" and 2 in entry:
            yield entry[2]


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield field, pos, pos + length
            pos += length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} at byte {pos}")


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
