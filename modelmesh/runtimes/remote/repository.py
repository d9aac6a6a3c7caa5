"""The repository adapter: V2 servers with a model repository (MLServer, Triton).

Such a server has no load call that takes a path: the adapter writes each
model into the server's repository directory in the server's layout
(``MLSERVER_IMPLEMENTATIONS``, ``TRITON_LAYOUTS``), then asks the server to
load it by name. V2 servers report no sizes: the mesh's own prediction for the
format is used (``UNKNOWN_FORMAT_FACTOR`` for formats the mesh does not know).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2 as pb

from modelmesh.errors import InvalidArgument, MeshError, ModelLoadFailed, Unavailable
from modelmesh.registry.records import ModelRecord
from modelmesh.runtimes import MODEL_TYPES, get_runtime
from modelmesh.runtimes._model_files import BadModelFile, model_file, total_size
from modelmesh.runtimes.formats import known_format
from modelmesh.runtimes.loader import EmbeddedLoader
from modelmesh.runtimes.remote.model import (
    CALL_TIMEOUT_S,
    RemoteLoader,
    RemoteModel,
    _mesh_error,
)
from modelmesh.settings import RuntimeAddress

log = logging.getLogger(__name__)

#: Size factor over the file size for formats the mesh has no runtime for.
UNKNOWN_FORMAT_FACTOR = 2.0
#: File in each directory the repository adapter writes, naming the model id.
MARKER = ".modelmesh-model"

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

#: MLServer implementation class for each model type.
MLSERVER_IMPLEMENTATIONS = {
    "sklearn": "mlserver_sklearn.SKLearnModel",
    "xgboost": "mlserver_xgboost.XGBoostModel",
    "lightgbm": "mlserver_lightgbm.LightGBMModel",
}
#: Triton: file name inside the version directory and config line for each model type.
#: (Its PyTorch backend cannot infer a TorchScript model's inputs: register a directory
#: with its own config.pbtxt for those.)
TRITON_LAYOUTS = {
    "onnx": ("model.onnx", 'backend: "onnxruntime"'),
}


class RepositoryRuntimeLoader(RemoteLoader):
    """The cache's ``ModelLoader`` for a V2 server with a model repository (MLServer, Triton).

    Loading writes the model into the server's repository directory, as the
    server expects it, then calls ``RepositoryModelLoad``; unloading calls
    ``RepositoryModelUnload`` and removes the directory.

    - MLServer: ``<repo>/<name>/model-settings.json`` naming the implementation
      for the type (``MLSERVER_IMPLEMENTATIONS``) and the model file beside it.
    - Triton: ``<repo>/<name>/config.pbtxt`` with the backend for the type
      (``TRITON_LAYOUTS``) and the file as ``<repo>/<name>/1/model.*``.
    - A model path that is a directory already laid out for the server (it
      holds ``model-settings.json`` for MLServer, ``config.pbtxt`` for Triton)
      is used as it is, for any type the server supports.

    Files are hard-linked where the repository is on the same filesystem as
    the models root (or the disk cache, for models pulled from storage), else
    copied, so the server needs to see the repository directory only.
    ``<name>`` is the model id when it is a safe directory name (letters,
    digits, ``.``, ``_``, ``-``; at most 100), else ``mm-`` and a hash of the
    id; the server knows the model by that name, and every request's
    ``model_name`` is set to it.
    """

    def __init__(self, address: RuntimeAddress, repository: Path, files: EmbeddedLoader, *,
                 load_timeout_s: float = 120.0, max_message_bytes: int = 16 << 20,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        super().__init__(address, load_timeout_s=load_timeout_s,
                         max_message_bytes=max_message_bytes, credentials=credentials)
        self.flavor = address.kind
        self.repository = Path(repository)
        #: Where model files come from (the models root, or storage through the disk cache).
        self.files = files
        self.inject_field = 1  # the server knows models by model_name only

    def runtime_name(self, model_id: str) -> str:
        if _SAFE_NAME.fullmatch(model_id) and model_id not in (".", ".."):
            return model_id
        return "mm-" + hashlib.sha256(model_id.encode()).hexdigest()[:32]

    def wait_ready(self, timeout: float) -> None:
        """Wait for the server, then unload and remove what an earlier mesh left behind."""
        self.repository.mkdir(parents=True, exist_ok=True)
        self.wait_server_ready(timeout)
        for marker in self.repository.glob(f"*/{MARKER}"):
            name = marker.parent.name
            log.info("%s: removing leftover model %s", self.describe(), name)
            self._unload_name(name)
            shutil.rmtree(marker.parent, ignore_errors=True)

    def predict_size(self, record: ModelRecord) -> int:
        if _format(record) in MODEL_TYPES:
            return self.files.predict_size(record)
        with self.files.local_files(record) as path:
            return max(1, int(total_size(path) * UNKNOWN_FORMAT_FACTOR))

    def load(self, record: ModelRecord) -> RemoteModel:
        model_id = record.model_id
        name = self.runtime_name(model_id)
        try:
            size = self.predict_size(record)
            with self.files.local_files(record) as source:
                self._materialise(record, source, name)
        except (OSError, MeshError) as exc:
            reason = exc.message if isinstance(exc, MeshError) else f"{type(exc).__name__}: {exc}"
            raise ModelLoadFailed(model_id, reason) from None
        try:
            self.v2.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name),
                                        timeout=self.load_timeout_s)
        except grpc.RpcError as exc:
            self._unload_name(name)
            shutil.rmtree(self.repository / name, ignore_errors=True)
            code = exc.code()  # type: ignore[attr-defined]
            details = exc.details() or code.name  # type: ignore[attr-defined]
            if code is grpc.StatusCode.UNAVAILABLE:
                details = f"{self.describe()} is unavailable ({details})"
            raise ModelLoadFailed(model_id, details) from None
        return RemoteModel(self, record, size, self.signature(model_id))

    def reload(self, record: ModelRecord) -> None:
        name = self.runtime_name(record.model_id)
        try:
            if not (self.repository / name / MARKER).exists():
                with self.files.local_files(record) as source:
                    self._materialise(record, source, name)
            self.v2.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name),
                                        timeout=self.load_timeout_s)
        except grpc.RpcError as exc:
            raise _mesh_error(exc, self.describe()) from None
        except OSError as exc:
            raise Unavailable(f"{type(exc).__name__}: {exc}") from None

    def unload_model(self, model_id: str) -> None:
        name = self.runtime_name(model_id)
        self._unload_name(name)
        shutil.rmtree(self.repository / name, ignore_errors=True)

    def _unload_name(self, name: str) -> None:
        try:
            self.v2.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name),
                                          timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                log.warning("%s: unloading %s failed: %s: %s", self.describe(), name,
                            exc.code().name, exc.details())  # type: ignore[attr-defined]

    # -- writing the model into the repository ---------------------------------------------

    def _materialise(self, record: ModelRecord, source: Path, name: str) -> None:
        """Write the model's directory for the server: in a temporary name, then renamed."""
        target = self.repository / name
        staging = self.repository / f".{name}.{os.getpid()}.{threading.get_ident()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            if self.flavor == "mlserver":
                self._mlserver_layout(record, source, name, staging)
            else:
                self._triton_layout(record, source, staging)
            (staging / MARKER).write_text(record.model_id)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _mlserver_layout(self, record: ModelRecord, source: Path, name: str, out: Path) -> None:
        if source.is_dir() and (source / "model-settings.json").is_file():
            _link_tree(source, out)
            settings = json.loads((source / "model-settings.json").read_text())
            settings["name"] = name
            (out / "model-settings.json").unlink()
            (out / "model-settings.json").write_text(json.dumps(settings, indent=2))
            return
        implementation = MLSERVER_IMPLEMENTATIONS.get(_format(record))
        if implementation is None:
            raise InvalidArgument(
                f"MLServer has no runtime here for model type '{_format(record)}' "
                f"(supported: {', '.join(MLSERVER_IMPLEMENTATIONS)}); or register a directory "
                "holding its own model-settings.json"
            )
        file = self._model_file(record, source)
        if source.is_dir():
            _link_tree(source, out)
            uri = f"./{file.relative_to(source)}"
        else:
            _link(file, out / file.name)
            uri = f"./{file.name}"
        settings = {"name": name, "implementation": implementation, "parameters": {"uri": uri}}
        (out / "model-settings.json").write_text(json.dumps(settings, indent=2))

    def _triton_layout(self, record: ModelRecord, source: Path, out: Path) -> None:
        if source.is_dir() and (source / "config.pbtxt").is_file():
            _link_tree(source, out)
            return
        layout = TRITON_LAYOUTS.get(_format(record))
        if layout is None:
            raise InvalidArgument(
                f"no Triton layout here for model type '{_format(record)}' (supported: "
                f"{', '.join(TRITON_LAYOUTS)}); or register a directory holding its own "
                "config.pbtxt and version directories"
            )
        filename, backend = layout
        (out / "1").mkdir()
        _link(self._model_file(record, source), out / "1" / filename)
        (out / "config.pbtxt").write_text(f"{backend}\nmax_batch_size: 0\n")

    @staticmethod
    def _model_file(record: ModelRecord, source: Path) -> Path:
        """The model file in ``source``, found as the mesh's own runtime for the type finds it."""
        suffixes: tuple[str, ...] = ()
        fmt = _format(record)
        if fmt in MODEL_TYPES:
            suffixes = get_runtime(fmt).suffixes
        try:
            return model_file(source, fmt, suffixes)
        except BadModelFile as exc:
            raise InvalidArgument(str(exc)) from None


def _format(record: ModelRecord) -> str:
    """The record's format as the mesh names it (``mt:sklearn`` -> ``sklearn``), else its
    type as registered."""
    return known_format(record.model_type, record.storage_key) or record.model_type


def _link(source: Path, target: Path) -> None:
    """Hard-link ``source`` as ``target``; copy where a link cannot be made."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _link_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            _link(path, dest)
