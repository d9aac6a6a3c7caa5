"""The runtime interface: how the mesh loads, measures, runs and unloads a model.

A ``Runtime`` knows one model format. Its methods are synchronous and may be
slow; the cache calls them off the event loop (in a thread pool). A
``LoadedModel`` is one model in memory; ``predict`` may be called from several
threads at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from modelmesh.storage.paths import FileScope
from modelmesh.tensor import ModelSignature, Parameters, Tensor


class LoadedModel(ABC):
    """A model resident in memory, ready to serve."""

    #: Bytes this model occupies once loaded (measured after load).
    size_bytes: int
    #: Declared inputs and outputs, for ModelMetadata.
    signature: ModelSignature
    #: Bytes of accelerator (GPU) memory this model holds, counted apart from
    #: ``size_bytes`` (host memory); 0 for models that run on the CPU.
    gpu_bytes: int = 0
    #: Whether every output has one row per input row, so that requests can be
    #: stacked along the first axis, predicted together and split back
    #: (``modelmesh.batching``).
    batchable: bool = False
    #: Whether the model takes serialized V2 requests as they are (``infer_raw``):
    #: a model in a runtime server gets the client's bytes untouched.
    passes_bytes: bool = False

    @abstractmethod
    def predict(self, inputs: list[Tensor], parameters: Parameters) -> list[Tensor]:
        """Run inference. Raise ``modelmesh.errors.InvalidArgument`` for bad inputs."""

    def predict_outputs(self, inputs: list[Tensor], parameters: Parameters,
                        requested: Sequence[str]) -> list[Tensor]:
        """Run inference for the outputs named in ``requested`` (all when empty).

        May return more outputs than requested (the caller keeps only those asked
        for); a runtime overrides it where leaving an output out saves work, e.g. a
        classifier asked only for its labels skips its probabilities.
        """
        return self.predict(inputs, parameters)

    async def infer_raw(self, request: bytes,
                        metadata: Sequence[tuple[str, str | bytes]] = ()) -> bytes:
        """Serve a serialized ``ModelInferRequest``; only where ``passes_bytes`` is set."""
        raise NotImplementedError(f"{type(self).__name__} does not take requests as bytes")

    def unload(self) -> None:  # noqa: B027 - optional hook
        """Release resources held outside the Python heap (sessions, boosters)."""


class Runtime(ABC):
    """A model format (sklearn, xgboost, ...)."""

    #: The model type users register (``--type``).
    model_type: str
    #: File name suffixes of this format, preferred when a model path is a directory.
    suffixes: tuple[str, ...] = ()

    @abstractmethod
    def predict_size(self, path: Path, scope: FileScope | None = None) -> int:
        """Estimate the loaded size in bytes before loading (cheap: file sizes)."""

    @abstractmethod
    def load(self, path: Path, model_id: str, scope: FileScope | None = None) -> LoadedModel:
        """Load the model at ``path``; raise an exception with a clear reason on failure.

        Every file it opens is opened through ``scope`` (``_model_files.model_file``,
        ``FileScope.open``): under the models root (or the model's disk cache entry),
        a regular file, not larger than the model memory. Without a scope, the
        model's own directory is the root.
        """
