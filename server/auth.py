"""Who is calling: bearer tokens (or a client certificate) to a tenant and a role.

The tokens file (`[auth] tokens_file`) is TOML and holds each token's SHA-256, never
the token itself:

    [[tokens]]
    sha256 = "5e88...c9"              # hex SHA-256 of the token's UTF-8 bytes
    tenant = "team-a"
    role = "tenant"                  # tenant: its own namespaces only; admin: see below
    expires = 2027-06-01T00:00:00Z   # optional; past it the token is refused

A request's tenant comes from its credential, never from the request alone: a namespace
that names another tenant is PERMISSION_DENIED (`Caller.authorize`). An admin may also
delete any tenant's blocks and see every tenant's Stats; its puts and reads are its own
tenant's, like anyone's. With mutual TLS and `certificate_tenants`, a verified client
certificate's common name is its tenant (role tenant) when no token is sent.

SIGHUP reloads the file (`Authenticator.reload`); calls in flight keep the caller they
were admitted as. A file that does not load leaves the previous tokens in force.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import logging
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("kvstore.server")

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Longer than any token a person or a secret manager makes; a bound on what is hashed.
MAX_TOKEN_BYTES = 4096


class Unauthenticated(Exception):
    """No credential, or one the server does not accept: UNAUTHENTICATED."""


class PermissionDenied(Exception):
    """A known caller asked for what its role or tenant does not allow: PERMISSION_DENIED."""


class Role(enum.Enum):
    TENANT = "tenant"
    ADMIN = "admin"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller, or OPEN where the daemon runs without authentication."""

    tenant: str | None  # None: authentication is off, and every namespace is allowed
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def authorize(self, tenant: str, *, admin_may: bool = False) -> None:
        """Raise PermissionDenied unless this caller may act on `tenant`'s namespaces;
        `admin_may`: an admin may (Delete, Stats)."""
        if self.tenant is None or tenant == self.tenant or (admin_may and self.is_admin):
            return
        raise PermissionDenied(
            f"the credential is tenant {self.tenant!r}'s; namespace tenant {tenant!r} is "
            f"another tenant's. Use that tenant's own credential"
        )


OPEN = Caller(tenant=None, role=Role.ADMIN)


@dataclass(frozen=True)
class _Grant:
    tenant: str
    role: Role
    expires_at: float | None  # Unix time


def token_sha256(token: str) -> str:
    """The hex digest the tokens file lists for `token`."""
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path) -> dict[str, _Grant]:
    """The tokens file at `path` by SHA-256 hex; ValueError naming what is wrong."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"cannot read tokens file {path}: {error}") from error
    unknown = set(data) - {"tokens"}
    if unknown:
        raise ValueError(f"tokens file {path}: unknown key(s) {sorted(unknown)}; only [[tokens]]")
    entries = data.get("tokens", [])
    if not isinstance(entries, list):
        raise ValueError(f"tokens file {path}: `tokens` must be an array of tables ([[tokens]])")
    grants: dict[str, _Grant] = {}
    for number, entry in enumerate(entries, 1):
        where = f"tokens file {path}, entry {number}"
        digest, grant = _grant_from(entry, where)
        if digest in grants:
            raise ValueError(f"{where}: the same sha256 is listed twice")
        grants[digest] = grant
    return grants


def _grant_from(entry: Any, where: str) -> tuple[str, _Grant]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: each [[tokens]] entry is a table")
    unknown = set(entry) - {"sha256", "tenant", "role", "expires"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest.lower()):
        raise ValueError(
            f"{where}: sha256 must be the token's SHA-256 as 64 hex digits (for example "
            f"`printf %s TOKEN | sha256sum`), never the token itself"
        )
    tenant = entry.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"{where}: tenant must be a non-empty string")
    try:
        role = Role(entry.get("role", "tenant"))
    except ValueError:
        raise ValueError(f"{where}: role must be 'tenant' or 'admin'") from None
    expires = entry.get("expires")
    expires_at: float | None = None
    if expires is not None:
        if not isinstance(expires, datetime.datetime) or expires.tzinfo is None:
            raise ValueError(
                f"{where}: expires must be a TOML date-time with a zone, e.g. 2027-06-01T00:00:00Z"
            )
        expires_at = expires.timestamp()
    return digest.lower(), _Grant(tenant, role, expires_at)


class Authenticator:
    """Credentials to callers, for both transports. Cheap per call: a dict lookup of the
    token's digest, cached by token."""

    def __init__(self, tokens_file: Path | None, *, certificate_tenants: bool) -> None:
        self._tokens_file = tokens_file
        self.certificate_tenants = certificate_tenants
        self._grants: dict[str, _Grant] = load_tokens(tokens_file) if tokens_file else {}
        self._by_token: dict[str, _Grant | None] = {}  # a cache; cleared on reload

    @property
    def num_tokens(self) -> int:
        return len(self._grants)

    def reload(self) -> bool:
        """Read the tokens file again (SIGHUP). On an error the old tokens stay."""
        if self._tokens_file is None:
            return False
        try:
            grants = load_tokens(self._tokens_file)
        except ValueError as error:
            logger.error("tokens file not reloaded, the previous tokens stay: %s", error)
            return False
        self._grants, self._by_token = grants, {}
        logger.info("tokens file reloaded: %d tokens", len(grants))
        return True

    def caller(self, token: str | None, certificate_name: str | None = None) -> Caller:
        """The caller a credential proves; Unauthenticated if it proves none."""
        if token is not None:
            return self._caller_for_token(token)
        if self.certificate_tenants and certificate_name:
            if not certificate_name.isprintable():
                # A NUL or control byte: a name some parsers cut short (another tenant's).
                raise Unauthenticated(
                    "the client certificate's common name holds control characters; it "
                    "cannot name a tenant"
                )
            return Caller(tenant=certificate_name, role=Role.TENANT)
        raise Unauthenticated(
            "no credential: send `authorization: Bearer TOKEN` (gRPC metadata) or a token in "
            "the data plane's HELLO"
            + (", or a client certificate" if self.certificate_tenants else "")
            + " (ClientOptions.token or KVSTORE_TOKEN)"
        )

    def _caller_for_token(self, token: str) -> Caller:
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated(f"the token is longer than {MAX_TOKEN_BYTES} bytes")
        if token in self._by_token:
            grant = self._by_token[token]
        else:
            grant = self._grants.get(token_sha256(token))
            if len(self._by_token) >= _MAX_CACHED:
                self._by_token.clear()
            self._by_token[token] = grant
        if grant is None:
            raise Unauthenticated("the token is not known to this server (revoked or mistyped)")
        if grant.expires_at is not None and time.time() >= grant.expires_at:
            raise Unauthenticated("the token has expired; ask for a new one")
        return Caller(tenant=grant.tenant, role=grant.role)


# Bounds the cache against a client that sends a new wrong token on every call.
_MAX_CACHED = 4096


def bearer_token(value: str) -> str:
    """The token of an `authorization` metadata value; Unauthenticated if malformed."""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        # The scheme is not echoed: a token sent without `Bearer ` would be in it.
        raise Unauthenticated(
            "the authorization metadata must be `Bearer TOKEN` (RFC 6750), got another form"
        )
    return token.strip()
