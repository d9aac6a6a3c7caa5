"""One model behind KServe's Python ModelServer: the KServe peer of the benchmarks.

Run by ``.venv-kserve/bin/python`` (scripts/setup-kserve), never imported by the mesh's
environment: KServe's protobuf stubs cannot share a process with tritonclient's.

    kserve_server.py --model_name iris-lr --model_type sklearn --model_path m.joblib \
        --grpc_port 8081 --http_port 8080

The flags are KServe's own (``kserve.model_server.parser``, which KServe also reads from
``sys.argv`` when it is imported) plus ``--model_type``/``--model_path``/``--log_level``.

What is served, over KServe V2 gRPC (``inference.GRPCInferenceService``) and REST:
- ``sklearn``: a joblib file; one output ``predict`` (the model's ``predict``, INT64 [N]);
- ``onnx``: onnxruntime on CPU with one intra-op thread (as the mesh runs it); every
  model output under its own name (``label`` INT64 [N], ``probabilities`` FP32 [N, 3]).

Configuration, chosen to be KServe's fastest for one process rather than its defaults:
one uvicorn worker (no REST process pool: the benchmark speaks gRPC only), a synchronous
``predict`` (KServe calls it inline on the event loop, as its own sklearn server does: no
thread hop for a sub-millisecond model), no per-request latency log line, and the
``kserve`` logger at WARNING (at INFO its gRPC interceptor logs a line per call).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.errors import InvalidInput
from kserve.model_server import parser as kserve_parser
from kserve.utils.numpy_codec import from_np_dtype

ONNX_THREADS = 1  # like the mesh's ONNX runtime (modelmesh/runtimes/onnx.py)


class PeerModel(Model):
    """A scikit-learn or ONNX model answering V2 requests with KServe's own types."""

    def __init__(self, name: str, model_type: str, path: Path) -> None:
        super().__init__(name)
        self.model_type = model_type
        self.path = path
        self._run: Any = None

    def load(self) -> bool:
        """Load the file; KServe refuses to start unless a registered model is ready."""
        if self.model_type == "sklearn":
            self._run = _sklearn_runner(self.path)
        elif self.model_type == "onnx":
            self._run = _onnx_runner(self.path)
        else:
            raise ValueError(f"unknown model type {self.model_type!r}")
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                response_headers: dict[str, str] | None = None) -> InferResponse:
        """Run the model on the first input and answer in the request's encoding.

        Raw (binary) in, raw out: tritonclient sends ``raw_input_contents``, and
        ``use_binary_outputs`` makes KServe answer with ``raw_output_contents``.
        """
        x = payload.inputs[0].as_numpy()
        results: dict[str, np.ndarray] = self._run(x)
        if payload.request_outputs:
            results = _requested(results, [o.name for o in payload.request_outputs])
        binary = payload.use_binary_outputs
        outputs = [_infer_output(name, arr, binary) for name, arr in results.items()]
        return InferResponse(response_id=payload.id or "", model_name=self.name,
                             infer_outputs=outputs, use_binary_outputs=binary)


def _requested(results: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The requested outputs, in the order asked; an unknown name is the client's error."""
    unknown = [n for n in names if n not in results]
    if unknown:
        raise InvalidInput(f"unknown output(s) {unknown}; the model has {list(results)}")
    return {n: results[n] for n in names}


def _infer_output(name: str, arr: np.ndarray, binary: bool) -> InferOutput:
    out = InferOutput(name=name, shape=list(arr.shape), datatype=from_np_dtype(arr.dtype))
    out.set_data_from_numpy(arr, binary_data=binary)
    return out


def _sklearn_runner(path: Path) -> Any:
    """``predict`` only, as INT64: what the mesh's sklearn runtime answers by default."""
    import joblib

    model = joblib.load(path)

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"predict": np.asarray(model.predict(x)).astype(np.int64, copy=False)}

    return run


def _onnx_runner(path: Path) -> Any:
    """Every output of the graph under its own name; inputs cast to the model's FP32."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = ONNX_THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_names = [o.name for o in session.get_outputs()]

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        feed = {input_name: x.astype(np.float32, copy=False)}
        return dict(zip(output_names, session.run(output_names, feed), strict=True))

    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(parents=[kserve_parser], description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", choices=("sklearn", "onnx"), required=True)
    parser.add_argument("--model_path", type=Path, required=True)
    parser.add_argument("--log_level", default="WARNING")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = PeerModel(args.model_name, args.model_type, args.model_path)
    model.load()
    server = ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1,
                         enable_latency_logging=False, grace_period=5)
    for name in ("kserve", "kserve.trace", "uvicorn", "uvicorn.access"):
        logging.getLogger(name).setLevel(args.log_level)
    server.start([model])


if __name__ == "__main__":
    main()
