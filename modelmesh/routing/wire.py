"""Reading a serialized ModelInferRequest without deserializing it.

Forwarding must pass a request's bytes through untouched, but the ingress still
needs the model name to decide where the request goes. ``model_name`` is field 1
(a string) of ``inference.ModelInferRequest``; this scans the top-level fields,
skipping every other field by its length, and returns the last occurrence of
field 1, which is what a protobuf parser would keep.
"""

from __future__ import annotations

from modelmesh.errors import InvalidArgument

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise InvalidArgument("malformed request: truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise InvalidArgument("malformed request: varint too long")


def model_name(raw: bytes) -> str:
    """``model_name`` of a serialized ModelInferRequest ("" when absent)."""
    name = b""
    pos, end = 0, len(raw)
    while pos < end:
        key, pos = _varint(raw, pos)
        field, wire = key >> 3, key & 7
        if wire == _LEN:
            length, pos = _varint(raw, pos)
            if pos + length > end:
                raise InvalidArgument("malformed request: field runs past the end")
            if field == 1:
                name = raw[pos:pos + length]
            pos += length
        elif wire == _VARINT:
            _, pos = _varint(raw, pos)
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        else:
            raise InvalidArgument(f"malformed request: unsupported wire type {wire}")
    if pos > end:
        raise InvalidArgument("malformed request: field runs past the end")
    try:
        return name.decode()
    except UnicodeDecodeError:
        raise InvalidArgument("malformed request: model_name is not UTF-8") from None
