"""Models on the local filesystem, confined to the configured models root."""

from __future__ import annotations

from pathlib import Path

from modelmesh.errors import InvalidArgument
from modelmesh.registry.records import ModelRecord
from modelmesh.runtimes import get_runtime
from modelmesh.runtimes.base import LoadedModel


def resolve_model_path(models_root: Path, path: str) -> Path:
    """Resolve a registered path against the models root, refusing escapes.

    Accepts a path relative to the root, an absolute path inside it, or a
    ``file://`` URI of either. Symlinks are followed before the check, so a link
    that points outside the root is refused too.
    """
    if not path:
        raise InvalidArgument("model path must not be empty")
    raw = path.removeprefix("file://")
    if "://" in raw:
        scheme = raw.split("://", 1)[0]
        raise InvalidArgument(
            f"model path '{path}': storage scheme '{scheme}://' is not supported yet; "
            "use a path under the models root"
        )
    root = models_root.resolve()
    candidate = Path(raw)
    full = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not full.is_relative_to(root):
        raise InvalidArgument(
            f"model path '{path}' resolves outside the models root '{models_root}'"
        )
    return full


class LocalModelLoader:
    """The cache's ``ModelLoader`` for files under ``models_root``."""

    def __init__(self, models_root: Path) -> None:
        self.models_root = Path(models_root)

    def _locate(self, record: ModelRecord) -> Path:
        full = resolve_model_path(self.models_root, record.path)
        if not full.exists():
            raise FileNotFoundError(f"model file '{record.path}' not found under the models root")
        return full

    def predict_size(self, record: ModelRecord) -> int:
        return get_runtime(record.model_type).predict_size(self._locate(record))

    def load(self, record: ModelRecord) -> LoadedModel:
        return get_runtime(record.model_type).load(self._locate(record), record.model_id)
