"""A LookupPrefixRequest's bytes without the generated classes, for the lookup benchmark's
plain-grpcio baseline: the same bytes a lookup of those keys carries, with no protobuf
code on the path being measured."""

from __future__ import annotations

from kvstore.wire.chunks import len_field

# Field numbers of kvstore.v1.LookupPrefixRequest.
LOOKUP_NAMESPACE = 1
LOOKUP_KEYS = 2


def encode_lookup_request(keys: list[bytes], *, namespace: bytes | None = None) -> bytes:
    """A LookupPrefixRequest; `namespace` is a serialized kvstore.v1.Namespace."""
    out = len_field(LOOKUP_NAMESPACE, namespace) if namespace is not None else b""
    return out + b"".join(len_field(LOOKUP_KEYS, key) for key in keys)
