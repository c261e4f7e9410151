"""A LookupPrefixRequest's bytes without the generated classes, for the lookup benchmark's
plain-grpcio baseline: the same bytes a lookup of those keys carries, with no protobuf
code on the path being measured."""

from __future__ import annotations

# Field numbers of kvstore.v1.LookupPrefixRequest.
LOOKUP_NAMESPACE = 1
LOOKUP_KEYS = 2
_LEN = 2  # protobuf's length-delimited wire type


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | _LEN) + _varint(len(payload)) + payload


def encode_lookup_request(keys: list[bytes], *, namespace: bytes | None = None) -> bytes:
    """A LookupPrefixRequest; `namespace` is a serialized kvstore.v1.Namespace."""
    out = _len_field(LOOKUP_NAMESPACE, namespace) if namespace is not None else b""
    return out + b"".join(_len_field(LOOKUP_KEYS, key) for key in keys)
