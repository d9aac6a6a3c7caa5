"""The embedded loader: a model's files (``modelmesh.storage``) read by its format's runtime.

This is the cache's ``ModelLoader`` when models run in the mesh process, and
the runtime server's loader (``modelmesh runtime``). Either way the files are
located and checked by ``ModelFiles`` and opened by the runtime only within
their ``FileScope`` (under the models root, or in their disk cache entry).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from modelmesh.registry.records import ModelRecord
from modelmesh.runtimes import get_runtime
from modelmesh.runtimes.base import LoadedModel, Runtime
from modelmesh.runtimes.formats import model_format
from modelmesh.storage import ModelFiles


def runtime_for(record: ModelRecord) -> Runtime:
    """The embedded runtime of a record's format (``mt:onnx``, ``onnx``, or the JSON key's
    ``model_type``: ``modelmesh.runtimes.formats``)."""
    return get_runtime(model_format(record.model_type, record.storage_key))


class EmbeddedLoader:
    """Loads models in this process: files from ``files``, formats from ``modelmesh.runtimes``."""

    def __init__(self, files: ModelFiles) -> None:
        self.files = files

    def local_files(self, record: ModelRecord) -> AbstractContextManager[Path]:
        """The model's files on local disk for the duration of a ``with`` block."""
        return self.files.local_files(record)

    def inline(self, record: ModelRecord) -> bool:
        """Whether the model's files are read where they are (nothing to download)."""
        return self.files.is_local(record)

    def predict_size(self, record: ModelRecord) -> int:
        return self.files.predict_size(record, runtime_for(record).predict_size)

    def load(self, record: ModelRecord) -> LoadedModel:
        runtime = runtime_for(record)
        with self.files.located(record) as model:
            # The runtime opens its files within the scope they were checked in.
            return runtime.load(model.path, record.model_id, model.scope)
