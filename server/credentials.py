"""Credentials as each transport carries them, to a caller (kvstore.server.auth).

gRPC: `authorization: Bearer TOKEN` metadata, or, with mutual TLS, the verified client
certificate's common name. The data plane: the token after the version in HELLO
(kvstore.wire.frames), or the certificate of the TLS connection.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from kvstore.server.auth import (
    MAX_TOKEN_BYTES,
    Authenticator,
    Caller,
    Unauthenticated,
    bearer_token,
)


@dataclass(frozen=True)
class Credential:
    """What a call or connection presented; checked again (`caller`) wherever it is
    used for long, so that a revoked or expired token stops working on open streams."""

    token: str | None
    certificate_name: str | None

    def caller(self, auth: Authenticator) -> Caller:
        return auth.caller(self.token, self.certificate_name)


def grpc_caller(auth: Authenticator, context: grpc.aio.ServicerContext) -> Caller:
    """The caller of a gRPC call; Unauthenticated without a credential the server accepts."""
    return grpc_credential(auth, context).caller(auth)


def grpc_credential(auth: Authenticator, context: grpc.aio.ServicerContext) -> Credential:
    """The credential a gRPC call presents (not yet checked)."""
    token: str | None = None
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            if token is not None:
                raise Unauthenticated("more than one authorization metadata entry")
            if not isinstance(value, str):
                raise Unauthenticated("the authorization metadata must be text")
            token = bearer_token(value)
    name = grpc_certificate_name(context) if auth.certificate_tenants and token is None else None
    return Credential(token, name)


def grpc_certificate_name(context: grpc.aio.ServicerContext) -> str | None:
    """The common name of the call's verified client certificate, if it has one.

    Read from the certificate itself, as the data plane reads it (`getpeercert`): gRPC's
    `x509_common_name` ends at a NUL byte, so "team-b\\0.team-a.example" would read as
    "team-b" there (the authenticator refuses such a name)."""
    certificates = context.auth_context().get("x509_pem_cert")
    if not certificates:
        return None
    return _first_common_name(bytes(certificates[0]))


@functools.lru_cache(maxsize=1024)
def _first_common_name(pem: bytes) -> str | None:
    subject = x509.load_pem_x509_certificate(pem).subject
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode(errors="replace")


def hello_credential(auth: Authenticator, token: bytes, certificate_name: str | None) -> Credential:
    """The credential of a data-plane connection, from its HELLO's token (may be empty)."""
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated(f"the HELLO token is longer than {MAX_TOKEN_BYTES} bytes")
    try:
        text = token.decode() if token else None
    except UnicodeDecodeError:
        raise Unauthenticated("the HELLO token is not UTF-8") from None
    name = certificate_name if auth.certificate_tenants and not text else None
    return Credential(text, name)
