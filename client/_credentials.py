"""The caller's bearer token: where it comes from, and how each call carries it.

gRPC calls carry it as `authorization: Bearer TOKEN` metadata; the data plane says it
in HELLO (kvstore.wire.frames). The server maps it to a tenant and a role.
"""

from __future__ import annotations

import os

TOKEN_ENV = "KVSTORE_TOKEN"
Metadata = tuple[tuple[str, str], ...]


def resolve_token(configured: str | None) -> str | None:
    """ClientOptions.token, else the KVSTORE_TOKEN environment variable, else None."""
    token = configured if configured is not None else os.environ.get(TOKEN_ENV)
    if not token:
        return None
    check_token(token, TOKEN_ENV if configured is None else "ClientOptions.token")
    return token


def check_token(token: str, where: str) -> None:
    """ValueError for a token no server could accept (a header cannot carry it)."""
    if len(token.encode()) > 4096:
        raise ValueError(f"{where} is longer than 4096 bytes")
    if not token.isprintable() or any(char.isspace() for char in token):
        raise ValueError(f"{where} must be printable, without spaces or newlines")


def call_metadata(token: str | None) -> Metadata:
    """The metadata every gRPC call sends: the token, or nothing."""
    return (("authorization", f"Bearer {token}"),) if token else ()
