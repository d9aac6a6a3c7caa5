"""The REST transport: a raw ASGI app translating V2 REST and KServe V1 onto the V2 operations.

Routes (model names are URL-encoded path segments; each is decoded)::

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready    200, or 503 while starting / draining / stopping
    GET  /v2/models/{m}[/versions/{v}]         model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready   200 ready, 400 not ready (as Triton)
    GET  /v2/models/{m}[/versions/{v}]/config  Triton's model configuration (from the metadata)
    GET  /v2/models[/{m}[/versions/{v}]]/stats Triton's statistics (this instance's, per model)
    POST /v2/models/{m}[/versions/{v}]/infer   inference (JSON, or JSON + binary tensors)
    POST /v2/repository/index                  models and their state here
    POST /v2/repository/models/{m}/load        load (where placement says) and wait
    POST /v2/repository/models/{m}/unload      unload the copy here
    GET  /v1/models/{m}                        {"name", "ready"}
    POST /v1/models/{m}:predict                {"instances": [...]} -> {"predictions": [...]}

Every operation is the gRPC servicer's own (``InferenceServicer``): inference
builds the ModelInferRequest bytes a gRPC client would send and routes them
with the same router, so a model loaded elsewhere is served there over the
mesh's gRPC path. Errors answer ``{"error": message}`` with the HTTP code of
the one table (``api.status``); a client's mistake is never logged.

Bodies are read up to ``max_body`` bytes (a declared ``Content-Length`` beyond
it is refused before any of it is read), gzip / deflate bodies are inflated up
to the same limit and no further.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as pb

from modelmesh import __version__
from modelmesh.api.inference import EXTENSIONS, InferenceServicer
from modelmesh.api.status import drop_frames, http_answer, log_unexpected, status_of
from modelmesh.errors import InvalidArgument, MeshError, RequestTooLarge
from modelmesh.headers import CallInfo, http_metadata
from modelmesh.metrics import Metrics
from modelmesh.node import Node
from modelmesh.rest import tensors
from modelmesh.security.auth import Authorizer, role_of
from modelmesh.security.tls import Identity

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

HEADER_LENGTH = b"inference-header-content-length"
_JSON = b"application/json"
_BINARY = b"application/octet-stream"
#: Inflated in steps of this much, so that no step can overshoot the limit by more.
_INFLATE_STEP = 1 << 20


class _Answer(Exception):
    """A finished answer raised from deep inside a handler (unknown route, wrong method)."""

    def __init__(self, status: int, doc: dict[str, Any], headers: tuple[tuple[bytes, bytes],
                                                                         ...] = ()) -> None:
        self.status, self.doc, self.headers = status, doc, headers


def _identity(peercert: dict[str, Any] | None) -> Identity | None:
    """A verified client certificate (``getpeercert()``'s dict) as an Identity."""
    if not peercert:
        return None
    cn = next((v for rdn in peercert.get("subject", ()) for k, v in rdn if k == "commonName"),
              "")
    sans = frozenset(v for kind, v in peercert.get("subjectAltName", ())
                     if kind in ("DNS", "URI", "IP Address"))
    return Identity(cn, sans)


class _ClientGone(Exception):
    """The client disconnected before its body arrived."""


class RestApp:
    """The ASGI application (``__call__``); one per instance."""

    def __init__(self, node: Node, v2: InferenceServicer, metrics: Metrics,
                 max_body: int, authorizer: Authorizer | None = None) -> None:
        self.node = node
        self.v2 = v2
        self.metrics = metrics
        self.max_body = max_body
        #: Decides each request's caller (None: the mesh is open, no TLS).
        self.authorizer = authorizer
        # Metric children looked up once: prometheus' labels() costs more than the observe.
        self._latency: dict[tuple[str, str], Any] = {}
        self._request_bytes = metrics.request_bytes.labels("rest")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not offered
            return
        start = time.perf_counter()
        operation, code = "", "OK"
        try:
            segments = [unquote(s) for s in scope["raw_path"].decode("latin-1").split("/")[1:]]
            operation, handler = self._route(scope["method"], segments)
            if self.authorizer is not None:
                self._admit(scope, operation)
            status, body, headers = await handler(scope, receive)
        except _Answer as a:
            status, body, headers = a.status, orjson.dumps(a.doc), ((b"content-type", _JSON),
                                                                    *a.headers)
        except _ClientGone:
            return
        except Exception as exc:
            if not isinstance(exc, MeshError):
                log_unexpected(f"REST {operation or scope.get('path', '')}", exc)
            status, message = http_answer(exc)
            code = status_of(exc)[0].name
            headers = ((b"content-type", _JSON),)
            if isinstance(exc, RequestTooLarge):  # the rest of the body is not worth reading
                headers += ((b"connection", b"close"),)
            drop_frames(exc)
            body = orjson.dumps({"error": message})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})
        if operation in ("ModelInfer", "V1Predict"):
            latency = self._latency.get((operation, code))
            if latency is None:
                latency = self._latency[operation, code] = self.metrics.api_request_ms.labels(
                    operation, code, "rest")
            latency.observe((time.perf_counter() - start) * 1000)

    def _admit(self, scope: Scope, operation: str) -> None:
        """The caller (token and client certificate) must hold the operation's role.

        REST never honours the internal headers (``http_metadata`` drops them), so a
        peer is only a caller with every role here.
        """
        assert self.authorizer is not None
        role = role_of("", operation)
        if role is None:  # health: open to anyone
            return
        authorization = None
        for k, v in scope["headers"]:
            if k == b"authorization":
                authorization = v.decode("latin-1")
                break
        peer = ((scope.get("extensions") or {}).get("tls") or {}).get("peercert")
        principal = self.authorizer.principal(authorization, _identity(peer))
        if not principal.peer:
            self.authorizer.require(principal, role, operation)

    # -- routes ---------------------------------------------------------------------

    def _route(self, method: str, seg: list[str]) -> tuple[str, _Handler]:
        """(operation name, handler) for a request; unknown ones are a 404 / 405 answer."""
        n = len(seg)
        if n and seg[-1] == "":  # a trailing slash
            seg, n = seg[:-1], n - 1
        if n >= 1 and seg[0] == "v2":
            if n == 1:
                return _get(method, "ServerMetadata", self._server_metadata)
            if seg[1] == "health" and n == 3 and seg[2] in ("live", "ready"):
                return _get(method, "ServerHealth", self._health(seg[2]))
            if seg[1:] == ["models", "stats"]:  # every model's (as Triton: shadows "stats")
                return _get(method, "ModelStatistics", self._statistics(""))
            if seg[1] == "models" and n >= 3:
                name, rest = seg[2], seg[3:]
                version = ""
                if len(rest) >= 2 and rest[0] == "versions":
                    version, rest = rest[1], rest[2:]
                if not rest:
                    return _get(method, "ModelMetadata", self._metadata(name, version))
                if rest == ["ready"]:
                    return _get(method, "ModelReady", self._model_ready(name, version))
                if rest == ["infer"]:
                    return _post(method, "ModelInfer", self._infer(name, version))
                if rest == ["config"]:
                    return _get(method, "ModelConfig", self._config(name, version))
                if rest == ["stats"]:
                    return _get(method, "ModelStatistics", self._statistics(name))
            if seg[1] == "repository":
                if seg[2:] == ["index"]:
                    return _post(method, "RepositoryIndex", self._index)
                if n == 5 and seg[2] == "models" and seg[4] in ("load", "unload"):
                    return _post(method, "RepositoryModel", self._repository(seg[4], seg[3]))
        if n == 3 and seg[:2] == ["v1", "models"]:
            name, sep, verb = seg[2].rpartition(":")
            if sep and verb == "predict":
                return _post(method, "V1Predict", self._v1_predict(name))
            if sep and verb == "explain":
                raise _Answer(501, {"error": "explain is not supported by the model mesh"})
            return _get(method, "V1ModelReady", self._v1_ready(seg[2]))
        raise _Answer(404, {"error": "no such endpoint; the mesh serves /v2/... (V2 REST) "
                                     "and /v1/models/... (KServe V1)"})

    # -- server ---------------------------------------------------------------------

    async def _server_metadata(self, scope: Scope, receive: Receive) -> _Result:
        return _ok({"name": "modelmesh", "version": __version__,
                    "extensions": [*EXTENSIONS, "binary_tensor_data"]})

    def _health(self, which: str) -> _Handler:
        async def answer(scope: Scope, receive: Receive) -> _Result:
            if which == "live":
                return _ok({"live": True})
            ready, reason = self.node.readiness()
            doc: dict[str, Any] = {"ready": ready} if ready else {"ready": False,
                                                                   "reason": reason}
            return _ok(doc, 200 if ready else 503)

        return answer

    # -- models -----------------------------------------------------------------------

    def _metadata(self, name: str, version: str) -> _Handler:
        async def answer(scope: Scope, receive: Receive) -> _Result:
            _, meta = await self.v2.metadata(pb.ModelMetadataRequest(name=name, version=version),
                                             _info(scope))
            return _ok({
                "name": name, "versions": list(meta.versions), "platform": meta.platform,
                "inputs": [_tensor_meta(t) for t in meta.inputs],
                "outputs": [_tensor_meta(t) for t in meta.outputs],
            })

        return answer

    def _model_ready(self, name: str, version: str) -> _Handler:
        async def answer(scope: Scope, receive: Receive) -> _Result:
            ready = await self.v2.model_ready(name, version, _info(scope))
            return _ok({"name": name, "ready": ready}, 200 if ready else 400)

        return answer

    def _config(self, name: str, version: str) -> _Handler:
        async def answer(scope: Scope, receive: Receive) -> _Result:
            return _ok(proto_json(await self.v2.model_config(name, version, _info(scope))))

        return answer

    def _statistics(self, name: str) -> _Handler:
        async def answer(scope: Scope, receive: Receive) -> _Result:
            return _ok(proto_json(await self.v2.model_statistics(name, _info(scope))))

        return answer

    def _infer(self, name: str, version: str) -> _Handler:
        async def answer(scope: Scope, receive: Receive) -> _Result:
            body = await self._body(scope, receive)
            header_length = _header_length(scope)
            request, choice = tensors.parse_infer_request(body, header_length, name, version)
            del body
            out = await self.v2.infer(request.SerializeToString(), _info(scope))
            del request
            payload, json_length = tensors.encode_infer_response(out, choice)
            if json_length is None:
                return 200, payload, ((b"content-type", _JSON),)
            return 200, payload, ((b"content-type", _BINARY),
                                  (HEADER_LENGTH, str(json_length).encode()))

        return answer

    # -- repository -------------------------------------------------------------------

    async def _index(self, scope: Scope, receive: Receive) -> _Result:
        body = await self._body(scope, receive)
        doc = tensors.json_object(body, "the request") if body.strip() else {}
        ready = doc.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument("'ready' must be true or false")
        index = self.v2.repository_index(ready)
        return 200, orjson.dumps([
            {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
            for m in index.models]), ((b"content-type", _JSON),)

    def _repository(self, action: str, name: str) -> _Handler:
        async def answer(scope: Scope, receive: Receive) -> _Result:
            await self._body(scope, receive)  # parameters (Triton's load overrides): unused
            if action == "load":
                await self.v2.repository_load(name, _info(scope))
            else:
                await self.v2.repository_unload(name, _info(scope))
            return 200, b"", ()

        return answer

    # -- KServe V1 ----------------------------------------------------------------------

    def _v1_ready(self, name: str) -> _Handler:
        async def answer(scope: Scope, receive: Receive) -> _Result:
            ready = await self.v2.model_ready(name, "", _info(scope))
            return _ok({"name": name, "ready": ready})

        return answer

    def _v1_predict(self, name: str) -> _Handler:
        async def answer(scope: Scope, receive: Receive) -> _Result:
            body = await self._body(scope, receive)
            request = tensors.parse_v1_predict(body, name)
            del body
            out = await self.v2.infer(request.SerializeToString(), _info(scope))
            return 200, tensors.encode_v1_predictions(out), ((b"content-type", _JSON),)

        return answer

    # -- bodies -------------------------------------------------------------------------

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        """The request body, inflated; at most ``max_body`` bytes either way."""
        limit = self.max_body
        declared, encoding = -1, b"identity"
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise InvalidArgument("Content-Length is not a number") from None
            elif key == b"content-encoding":
                encoding = value.strip().lower()
        if declared > limit:
            raise RequestTooLarge(f"the request body is {declared} bytes; the limit is {limit} "
                                  "(--max-message-bytes)")
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(f"the request body is more than {limit} bytes "
                                      "(--max-message-bytes)")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._request_bytes.observe(len(body))
        if encoding in (b"identity", b""):
            return body
        if encoding in (b"gzip", b"x-gzip", b"deflate"):
            return _inflate(body, 31 if encoding != b"deflate" else 15, limit)
        raise InvalidArgument(f"Content-Encoding '{encoding.decode('latin-1')[:32]}' is not "
                              "supported; send gzip, deflate or identity")


_Result = tuple[int, bytes, tuple[tuple[bytes, bytes], ...]]
_Handler = Callable[[Scope, Receive], Awaitable[_Result]]


def _ok(doc: Any, status: int = 200) -> _Result:
    return status, orjson.dumps(doc), ((b"content-type", _JSON),)


def _get(method: str, operation: str, handler: _Handler) -> tuple[str, _Handler]:
    if method not in ("GET", "HEAD"):
        raise _Answer(405, {"error": f"use GET here, not {method}"}, ((b"allow", b"GET"),))
    return operation, handler


def _post(method: str, operation: str, handler: _Handler) -> tuple[str, _Handler]:
    if method != "POST":
        raise _Answer(405, {"error": f"use POST here, not {method}"}, ((b"allow", b"POST"),))
    return operation, handler


def _info(scope: Scope) -> CallInfo:
    return CallInfo.from_pairs(http_metadata(scope["headers"]))


def _header_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == HEADER_LENGTH:
            try:
                return int(value)
            except ValueError:
                raise InvalidArgument("Inference-Header-Content-Length is not a number") from None
    return None


def _tensor_meta(t: pb.ModelMetadataResponse.TensorMetadata) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}


