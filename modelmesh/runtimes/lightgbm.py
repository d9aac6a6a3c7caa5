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
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from modelmesh.errors import InvalidArgument
from modelmesh.runtimes import tabular
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
from modelmesh.tensor import Parameters, Tensor

SUFFIXES = (".txt", ".lgb", ".model")
FACTOR = 1.0


class LightGBMRuntime(Runtime):
    model_type = "lightgbm"

    def predict_size(self, path: Path) -> int:
        return max(1, int(total_size(path) * FACTOR))

    def load(self, path: Path, model_id: str) -> LoadedModel:
        with load_failures(model_id, self.model_type, path):
            file = model_file(path, self.model_type, SUFFIXES)
        with load_failures(model_id, self.model_type, file):
            lgb = require("lightgbm", self.model_type)
            raw = file.read_bytes()
            if not raw.startswith(b"tree"):
                raise BadModelFile(
                    f"{file.name} is not a LightGBM text model; it looks like "
                    f"{looks_like(raw[:64])}. Is it registered with the wrong model type?"
                )
            check_model_text(raw, file.name)
            text = raw.decode("utf-8")
            booster = lgb.Booster(model_str=text)
            return LightGBMModel(model_id, booster, objective_of(text), len(raw))


_LEAF_ARRAYS = (b"leaf_value", b"leaf_weight", b"leaf_count")
_SPLIT_ARRAYS = (
    b"split_feature", b"split_gain", b"threshold", b"decision_type", b"left_child",
    b"right_child", b"internal_value", b"internal_weight", b"internal_count",
)
# Bytes a number list may hold ("-1.5e-07 inf nan ..."); anything else is corruption.
_NUMBER_BYTES = b"0123456789+-.eE infatINFAT"


def check_model_text(raw: bytes, name: str) -> None:
    """Check a model file's structure before LightGBM parses it.

    LightGBM parses trees in an OpenMP loop and aborts the whole process when a
    tree is malformed (an error thrown inside a parallel region cannot be
    caught), so a truncated or damaged file must be refused here: the trees'
    declared byte sizes, their headers, their array lengths and the characters
    of their numbers are checked, and the parameters section (which LightGBM
    reads without bounds checks) must be complete.
    """

    def bad(why: str) -> BadModelFile:
        return BadModelFile(f"{name} is a damaged LightGBM model: {why}")

    first = raw.find(b"\nTree=")
    end = raw.find(b"\nend of trees")
    if first < 0 or end < 0 or end < first:
        raise bad("no complete tree section (is the file truncated?)")
    params = raw.find(b"\nparameters:", end)
    if params >= 0 and raw.find(b"\nend of parameters", params) < 0:
        raise bad("the parameters section is cut short (is the file truncated?)")
    header = dict(
        line.split(b"=", 1) for line in raw[:first].splitlines() if b"=" in line
    )
    start = first + 1
    try:
        sizes = [int(n) for n in header.get(b"tree_sizes", b"").split()]
    except ValueError as exc:
        raise bad("tree_sizes is not a list of integers") from exc
    if b"tree_sizes" in header:
        if start + sum(sizes) > end + 1:
            raise bad("tree_sizes adds up past the end of the tree section")
        offsets = [start]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        blocks = [raw[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]
    else:
        blocks = [b"Tree=" + b for b in raw[start + len(b"Tree=") : end].split(b"\nTree=")]
    for i, block in enumerate(blocks):
        _check_tree(block, i, bad)


def _check_tree(block: bytes, i: int, bad: Callable[[str], BadModelFile]) -> None:
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
            if key in (b"leaf_value", b"split_feature", b"threshold", b"left_child",
                       b"right_child", b"decision_type", b"cat_boundaries"):
                raise bad(f"tree {i} has no {key.decode()}")
            continue
        if len(value.split()) != count or value.translate(None, _NUMBER_BYTES):
            raise bad(f"tree {i} has a malformed {key.decode()}")


def objective_of(model_text: str) -> str:
    """The objective's name from a model file header (``objective=binary sigmoid:1``)."""
    for line in model_text.splitlines():
        if line.startswith("objective="):
            return line.partition("=")[2].split(" ")[0]
        if line.startswith("Tree="):
            break
    return ""


class LightGBMModel(LoadedModel):
    def __init__(self, model_id: str, booster: Any, objective: str, size: int) -> None:
        self.model_id = model_id
        self.booster = booster
        self.objective = objective
        self.n_features = int(booster.num_feature())
        self.size_bytes = size
        probe = self.predict([Tensor("probe", "FP64", np.zeros((1, self.n_features)))], {})
        self.signature = tabular.signature(self.n_features, "FP64", tabular.specs_of(probe))

    def predict(self, inputs: list[Tensor], parameters: Parameters) -> list[Tensor]:
        x = tabular.feature_matrix(inputs, self.n_features, self.model_id)
        try:
            y = self.booster.predict(x)
        except ValueError as exc:
            raise InvalidArgument(
                f"model '{self.model_id}' rejected the input: {first_line(exc)}"
            ) from exc
        if self.objective == "binary":
            proba = tabular.binary_proba(y)
            return [
                tabular.output(tabular.PREDICT, (proba[:, 1] > 0.5).astype(np.int64)),
                tabular.output(tabular.PREDICT_PROBA, proba),
            ]
        if self.objective in ("multiclass", "multiclassova"):
            return [
                tabular.output(tabular.PREDICT, tabular.class_index(y)),
                tabular.output(tabular.PREDICT_PROBA, y),
            ]
        return [tabular.output(tabular.PREDICT, y)]

    def unload(self) -> None:
        self.booster = None
