"""LightGBM models saved as text with ``Booster.save_model`` (``.txt``).

The objective in the model header decides the outputs, following
``modelmesh.runtimes.tabular`` and what ``LGBMClassifier`` returns:

- ``binary``: ``predict`` = class index (probability > 0.5, INT64),
  ``predict_proba`` = ``[N, 2]``;
- ``multiclass`` / ``multiclassova``: ``predict`` = argmax (INT64),
  ``predict_proba`` = ``[N, K]``;
- any other objective: ``predict`` = ``Booster.predict``'s output (FP64).

Size:
- ``predict_size``: file size x 1.0 (the file is the model string).
- measured: bytes of the model string the booster was loaded from (UTF-8).
  LightGBM keeps each tree's arrays in memory at about the text's size; the
  string is exact and stable across processes.

``predict`` calls ``Booster.predict``, which builds a fresh predictor per call
under the booster's shared (reader) lock, so concurrent calls are safe.

LightGBM aborts or crashes the whole process on some damaged model files, so
``safe_model_text`` checks a file's structure before LightGBM reads it (about
0.05 s per MB of model text).
"""

from __future__ import annotations

from collections.abc import Callable
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

SUFFIXES = (".txt", ".lgb", ".model")
FACTOR = 1.0


class LightGBMRuntime(Runtime):
    model_type = "lightgbm"
    suffixes = SUFFIXES

    def predict_size(self, path: Path, scope: FileScope | None = None) -> int:
        return max(1, int(total_size(path, scope) * FACTOR))

    def load(self, path: Path, model_id: str, scope: FileScope | None = None) -> LoadedModel:
        scope = scope or FileScope.of_model(path)
        with load_failures(model_id, self.model_type, path):
            file = model_file(path, self.model_type, SUFFIXES, scope)
        with load_failures(model_id, self.model_type, file):
            lgb = require("lightgbm", self.model_type)
            raw = scope.read_bytes(file, resolved=True)
            if not raw.startswith(b"tree"):
                raise BadModelFile(
                    f"{file.name} is not a LightGBM text model; it looks like "
                    f"{looks_like(raw[:64])}. Is it registered with the wrong model type?"
                )
            text = safe_model_text(raw, file.name)
            booster = lgb.Booster(model_str=text)
            return LightGBMModel(model_id, booster, objective_of(text), len(raw))


_LEAF_ARRAYS = (b"leaf_value", b"leaf_weight", b"leaf_count")
_SPLIT_ARRAYS = (
    b"split_feature",
    b"split_gain",
    b"threshold",
    b"decision_type",
    b"left_child",
    b"right_child",
    b"internal_value",
    b"internal_weight",
    b"internal_count",
)
_REQUIRED = (
    b"leaf_value",
    b"split_feature",
    b"threshold",
    b"decision_type",
    b"left_child",
    b"right_child",
)


