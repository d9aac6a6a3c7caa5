"""The model format a registration names, in the forms ModelMesh's clients send it.

ModelMesh treats ``ModelInfo.type`` and ``key`` as opaque values for its
runtime. The modelmesh-serving controller fills them like this:

* ``type`` is a placement label: ``mt:<format>`` or ``mt:<format>:<version>``
  (the predictor's model format), optionally followed by ``|pv:<protocol>``, or
  ``rt:<runtime>`` when the predictor names a serving runtime;
* ``key`` is a JSON ``ModelKeyInfo``: ``{"storage_key": ..., "storage_params":
  {...}, "model_type": {"name": ..., "version": ...}, "schema_path": ...}``.

The embedded runtimes need a format; ``model_format`` finds it in either place
(a plain type such as ``onnx`` keeps working). With a runtime server the values
are passed through untouched and the runtime decides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from modelmesh.errors import InvalidArgument

#: Format names clients use -> the embedded runtime's type.
FORMAT_NAMES: dict[str, str] = {
    "sklearn": "sklearn",
    "scikit-learn": "sklearn",
    "xgboost": "xgboost",
    "lightgbm": "lightgbm",
    "onnx": "onnx",
    "torchscript": "torchscript",
    "pytorch": "torchscript",  # KServe's name for TorchScript models
    "identity": "identity",
}


@dataclass(frozen=True, slots=True)
class TypeLabel:
    """The parts of a ``ModelInfo.type``."""

    plain: str = ""  # a bare type: "onnx"
    format: str = ""  # mt:<format>
    version: str = ""  # mt:<format>:<version>
    runtime: str = ""  # rt:<runtime>
    protocol: str = ""  # pv:<protocol>


def parse_type(text: str) -> TypeLabel:
    """Split a type into its ``|``-separated parts (unknown prefixes count as plain)."""
    plain = fmt = version = runtime = protocol = ""
    for part in (p.strip() for p in text.split("|")):
        if part.startswith("mt:"):
            fmt, _, version = part[3:].partition(":")
        elif part.startswith("rt:"):
            runtime = part[3:]
        elif part.startswith("pv:"):
            protocol = part[3:]
        elif part and not plain:
            plain = part
    return TypeLabel(plain, fmt, version, runtime, protocol)


def key_model_type(key: str) -> str:
    """``model_type.name`` of a JSON key ("" when the key is not JSON or names none).

    A malformed JSON key is reported where the key is read for storage.
    """
    text = (key or "").strip()
    if not text.startswith("{"):
        return ""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return ""
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if isinstance(model_type, dict):
        name = model_type.get("name")
        return name if isinstance(name, str) else ""
    return model_type if isinstance(model_type, str) else ""


def format_name(model_type: str, key: str = "") -> str:
    """The format name a registration gives: ``mt:`` label, else a plain type, else the
    key's ``model_type.name`` ("" when none of them says)."""
    label = parse_type(model_type)
    return label.format or label.plain or key_model_type(key)


def model_format(model_type: str, key: str = "") -> str:
    """The embedded runtime type for a registration; ``InvalidArgument`` if there is none."""
    name = format_name(model_type, key)
    found = FORMAT_NAMES.get(name.strip().lower())
    if found is not None:
        return found
    known = ", ".join(sorted(FORMAT_NAMES))
    if not name:
        raise InvalidArgument(
            f"model type '{_short(model_type)}' names no model format (give a type such as "
            f"onnx or mt:onnx, or model_type.name in a JSON key; known: {known})")
    raise InvalidArgument(f"unknown model type '{_short(name)}' (known: {known})")


def known_format(model_type: str, key: str = "") -> str | None:
    """``model_format``, or None where the mesh's runtimes do not know the format."""
    return FORMAT_NAMES.get(format_name(model_type, key).strip().lower())


def accepted(model_type: str, key: str, accepted_types: frozenset[str]) -> bool:
    """Whether a registration passes ``--accepted-model-types`` (empty: all are).

    A type is accepted when the list holds it as given (``mt:onnx``), or its
    format name as given (``onnx`` for ``mt:onnx:1``), or the runtime type that
    format maps to (``torchscript`` for ``pytorch``).
    """
    if not accepted_types or model_type in accepted_types:
        return True
    name = format_name(model_type, key)
    return bool(name) and (name in accepted_types or known_format(model_type, key)
                           in accepted_types)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def check_format(model_type: str, path: str = "", key: str = "") -> None:
    """A registration check for the embedded runtimes' formats only (location unchecked)."""
    model_format(model_type, key)
