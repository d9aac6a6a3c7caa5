"""TorchScript modules (``torch.jit.save``: ``.pt``, ``.pth``, ``.torchscript``), run by torch.

Needs the ``torch`` extra (``pip install pymodelmesh[torch]``: a CPU build;
install a CUDA build of the same version yourself for GPUs).

Device: ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``; the
``MM_TORCH_DEVICE`` environment variable (or ``modelmesh runtime
--torch-device``) names one instead: ``cpu``, ``cuda``, ``cuda:N``. A model
placed on a GPU stays there; inputs are copied to it and outputs back.

Inputs and outputs: request tensors are passed to ``forward`` by the
argument names of its schema when every name matches, else in request order.
``forward`` returns a tensor (output ``output-0``), a tuple or list of
tensors (``output-0``, ``output-1``, ...) or a dict of tensors (its keys).
TorchScript does not record dtypes or shapes, so the signature names the
``forward`` arguments with datatype ``FP32`` and any shape, and no outputs.

Size (the cache counts host and GPU memory apart):
- ``predict_size``: file size x ``FACTOR``; loads onto a GPU hold little host
  memory, but the device is not chosen before loading.
- measured, ``size_bytes`` (host): bytes of the module's parameters and
  buffers when on the CPU; when on a GPU, what the file holds besides them
  (code and constants), at least ``MIN_HOST_BYTES``.
- measured, ``gpu_bytes``: ``torch.cuda.memory_allocated`` on the device
  after the load minus before it; GPU loads are serialized so each delta
  is one model's. 0 on the CPU.

Each ``forward`` runs with ``INTRA_OP_THREADS`` threads (set process-wide at
first load), as ONNX sessions do: requests run in parallel through the
server's thread pool instead of one request spreading over every core.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from modelmesh.errors import InvalidArgument
from modelmesh.runtimes._model_files import (
    BadModelFile,
    first_line,
    load_failures,
    looks_like,
    model_file,
    total_size,
)
from modelmesh.runtimes.base import LoadedModel, Runtime
from modelmesh.runtimes.tabular import output
from modelmesh.storage.paths import FileScope
from modelmesh.tensor import ModelSignature, Parameters, Tensor, TensorSpec

log = logging.getLogger(__name__)

SUFFIXES = (".pt", ".pth", ".torchscript")
FACTOR = 1.2
MIN_HOST_BYTES = 64 * 1024
INTRA_OP_THREADS = 1

_gpu_load_lock = threading.Lock()
_threads_set = False


class TorchScriptRuntime(Runtime):
    model_type = "torchscript"
    suffixes = SUFFIXES

    def __init__(self, device: str = "") -> None:
        #: Device to load onto; "" = ``MM_TORCH_DEVICE``, else cuda when available, else cpu.
        self.device = device

    def predict_size(self, path: Path, scope: FileScope | None = None) -> int:
        return max(1, int(total_size(path, scope) * FACTOR))

    def resolve_device(self, torch: Any) -> Any:
        wanted = self.device or os.environ.get("MM_TORCH_DEVICE", "")
        if not wanted:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(wanted)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BadModelFile(f"device '{wanted}' was asked for but CUDA is not available")
        return device

    def load(self, path: Path, model_id: str, scope: FileScope | None = None) -> LoadedModel:
        scope = scope or FileScope.of_model(path)
        with load_failures(model_id, self.model_type, path):
            file = model_file(path, self.model_type, SUFFIXES, scope)
        with load_failures(model_id, self.model_type, file), scope.open(file, resolved=True) as f:
            torch = _import_torch()
            _limit_threads(torch)
            head = f.read(64)
            if not head.startswith(b"PK\x03\x04"):
                raise BadModelFile(
                    f"{file.name} is not a TorchScript archive (a zip written by "
                    f"torch.jit.save); it looks like {looks_like(head)}"
                )
            f.seek(0)
            file_size = os.fstat(f.fileno()).st_size
            device = self.resolve_device(torch)
            if device.type == "cuda":
                with _gpu_load_lock:
                    before = torch.cuda.memory_allocated(device)
                    module = _jit_load(torch, f, device)
                    torch.cuda.synchronize(device)
                    gpu = torch.cuda.memory_allocated(device) - before
            else:
                module = _jit_load(torch, f, device)
                gpu = 0
            module.eval()
            return TorchScriptModel(model_id, module, device, file_size, gpu, torch)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise BadModelFile(
            "model type 'torchscript' needs the torch package: pip install pymodelmesh[torch]"
        ) from exc
    return torch


def _jit_load(torch: Any, file: BinaryIO, device: Any) -> Any:
    """Load from the file already opened (and checked) by the runtime's ``FileScope``."""
    with warnings.catch_warnings():
        # Recent torch deprecates torch.jit for torch.export; saved modules still load.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
        return torch.jit.load(file, map_location=device)


