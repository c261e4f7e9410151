"""Exceptions raised by the kvstore core.

    KVStoreError
    ├── InvalidRequest        malformed input: a bad key, layout or chunk
    ├── ChecksumMismatch      received bytes do not match their checksum
    └── CapacityExhausted     no room, and nothing evictable frees enough

A cache miss is a result, never an exception; a degraded SSD tier is a state the
store reports, not an error (the other tiers serve). The server maps each class to one
gRPC status code in exactly one place (kvstore.server.status).
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Base class of every error the core raises on purpose."""


class InvalidRequest(KVStoreError):
    """The caller sent something malformed; retrying the same request will fail again."""


class ChecksumMismatch(KVStoreError):
    """Bytes arrived whose checksum differs from the one sent with them."""


class CapacityExhausted(KVStoreError):
    """The store has no room for the request and cannot make any by evicting."""
