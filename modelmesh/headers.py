"""The mesh's gRPC header names and paths, and ``CallInfo``: what a call's metadata says.

A leaf, so that every layer that speaks them (the router, the transports, the
remote runtimes that send ``mm-model-id`` to a runtime server) takes them from here.

Clients address a model with ``mm-model-id`` / ``mm-vmodel-id`` and may ask for
``mm-balanced``; instances add ``mm-hops`` and ``mm-load-here`` when they
forward, and answer errors with ``mm-instance`` (and ``mm-reject`` when they
refuse the work) in the trailing metadata. Management calls read ``mm-replace``
and the copy limits.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field

import grpc

#: Set between instances (never passed on from clients).
HOPS, LOAD_HERE = "mm-hops", "mm-load-here"
#: Trailing metadata of an instance's error answers.
INSTANCE, REJECT = "mm-instance", "mm-reject"
#: Set by clients.
BALANCED, MODEL_ID, VMODEL_ID = "mm-balanced", "mm-model-id", "mm-vmodel-id"
#: registerModel options.
REPLACE, MIN_COPIES, MAX_COPIES = "mm-replace", "mm-min-copies", "mm-max-copies"

#: The methods one instance calls on another.
INFER = "/inference.GRPCInferenceService/ModelInfer"
METADATA = "/inference.GRPCInferenceService/ModelMetadata"
ENSURE_LOADED = "/mmesh.ModelMesh/ensureLoaded"

_MODEL_ID_BIN, _VMODEL_ID_BIN = MODEL_ID + "-bin", VMODEL_ID + "-bin"
_NOT_FORWARDED = frozenset({HOPS, LOAD_HERE, "user-agent", "content-type", "te", "host"})
_INTERNAL = frozenset({HOPS, LOAD_HERE})

Metadata = list[tuple[str, str | bytes]]

#: Whether the current call may steer routing with the internal headers (``mm-hops``,
#: ``mm-load-here``): set per call by the ingress. With TLS only another instance of
#: the mesh may (its certificate says so); without TLS every caller is trusted.
INTERNAL_HEADERS_TRUSTED: ContextVar[bool] = ContextVar("internal_headers_trusted",
                                                        default=True)

_BIN = "-bin"


def _printable_ascii(value: str) -> bool:
    return value.isascii() and value.isprintable()


def id_header(key: str, value: str) -> tuple[str, str | bytes]:
    """``(key, value)`` as metadata that gRPC can carry: ASCII headers take printable ASCII only.

    A model id with any other character (unicode, DEL, U+2028 ...) goes as its
    UTF-8 bytes in the binary form of the header, ``<key>-bin`` (as ModelMesh
    sends ``mm-model-id-bin``); receivers read both forms (``CallInfo``,
    ``metadata_values``).
    """
    if _printable_ascii(value):
        return key, value
    return key + _BIN, value.encode("utf-8")


def runtime_id_headers(model_id: str) -> tuple[tuple[str, str | bytes], ...]:
    """The model id as a runtime server gets it: always ``mm-model-id-bin`` (UTF-8), and
    ``mm-model-id`` too when the id is printable ASCII, as ModelMesh sends them (a
    runtime may read either; only printable ASCII fits the text header)."""
    binary: tuple[str, str | bytes] = (_MODEL_ID_BIN, model_id.encode("utf-8"))
    if _printable_ascii(model_id):
        return (MODEL_ID, model_id), binary
    return (binary,)


def _text(value: str | bytes) -> str:
    """A metadata value as text (binary headers carry UTF-8); undecodable bytes are replaced."""
    if isinstance(value, str):
        return value
    return value.decode("utf-8", errors="replace")


@dataclass(slots=True)
class CallInfo:
    """What the router needs from one incoming call's metadata and deadline."""

    hops: int = 0
    load_here: bool = False
    balanced: bool = False
    model_id: str = ""  # mm-model-id
    vmodel_id: str = ""  # mm-vmodel-id
    #: The client's metadata to pass on when the call is forwarded.
    metadata: Metadata = field(default_factory=list)
    timeout: float | None = None

    @classmethod
    def from_context(cls, context: grpc.aio.ServicerContext) -> CallInfo:
        return cls.from_pairs(context.invocation_metadata() or (), context.time_remaining())

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str | bytes]],
                   timeout: float | None = None) -> CallInfo:
        """From (lowercase key, value) pairs: a gRPC call's metadata, or an HTTP request's
        headers as the REST transport filters them (``http_metadata``)."""
        info = cls(timeout=timeout)
        trusted = INTERNAL_HEADERS_TRUSTED.get()
        for k, v in pairs:
            if k in _INTERNAL and not trusted:
                continue  # a client's claim to be a peer is ignored
            if k == HOPS:
                try:
                    info.hops = int(v)
                except (TypeError, ValueError):
                    info.hops = 1
            elif k == LOAD_HERE:
                info.load_here = True
            elif k == BALANCED:
                info.balanced = str(v).strip().lower() in ("1", "true", "yes")
                info.metadata.append((k, v))
            elif k == MODEL_ID:
                info.model_id = info.model_id or _text(v)
            elif k == _MODEL_ID_BIN:  # the binary form wins
                info.model_id = _text(v)
            elif k == VMODEL_ID:  # resolved here: a forwarded call names the model itself
                info.vmodel_id = info.vmodel_id or _text(v)
            elif k == _VMODEL_ID_BIN:
                info.vmodel_id = _text(v)
            elif k[0] != ":" and not k.startswith("grpc-") and k not in _NOT_FORWARDED:
                info.metadata.append((k, v))
        return info