def proto_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's REST answers print it: proto field names, every field
    (defaults too), enums by name, and 64-bit integers as JSON numbers (not strings)."""
    doc = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    return _numbers(doc, message.DESCRIPTOR)


_INT64_TYPES = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)


def _numbers(doc: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    for field in descriptor.fields:
        if field.name not in doc:
            continue
        value = doc[field.name]
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            inner = kind.fields_by_name["value"]
            doc[field.name] = {k: _field_value(v, inner) for k, v in value.items()}
        else:
            doc[field.name] = ([_field_value(v, field) for v in value]
                               if isinstance(value, list) else _field_value(value, field))
    return doc


def _field_value(value: Any, field: FieldDescriptor) -> Any:
    if field.message_type is not None and isinstance(value, dict):
        return _numbers(value, field.message_type)
    if field.cpp_type in _INT64_TYPES and isinstance(value, str):
        return int(value)
    return value


def _inflate(body: bytes, wbits: int, limit: int) -> bytes:
    """``body`` decompressed, refused (``RequestTooLarge``) as soon as it passes ``limit``."""
    inflater = zlib.decompressobj(wbits)
    parts: list[bytes] = []
    size = 0
    data = body
    try:
        while True:
            part = inflater.decompress(data, min(_INFLATE_STEP, limit + 1 - size))
            size += len(part)
            if size > limit:
                raise RequestTooLarge(f"the request body inflates to more than {limit} bytes "
                                      "(--max-message-bytes)")
            parts.append(part)
            data = inflater.unconsumed_tail
            if not data:
                if inflater.eof:
                    break
                tail = inflater.flush()
                size += len(tail)
                if size > limit:
                    raise RequestTooLarge(f"the request body inflates to more than {limit} "
                                          "bytes (--max-message-bytes)")
                parts.append(tail)
                if not inflater.eof:
                    raise InvalidArgument("the compressed request body is truncated")
                break
    except zlib.error as exc:
        raise InvalidArgument(f"the request body is not valid compressed data: {exc}") from None
    return b"".join(parts)
