"""The wire's one error type."""

from __future__ import annotations


class WireError(ValueError):
    """Bytes that are not a well-formed kvstore.v1 message or data-plane frame.

    Each side maps it once: the server answers INVALID_ARGUMENT (the request was
    malformed), the client raises kvstore.client.ProtocolError (the reply was).
    """
