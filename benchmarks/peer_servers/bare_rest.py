"""The REST floor: one model behind a raw ASGI V2 infer endpoint, no mesh.

uvicorn (httptools) with the same raw-ASGI shape, orjson and REST codec
(``modelmesh.rest.tensors``) as the mesh's REST transport, and the embedded runtime's
model object; nothing else (no routing, cache, statistics or batching). What the mesh's
REST path costs beyond this is the mesh. Runs in the project's environment.

    python bare_rest.py PORT MODEL_TYPE MODEL_PATH
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import uvicorn
from tritonclient.grpc import service_pb2 as pb

from modelmesh import codec
from modelmesh.rest import tensors
from modelmesh.runtimes import get_runtime

model = get_runtime(sys.argv[2]).load(Path(sys.argv[3]), "bare")
HEADER_LENGTH = b"inference-header-content-length"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    header_length = None
    for key, value in scope["headers"]:
        if key == HEADER_LENGTH:
            header_length = int(value)
    name = scope["path"].split("/")[3]
    request, choice = tensors.parse_infer_request(body, header_length, name)
    requested = [o.name for o in request.outputs]
    outputs = model.predict_outputs(codec.decode_inputs(request), {}, requested)
    response = pb.ModelInferResponse(model_name=name, model_version="1", id=request.id)
    codec.encode_outputs(outputs, requested, response)
    payload, json_length = tensors.encode_infer_response(response.SerializeToString(), choice)
    headers = [(b"content-length", str(len(payload)).encode())]
    if json_length is None:
        headers.append((b"content-type", b"application/json"))
    else:
        headers += [(b"content-type", b"application/octet-stream"),
                    (HEADER_LENGTH, str(json_length).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


if __name__ == "__main__":
    config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), http="httptools",
                            interface="asgi3", lifespan="off", access_log=False,
                            log_level="warning", server_header=False, date_header=False,
                            loop="asyncio")
    asyncio.run(uvicorn.Server(config).serve())
