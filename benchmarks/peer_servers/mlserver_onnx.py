"""An ONNX runtime for MLServer 1.7.1, which ships none: the MLServer peer's ONNX model.

Loaded by MLServer from ``.venv-mlserver`` (scripts/setup-mlserver installs onnxruntime
pinned to .venv's version); benchmarks/peers.py puts this folder on ``PYTHONPATH`` and
names ``mlserver_onnx.OnnxModel`` as the model's ``implementation``.

It does what MLServer's stock runtimes do, with MLServer's own machinery: inputs decoded
by MLServer's codecs (``MLModel.decode``, NumPy by default), fed to the graph by name;
outputs encoded with ``NumpyCodec`` under the graph's own names (for the demo model
``label`` INT64 and ``probabilities`` FP32), all of them unless the request names some.
onnxruntime runs on CPU with one intra-op thread, as the mesh's ONNX runtime does.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from mlserver.utils import get_model_uri

WELLKNOWN_MODEL_FILENAMES = ["model.onnx"]
ONNX_THREADS = 1

#: onnxruntime element types -> NumPy, to cast a request tensor to what the graph takes.
ONNX_NUMPY = {
    "tensor(float)": np.float32, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


class OnnxModel(MLModel):
    """An ``.onnx`` file run by onnxruntime."""

    async def load(self) -> bool:
        path = await get_model_uri(self._settings, wellknown_filenames=WELLKNOWN_MODEL_FILENAMES)
        options = ort.SessionOptions()
        options.intra_op_num_threads = ONNX_THREADS
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(path, sess_options=options,
                                             providers=["CPUExecutionProvider"])
        self._input_types = {i.name: ONNX_NUMPY.get(i.type) for i in self._session.get_inputs()}
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        names = self._wanted_outputs(payload)
        results = self._session.run(names, self._feed(payload))
        outputs: list[ResponseOutput] = [NumpyCodec.encode_output(name, arr)
                                         for name, arr in zip(names, results, strict=True)]
        return InferenceResponse(model_name=self.name, model_version=self.version,
                                 id=payload.id, outputs=outputs)

    def _feed(self, payload: InferenceRequest) -> dict[str, np.ndarray]:
        """Every request input by its name, cast to the graph's element type."""
        feed = {}
        for request_input in payload.inputs:
            if request_input.name not in self._input_types:
                raise InferenceError(f"unknown input {request_input.name!r}; the model takes "
                                     f"{list(self._input_types)}")
            arr = np.asarray(self.decode(request_input, default_codec=NumpyCodec))
            dtype = self._input_types[request_input.name]
            feed[request_input.name] = arr.astype(dtype, copy=False) if dtype else arr
        return feed

    def _wanted_outputs(self, payload: InferenceRequest) -> list[str]:
        if not payload.outputs:
            return self._output_names
        names = [o.name for o in payload.outputs]
        unknown = [n for n in names if n not in self._output_names]
        if unknown:
            raise InferenceError(f"unknown output(s) {unknown}; the model has "
                                 f"{self._output_names}")
        return names
