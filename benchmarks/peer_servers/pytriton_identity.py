"""Triton Inference Server (through NVIDIA PyTriton) serving identity models like the mesh's.

The reference for ``benchmarks/triton_compare.py``. Runs under .venv-pytriton's python
(scripts/setup-pytriton) with LD_LIBRARY_PATH at its Python's lib directory (the python
backend stub links libpython3.11). Each model echoes its inputs as outputs of the same
name and datatype, plus ``parameters``: BYTES [1], the request parameters as JSON with
sorted keys, as the mesh's ``identity`` runtime does (modelmesh/runtimes/identity.py).
Stops on SIGINT (Triton's own shutdown), not SIGTERM.

    python pytriton_identity.py HTTP_PORT GRPC_PORT METRICS_PORT MODELS_JSON

MODELS_JSON: {"model": [{"name", "datatype", "shape"}, ...]}, the same specs the mesh's
identity model files declare.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16,
          "INT32": np.int32, "INT64": np.int64, "FP16": np.float16, "FP32": np.float32,
          "FP64": np.float64, "BYTES": np.object_}


def identity(requests):  # noqa: ANN001, ANN201 - PyTriton's Request objects
    answers = []
    for request in requests:
        out = {name: np.asarray(value) for name, value in request.items()}
        params = json.dumps(dict(request.parameters or {}), sort_keys=True).encode()
        out["parameters"] = np.array([params], dtype=object)
        answers.append(out)
    return answers


def main() -> None:
    http_port, grpc_port, metrics_port = (int(p) for p in sys.argv[1:4])
    models = json.loads(sys.argv[4])
    config = TritonConfig(http_port=http_port, grpc_port=grpc_port,
                          metrics_port=metrics_port, http_address="127.0.0.1",
                          grpc_address="127.0.0.1", log_verbose=0)
    with Triton(config=config) as triton:
        for model, specs in models.items():
            tensors = [Tensor(name=s["name"], dtype=DTYPES[s["datatype"]],
                              shape=tuple(s["shape"])) for s in specs]
            triton.bind(model_name=model, infer_func=identity, inputs=tensors,
                        outputs=[*tensors, Tensor(name="parameters", dtype=np.object_,
                                                  shape=(1,))],
                        config=ModelConfig(batching=False), strict=False)
        triton.serve()


if __name__ == "__main__":
    main()
