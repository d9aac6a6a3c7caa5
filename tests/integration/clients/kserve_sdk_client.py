"""Drive a V2 REST server with the KServe Python SDK (``kserve.InferenceRESTClient``).

Runs under .venv-kserve's python (KServe needs protobuf 7: it never shares a process
with the mesh's environment), so it imports nothing of the project. Prints one JSON
object of what the SDK saw; tests/integration/test_kserve_sdk.py asserts on it.

    .venv-kserve/bin/python kserve_sdk_client.py http://127.0.0.1:8008
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from kserve.protocol.rest.v2_datamodels import ModelMetadataResponse, ServerMetadataResponse


def _tensor(arr: np.ndarray, name: str, datatype: str, binary: bool) -> InferInput:
    inp = InferInput(name, list(arr.shape), datatype)
    inp.set_data_from_numpy(arr, binary_data=binary)
    return inp


def _listed(arr: np.ndarray) -> Any:
    if arr.dtype == np.object_:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in arr.reshape(-1)]
    return arr.reshape(-1).tolist()


async def main(base: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    v2 = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    v1 = InferenceRESTClient(RESTConfig(protocol="v1", timeout=60))
    try:
        out["live"] = await v2.is_server_live(base)
        out["ready"] = await v2.is_server_ready(base)
        out["model_ready"] = await v2.is_model_ready(base, "echo4")
        out["unknown_model_ready"] = await v2.is_model_ready(base, "nope")
        out["v1_model_ready"] = await v1.is_model_ready(base, "echo4")
        # The SDK has no metadata call: its own pydantic types validate the answers.
        async with httpx.AsyncClient(timeout=60) as http:
            server = ServerMetadataResponse.model_validate_json(
                (await http.get(f"{base}/v2")).content)
            meta = ModelMetadataResponse.model_validate_json(
                (await http.get(f"{base}/v2/models/echo4")).content)
        out["server_metadata"] = server.model_dump()
        out["model_metadata"] = meta.model_dump()

        cases = {
            "fp32": (np.arange(8, dtype=np.float32).reshape(2, 4) / 4, "FP32"),
            "int64": (np.array([[-(2**62), 0, 7]], np.int64), "INT64"),
            "bool": (np.array([True, False]), "BOOL"),
            "bytes": (np.array([b"abc", "h\u00e9".encode()], dtype=object), "BYTES"),
            "fp16": (np.array([1.5, -2.0, 65504.0], np.float16), "FP16"),
        }
        for binary in (False, True):
            mode = "binary" if binary else "json"
            for key, (arr, datatype) in cases.items():
                if datatype == "FP16" and not binary:
                    continue  # the SDK refuses FP16 as JSON, as the protocol does
                request = InferRequest(
                    "echo", [_tensor(arr, key, datatype, binary)], request_id=f"{mode}-{key}",
                    request_outputs=[RequestedOutput(key, {"binary_data": binary})])
                response = await v2.infer(base, request, model_name="echo")
                got = response.outputs[0]
                out[f"infer_{mode}_{key}"] = {
                    "id": response.id, "model_name": response.model_name,
                    "name": got.name, "datatype": got.datatype, "shape": list(got.shape),
                    "data": _listed(got.as_numpy()), "want": _listed(arr),
                }
        # binary_data_output on the request: every output binary (two of them here)
        x = np.ones((1, 4), np.float32)
        request = InferRequest("echo4", [_tensor(x, "x", "FP32", True)],
                               parameters={"binary_data_output": True})
        response = await v2.infer(base, request, model_name="echo4")
        out["binary_data_output"] = {o.name: _listed(o.as_numpy()) for o in response.outputs}

        rows = [[5.1, 3.5, 1.4, 0.2], [6.2, 3.4, 5.4, 2.3]]
        out["v1_predict"] = await v1.infer(base, {"instances": rows}, model_name="sk")

        try:
            await v2.infer(base, InferRequest("nope", [_tensor(x, "x", "FP32", False)]),
                           model_name="nope")
            out["unknown_model_error"] = None
        except httpx.HTTPStatusError as exc:
            out["unknown_model_error"] = {"status": exc.response.status_code,
                                          "message": str(exc)}
    finally:
        await v2.close()
        await v1.close()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))
