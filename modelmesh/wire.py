"""Serialized protobuf read and written without parsing: one varint, two operations.

Forwarding passes a request's bytes through untouched, but the ingress still
needs the model name to decide where the request goes (``model_name``), and a
runtime that reads the model from ``model_name`` gets the id written into the
same bytes (``with_string_field``).
"""

from __future__ import annotations

from modelmesh.errors import InvalidArgument

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``pos``; InvalidArgument if malformed."""
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


def varint(n: int) -> bytes:
    """``n`` (non-negative) as a protobuf varint."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def model_name(raw: bytes) -> str:
    """``model_name`` (field 1) of a serialized ModelInferRequest ("" when absent).

    Scans the top-level fields, skipping every other field by its length, and
    returns the last occurrence of field 1, which is what a protobuf parser keeps.
    """
    name = b""
    pos, end = 0, len(raw)
    while pos < end:
        key, pos = read_varint(raw, pos)
        field, wire = key >> 3, key & 7
        if wire == _LEN:
            length, pos = read_varint(raw, pos)
            if pos + length > end:
                raise InvalidArgument("malformed request: field runs past the end")
            if field == 1:
                name = raw[pos:pos + length]
            pos += length
        elif wire == _VARINT:
            _, pos = read_varint(raw, pos)
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


def with_string_field(message: bytes, field_number: int, value: str) -> bytes:
    """``message`` (serialized protobuf) with string field ``field_number`` set to ``value``.

    The message is not parsed: one more occurrence of the field is appended, and
    protobuf parsers keep the last occurrence of a singular field. This is how
    the model id reaches a runtime that reads it from ``model_name`` (field 1
    of ``ModelInferRequest``) without re-serializing the request.
    """
    data = value.encode("utf-8")
    return message + varint(field_number << 3 | 2) + varint(len(data)) + data
