"""What every runtime does with a model path before its library sees it.

Finding the model file (a path may name the file or a directory holding it),
opening it only within its ``FileScope`` (``modelmesh.storage.paths``: under
the models root, a regular file, not too large), telling the user what a
file looks like when it is not what the model type expects, importing the
format's library on first use, and turning any load failure into
``ModelLoadFailed`` with a reason the cache can record.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from modelmesh.errors import MeshError, ModelLoadFailed
from modelmesh.storage.paths import FileScope, os_error

# Magic numbers of the compressors joblib can use (zlib, gzip, bz2, xz, lz4).
_COMPRESSED = (
    b"\x78\x01",
    b"\x78\x5e",
    b"\x78\x9c",
    b"\x78\xda",
    b"\x1f\x8b",
    b"BZh",
    b"\xfd7zXZ",
    b"\x04\x22\x4d\x18",
)


class BadModelFile(Exception):
    """The file is not a model of the expected format; the message says why."""


def model_file(path: Path, model_type: str, suffixes: tuple[str, ...],
               scope: FileScope | None = None) -> Path:
    """The model file at ``path``: the path itself, or the one file in a directory.

    In a directory, files with one of ``suffixes`` are preferred; if there are
    none and the directory holds exactly one regular file, that file is used.
    The file is returned resolved, after ``scope`` (default: the model's own
    directory) has checked it: under its root, a regular file, not too large.
    Open it with ``scope.open`` / ``scope.read_bytes`` (``resolved=True``: it need not
    be resolved again).
    """
    scope = scope or FileScope.of_model(path)
    if not os.path.lexists(path):
        raise BadModelFile(f"model path {path} does not exist")
    real = scope.resolve(path)
    if not os.path.isdir(real):  # a file, or what it is instead (a FIFO, a device) is said
        return scope.regular_file(real, resolved=True)
    try:
        with os.scandir(real) as entries:
            files = sorted(Path(e.path) for e in entries
                           if not e.name.startswith(".") and e.is_file())
    except OSError as exc:
        raise os_error(exc, f"'{scope.shown(real)}'") from None
    matching = [p for p in files if p.name.lower().endswith(suffixes)]
    candidates = matching or files
    if len(candidates) == 1:
        return scope.regular_file(candidates[0])
    wanted = "/".join(suffixes)
    if not candidates:
        raise BadModelFile(f"directory {path} holds no {model_type} model file ({wanted})")
    names = ", ".join(p.name for p in candidates)
    raise BadModelFile(
        f"directory {path} holds several candidate {model_type} model files ({names}); "
        f"point the model path at one of them"
    )


def total_size(path: Path, scope: FileScope | None = None) -> int:
    """Bytes under ``path``: the file's size, or the sum over a directory's files.

    Only files inside ``scope`` (default: the model's own directory) count.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path} does not exist")
    scope = scope or FileScope.of_model(path)
    real = scope.resolve(path)
    if not os.path.isdir(real):
        return os.stat(real).st_size
    return sum(os.stat(f).st_size for f in scope.walk(real))


def is_compressed(head: bytes) -> bool:
    return head.startswith(_COMPRESSED)


def looks_like(head: bytes) -> str:
    """A short guess at what a file is, from its first bytes, for error messages."""
    stripped = head.lstrip()
    if not head:
        return "an empty file"
    if head.startswith(b"\x80") and len(head) > 1 and 2 <= head[1] <= 5:
        return "a Python pickle (sklearn/joblib)"
    if is_compressed(head):
        return "a compressed file (compressed joblib?)"
    if head.startswith(b"tree\n") or head.startswith(b"tree\r\n"):
        return "a LightGBM text model"
    if stripped.startswith(b"{"):
        # UBJSON objects open with '{' and a typed key marker; JSON with whitespace or '"'.
        if re.match(rb"\{\s*\"", stripped):
            if b'"learner"' in head or b'"version"' in head:
                return "an XGBoost JSON model"
            return "a JSON document"
        return "a UBJSON document (XGBoost .ubj?)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (TorchScript?)"
    if head.startswith(b"\x08") and b"\x12" in head[:16]:
        return "a protobuf message (ONNX?)"
    return "none of the known model formats"


def read_head(path: Path, n: int = 64, scope: FileScope | None = None) -> bytes:
    """The first ``n`` bytes of a model file, opened within ``scope`` (see ``model_file``)."""
    return (scope or FileScope.of_model(path)).read_head(path, n)


def require(module: str, model_type: str) -> ModuleType:
    """Import a format's library on first use, with an install hint if it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise BadModelFile(
            f"model type '{model_type}' needs the {package} package: "
            f"pip install pymodelmesh[{model_type}]"
        ) from exc


def first_line(exc: BaseException) -> str:
    """A library error's message without stack traces or ``[time] file:line:`` noise."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", line)


@contextmanager
def load_failures(model_id: str, model_type: str, path: Path) -> Iterator[None]:
    """Turn any exception raised while loading into ``ModelLoadFailed``.

    ``BadModelFile`` messages are used as they are; anything else raised by the
    format's library is reported with what the file looks like, since the most
    common cause is a model registered with the wrong type. The mesh's own errors
    pass as they are: a file refused by its ``FileScope`` (``StorageError``, a
    path the filesystem cannot take, a file too large) is not a bad model.
    """
    try:
        yield
    except MeshError:
        raise
    except BadModelFile as exc:
        raise ModelLoadFailed(model_id, str(exc)) from exc
    except Exception as exc:
        what = ""
        try:
            if os.path.isfile(path) and not os.path.islink(path):
                what = f"; the file looks like {looks_like(read_head(path))}"
        except (OSError, MeshError):
            pass  # the library's own error below is the better report
        detail = first_line(exc)
        cause = type(exc).__name__ + (f": {detail}" if detail != type(exc).__name__ else "")
        raise ModelLoadFailed(
            model_id, f"{path.name} is not a valid {model_type} model ({cause}){what}"
        ) from exc