def _limit_threads(torch: Any) -> None:
    global _threads_set
    if not _threads_set:
        torch.set_num_threads(INTRA_OP_THREADS)
        _threads_set = True


def _tensor_bytes(module: Any) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class TorchScriptModel(LoadedModel):
    def __init__(self, model_id: str, module: Any, device: Any, file_size: int, gpu_bytes: int,
                 torch: Any) -> None:
        self.model_id = model_id
        self.module = module
        self.device = device
        self._torch = torch
        weights = _tensor_bytes(module)
        if device.type == "cuda":
            self.gpu_bytes = max(gpu_bytes, weights)
            self.size_bytes = max(file_size - weights, MIN_HOST_BYTES)
        else:
            self.gpu_bytes = 0
            self.size_bytes = max(weights, file_size, 1)
        self.arg_names = self._arguments()
        self.signature = ModelSignature(
            inputs=tuple(TensorSpec(n, "FP32", (-1,)) for n in self.arg_names), outputs=()
        )

    def _arguments(self) -> list[str]:
        try:
            schema = self.module.forward.schema
            return [a.name for a in schema.arguments if a.name != "self"]
        except (AttributeError, RuntimeError):  # a traced module may lack a schema
            return []

    def predict(self, inputs: list[Tensor], parameters: Parameters) -> list[Tensor]:
        torch = self._torch
        names = [t.name for t in inputs]
        if self.arg_names and sorted(names) == sorted(self.arg_names):
            by_name = {t.name: t for t in inputs}
            ordered = [by_name[n] for n in self.arg_names]
        else:
            if self.arg_names and len(inputs) != len(self.arg_names):
                raise InvalidArgument(
                    f"model '{self.model_id}' takes {len(self.arg_names)} inputs "
                    f"({', '.join(self.arg_names)}), got {len(inputs)}"
                )
            ordered = inputs
        args = []
        for t in ordered:
            if t.data.dtype.kind not in "biuf":
                raise InvalidArgument(
                    f"input '{t.name}' has datatype {t.datatype}; model '{self.model_id}' "
                    "takes numeric tensors"
                )
            # Request arrays are read-only views of the request bytes; torch needs its own.
            args.append(torch.from_numpy(np.array(t.data)).to(self.device))
        try:
            with torch.inference_mode():
                result = self.module(*args)
        except RuntimeError as exc:  # shape or dtype mismatches inside forward
            raise InvalidArgument(
                f"model '{self.model_id}' rejected the input: {first_line(exc)}"
            ) from exc
        return self._outputs(result)

    def _outputs(self, result: Any) -> list[Tensor]:
        torch = self._torch
        if isinstance(result, torch.Tensor):
            items = [("output-0", result)]
        elif isinstance(result, tuple | list):
            items = [(f"output-{i}", r) for i, r in enumerate(result)]
        elif isinstance(result, dict):
            items = [(str(k), v) for k, v in result.items()]
        else:
            raise InvalidArgument(
                f"model '{self.model_id}' returned {type(result).__name__}; "
                "expected a tensor, a tuple or list of tensors, or a dict of tensors"
            )
        out = []
        for name, value in items:
            if not isinstance(value, torch.Tensor):
                raise InvalidArgument(
                    f"model '{self.model_id}' output '{name}' is a {type(value).__name__}, "
                    "not a tensor"
                )
            out.append(output(name, value.detach().cpu().numpy()))
        return out

    def unload(self) -> None:
        on_gpu = self.device.type == "cuda"
        self.module = None
        if on_gpu:
            self._torch.cuda.empty_cache()