def safe_model_text(raw: bytes, name: str) -> str:
    """The model text to give LightGBM, after checking what LightGBM does not check.

    LightGBM trusts its model files: it parses trees in an OpenMP loop, where
    an error cannot be caught and aborts the process, indexes features and
    nodes by the numbers in the file, and reads the ``parameters:`` section
    with no bounds checks (a damaged one crashes it). So before LightGBM sees
    a file, this checks the tree section's layout (the declared tree sizes,
    each tree's header and array lengths, that numbers are numbers, that
    feature indices and child links are in range), and drops the parameters
    section, which records the training parameters and plays no part in
    prediction. Values inside the arrays are otherwise LightGBM's business.
    """

    def bad(why: str) -> BadModelFile:
        return BadModelFile(f"{name} is a damaged LightGBM model: {why}")

    first = raw.find(b"\nTree=")
    end = raw.find(b"\nend of trees")
    if first < 0 or end < 0 or end < first:
        raise bad("no complete tree section (is the file truncated?)")
    header = dict(line.split(b"=", 1) for line in raw[:first].splitlines() if b"=" in line)
    try:
        n_features = int(header[b"max_feature_idx"]) + 1
        sizes = [int(n) for n in header.get(b"tree_sizes", b"").split()]
    except (KeyError, ValueError) as exc:
        raise bad("the header lacks a valid max_feature_idx or tree_sizes") from exc
    start = first + 1
    if b"tree_sizes" in header:
        if any(size <= 0 for size in sizes) or start + sum(sizes) > end + 1:
            raise bad("tree_sizes does not match the tree section")
        offsets = [start]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        blocks = [raw[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]
    else:
        blocks = [b"Tree=" + b for b in raw[start + len(b"Tree=") : end].split(b"\nTree=")]
    for i, block in enumerate(blocks):
        _check_tree(block, i, n_features, bad)

    params = raw.find(b"\nparameters:", end)
    if params < 0:
        return raw.decode("utf-8")
    params_end = raw.find(b"\nend of parameters\n", params)
    if params_end < 0:
        raise bad("the parameters section is cut short (is the file truncated?)")
    return (raw[: params + 1] + raw[params_end + len(b"\nend of parameters\n") :]).decode("utf-8")


def _check_tree(block: bytes, i: int, n_features: int, bad: Callable[[str], BadModelFile]) -> None:
    if not block.startswith(b"Tree=%d\n" % i):
        raise bad(f"tree {i} does not start where tree_sizes says")
    fields = dict(line.split(b"=", 1) for line in block.splitlines()[1:] if b"=" in line)
    try:
        leaves = int(fields[b"num_leaves"])
        cats = int(fields[b"num_cat"])
        float(fields[b"shrinkage"])
    except (KeyError, ValueError) as exc:
        raise bad(f"tree {i} lacks a valid num_leaves, num_cat or shrinkage") from exc
    if leaves < 1 or cats < 0:
        raise bad(f"tree {i} has num_leaves={leaves}, num_cat={cats}")
    expected = {key: leaves for key in _LEAF_ARRAYS}
    if leaves > 1:
        expected |= {key: leaves - 1 for key in _SPLIT_ARRAYS}
    if cats > 0:
        expected[b"cat_boundaries"] = cats + 1
    for key, count in expected.items():
        value = fields.get(key)
        if value is None:
            if key in _REQUIRED or key == b"cat_boundaries":
                raise bad(f"tree {i} has no {key.decode()}")
            continue
        if leaves == 1 and key != b"leaf_value" and not value.strip():
            continue  # a single-leaf tree leaves its weight and count arrays empty
        tokens = value.split()
        if len(tokens) != count or not _all_numbers(tokens):
            raise bad(f"tree {i} has a malformed {key.decode()}")
    if leaves == 1:
        return
    try:
        features = [int(v) for v in fields[b"split_feature"].split()]
        children = [int(v) for v in (fields[b"left_child"] + b" " + fields[b"right_child"]).split()]
    except ValueError as exc:
        raise bad(f"tree {i} has a non-integer feature index or child link") from exc
    if min(features) < 0 or max(features) >= n_features:
        raise bad(f"tree {i} splits on a feature outside 0..{n_features - 1}")
    # A child is a node index (0..leaves-2) or ~leaf (-1..-leaves).
    if min(children) < -leaves or max(children) > leaves - 2:
        raise bad(f"tree {i} links to a node or leaf that does not exist")
    if cats > 0:
        try:
            bounds = [int(v) for v in fields[b"cat_boundaries"].split()]
        except ValueError as exc:
            raise bad(f"tree {i} has a malformed cat_boundaries") from exc
        words = fields.get(b"cat_threshold", b"").split()
        if bounds[0] != 0 or bounds != sorted(bounds) or bounds[-1] != len(words):
            raise bad(f"tree {i} has cat_boundaries that do not match cat_threshold")


def _all_numbers(tokens: list[bytes]) -> bool:
    """Whether every token is a number LightGBM can read (Python's float syntax less '_')."""
    try:
        for token in tokens:
            float(token)
    except ValueError:
        return False
    return not any(b"_" in t for t in tokens)


def objective_of(model_text: str) -> str:
    """The objective's name from a model file header (``objective=binary sigmoid:1``)."""
    for line in model_text.splitlines():
        if line.startswith("objective="):
            return line.partition("=")[2].split(" ")[0]
        if line.startswith("Tree="):
            break
    return ""


class LightGBMModel(LoadedModel):
    batchable = True  # boosters predict row by row

    def __init__(self, model_id: str, booster: Any, objective: str, size: int) -> None:
        self.model_id = model_id
        self.booster = booster
        self.objective = objective
        self.n_features = int(booster.num_feature())
        self.size_bytes = size

    @cached_property
    def signature(self) -> ModelSignature:  # type: ignore[override]
        """From predicting one row of zeros, on first use (model metadata), not at load."""
        probe = self.predict([Tensor("probe", "FP64", np.zeros((1, self.n_features)))], {})
        return tabular.signature(self.n_features, "FP64", tabular.specs_of(probe))

    def predict(self, inputs: list[Tensor], parameters: Parameters) -> list[Tensor]:
        x = tabular.feature_matrix(inputs, self.n_features, self.model_id)
        try:
            y = self.booster.predict(x)
        except ValueError as exc:
            raise InvalidArgument(
                f"model '{self.model_id}' rejected the input: {first_line(exc)}"
            ) from exc
        kind = {"binary": "binary", "multiclass": "multiclass",
                "multiclassova": "multiclass"}.get(self.objective, "raw")
        return tabular.classifier_outputs(kind, y)

    def unload(self) -> None:
        self.booster = None