#: HTTP headers that describe the HTTP message itself: never passed on as gRPC metadata.
_HTTP_ONLY = frozenset({
    "host", "connection", "keep-alive", "content-length", "content-type", "content-encoding",
    "transfer-encoding", "accept", "accept-encoding", "expect", "upgrade", "te", "trailer",
    "user-agent", "inference-header-content-length", "proxy-authorization",
    "proxy-connection", "cookie",
})


def http_metadata(headers: Iterable[tuple[bytes, bytes]]) -> Metadata:
    """An HTTP request's headers (ASGI: lowercase names, raw values) as call metadata.

    Instances never call each other over HTTP, so ``mm-hops`` / ``mm-load-here``
    are dropped. The mesh's id headers are read as UTF-8 (both forms, ``-bin`` too, name the
    model by its UTF-8 text); other headers go on as metadata only when gRPC can
    carry them (printable ASCII, no ``-bin``, not an HTTP message header).
    """
    out: Metadata = []
    for raw_key, raw_value in headers:
        key = raw_key.decode("latin-1").lower()
        if key in (MODEL_ID, VMODEL_ID, _MODEL_ID_BIN, _VMODEL_ID_BIN):
            out.append((key, raw_value.decode("utf-8", errors="replace").strip()))
            continue
        if key in _HTTP_ONLY or key in (HOPS, LOAD_HERE) or key.endswith(_BIN) \
                or key.startswith(("grpc-", ":")):
            continue
        value = raw_value.decode("latin-1")
        if _printable_ascii(key) and (not value or _printable_ascii(value)):
            out.append((key, value))
    return out


def metadata_values(context: grpc.aio.ServicerContext, *keys: str) -> list[str]:
    """The values of ``keys`` in the call's metadata ("" where absent), in one pass.

    A key's binary form (``<key>-bin``, UTF-8) is read too and wins over the text one.
    """
    found = dict.fromkeys(keys, "")
    binary: dict[str, str] = {}
    for k, v in context.invocation_metadata() or ():
        if k in found:
            found[k] = _text(v)
        elif k.endswith(_BIN) and k[:-len(_BIN)] in found:
            binary[k[:-len(_BIN)]] = _text(v)
    found.update(binary)
    return [found[k] for k in keys]


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str:
    return metadata_values(context, key)[0]
