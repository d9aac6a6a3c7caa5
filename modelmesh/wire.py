"""Serialized protobuf read and written without parsing: varints, the model name, a field count.

Forwarding passes a request's bytes through untouched, but the ingress still
needs the model name to decide where the request goes (``model_name``), and a
runtime that reads the model from ``model_name`` gets the id written into the
same bytes (``with_string_field``). Before a request is parsed (or passed to a
runtime), ``check_request`` refuses one whose field count would make the
parse expensive: protobuf's C parser holds the GIL, so a thread would not help.
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


#: The most fields one request may hold, counted over its top level and the fields of
#: each input, requested output and their parameters (see ``check_request``). A
#: legitimate request has a handful per input; a crafted one of millions of tiny
#: fields would cost a Python step (``model_name``) or a C parse holding the GIL
#: (protobuf) per field, on the event loop, and is refused after this many.
MAX_FIELDS = 16384

_TOO_MANY = (f"request refused: more than {MAX_FIELDS} protobuf fields (counting the top "
             "level, each input, output and parameter entry, and each typed BYTES element); "
             "send fewer parameters or tensors, and large BYTES tensors in raw_input_contents")

# The nested messages ``check_request`` counts the fields of, by field number:
# ModelInferRequest.inputs (5) and .outputs (6); InferInputTensor.contents (5).
_CONTENTS: dict[int, dict] = {}
_INPUT: dict[int, dict] = {5: _CONTENTS}
_OUTPUT: dict[int, dict] = {}
_REQUEST: dict[int, dict] = {5: _INPUT, 6: _OUTPUT}


def model_name(raw: bytes) -> str:
    """``model_name`` (field 1) of a serialized ModelInferRequest ("" when absent).

    Scans the top-level fields, skipping every other field by its length, and
    returns the last occurrence of field 1, which is what a protobuf parser keeps.
    A request of more than ``MAX_FIELDS`` top-level fields is refused
    (``InvalidArgument``) once the scan has seen that many, so a flood of tiny
    fields costs a bounded scan.
    """
    return string_field(raw, 1)


def string_field(raw: bytes, number: int) -> str:
    """Top-level string field ``number`` of a serialized message, as ``model_name`` reads 1."""
    return _scan(raw, {}, number)


def check_request(raw: bytes) -> str:
    """Refuse (``InvalidArgument``) a serialized ModelInferRequest too costly to parse;
    return its ``model_name`` (as ``model_name`` reads it), found in the same pass.

    Counts the fields of the top level, of every input (and its contents) and of
    every requested output, skipping each field by its length, and stops at
    ``MAX_FIELDS``: what a protobuf parse would turn into a message, a map entry
    or a string each. Packed tensor data is one field; typed BYTES contents
    count one field per element. Malformed framing is refused too.
    """
    return _scan(raw, _REQUEST, 1)


def _scan(raw: bytes, nested: dict[int, dict], number: int) -> str:
    """Count the fields (``_count_fields``; refused past ``MAX_FIELDS``) and return the
    last occurrence of top-level string field ``number`` ("" when absent)."""
    span = [0, 0]
    if _count_fields(raw, 0, len(raw), nested, MAX_FIELDS, number << 3 | _LEN, span) < 0:
        raise InvalidArgument(_TOO_MANY)
    try:
        return raw[span[0]:span[1]].decode()
    except UnicodeDecodeError:
        raise InvalidArgument(f"malformed request: field {number} is not UTF-8") from None


def _count_fields(raw: bytes, pos: int, end: int, nested: dict[int, dict], budget: int,
                  want: int = 0, span: list[int] | None = None) -> int:
    """The budget left after the fields of ``raw[pos:end]`` (and of ``nested`` fields in it).

    Negative as soon as it runs out (the scan stops there). ``span`` receives the
    bounds of the last length-delimited field whose key is ``want`` (top level only).
    """
    try:
        while pos < end:
            budget -= 1
            if budget < 0:
                return budget
            key = raw[pos]  # one-byte keys and lengths (fields 1..15, < 128 bytes) inline
            if key < 0x80:
                pos += 1
            else:
                key, pos = read_varint(raw, pos)
            wire = key & 7
            if wire == _LEN:
                length = raw[pos]
                if length < 0x80:
                    pos += 1
                else:
                    length, pos = read_varint(raw, pos)
                if pos + length > end:
                    raise InvalidArgument("malformed request: field runs past the end")
                if key == want and span is not None:
                    span[0], span[1] = pos, pos + length
                inner = nested.get(key >> 3)
                if inner is not None and length:
                    budget = _count_fields(raw, pos, pos + length, inner, budget)
                    if budget < 0:
                        return budget
                pos += length
            elif wire == _VARINT and raw[pos] < 0x80:
                pos += 1
            else:
                pos = _skip_scalar(raw, pos, wire)
    except IndexError:
        raise InvalidArgument("malformed request: truncated field") from None
    if pos > end:
        raise InvalidArgument("malformed request: field runs past the end")
    return budget


def _skip_scalar(raw: bytes, pos: int, wire: int) -> int:
    if wire == _VARINT:
        return read_varint(raw, pos)[1]
    if wire == _I64:
        return pos + 8
    if wire == _I32:
        return pos + 4
    raise InvalidArgument(f"malformed request: unsupported wire type {wire}")


def with_string_field(message: bytes, field_number: int, value: str) -> bytes:
    """``message`` (serialized protobuf) with string field ``field_number`` set to ``value``.

    The message is not parsed: one more occurrence of the field is appended, and
    protobuf parsers keep the last occurrence of a singular field. This is how
    the model id reaches a runtime that reads it from ``model_name`` (field 1
    of ``ModelInferRequest``) without re-serializing the request.
    """
    data = value.encode("utf-8")
    return message + varint(field_number << 3 | 2) + varint(len(data)) + data
