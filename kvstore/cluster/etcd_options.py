"""How to reach a secured etcd: TLS files, the name to check, and etcd-auth credentials.

`EtcdOptions` is what a user sets (ClientOptions.etcd, the daemon's [cluster] section,
the `--etcd-*` flags, the KVSTORE_ETCD_* environment variables); `load_access` reads its
files once and checks it against the target, giving the `EtcdAccess` a connection uses
(kvstore.cluster.etcd). TLS is on for `etcds://` targets only: TLS settings beside an
`etcd://` target are an error, not a silent plaintext connection.

The password is never a flag: it comes from a file (`password_file`) or from the
KVSTORE_ETCD_PASSWORD environment variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from kvstore.cluster.members import SCHEME, TLS_SCHEME, EtcdTarget
from kvstore.wire.tls import TLSFilesError, read_pem

PASSWORD_ENV = "KVSTORE_ETCD_PASSWORD"

# The settings as command-line tools and the environment name them:
# (EtcdOptions field, flag, environment variable, help). The password has no flag.
ETCD_SETTINGS = (
    ("ca_file", "--etcd-ca", "KVSTORE_ETCD_CA", "PEM CA bundle etcd's certificate chains to"),
    (
        "cert_file",
        "--etcd-cert",
        "KVSTORE_ETCD_CERT",
        "PEM client certificate for an etcd with --client-cert-auth",
    ),
    ("key_file", "--etcd-key", "KVSTORE_ETCD_KEY", "the PEM private key of --etcd-cert"),
    (
        "server_name",
        "--etcd-server-name",
        "KVSTORE_ETCD_SERVER_NAME",
        "name to check in etcd's certificate, where it is not the host of the URL",
    ),
    ("user", "--etcd-user", "KVSTORE_ETCD_USER", "etcd user, for an etcd with auth enabled"),
    (
        "password_file",
        "--etcd-password-file",
        "KVSTORE_ETCD_PASSWORD_FILE",
        f"file holding the etcd user's password (or set ${PASSWORD_ENV})",
    ),
)
_TLS_FIELDS = ("ca_file", "cert_file", "key_file", "server_name")


@dataclass(frozen=True, kw_only=True)
class EtcdOptions:
    """TLS and credentials for etcd.

    For an `etcds://` target: `ca_file` (PEM) is the CA etcd's certificate must chain to
    (None: the system's trust store); `cert_file` and `key_file` (PEM) are this side's
    certificate, for an etcd started with --client-cert-auth; `server_name` is the name
    checked against etcd's certificate, where it is not the host of the URL.

    For an etcd with auth enabled: `user`, and its password, from `password_file` (its
    first line) or `password`.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    user: str | None = None
    password_file: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "etcd TLS needs both a client certificate and its key (--etcd-cert and "
                "--etcd-key), or neither"
            )
        if self.password is not None and self.password_file is not None:
            raise ValueError("give the etcd password once: a password file or a password")
        if self.user is None and (self.password is not None or self.password_file is not None):
            raise ValueError("an etcd password needs its user (--etcd-user)")

    @property
    def has_tls_settings(self) -> bool:
        return any(getattr(self, name) is not None for name in _TLS_FIELDS)

    @classmethod
    def from_environment(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        overrides: Mapping[str, str | None] | None = None,
    ) -> EtcdOptions | None:
        """EtcdOptions from KVSTORE_ETCD_* (and KVSTORE_ETCD_PASSWORD where no password
        file is named), each under the `overrides` (field: value; None: unset) a command
        line gives; None when nothing is set."""
        environ = os.environ if environ is None else environ
        overrides = overrides or {}
        values = {
            name: overrides.get(name) or environ.get(variable) or None
            for name, _, variable, _ in ETCD_SETTINGS
        }
        if values["password_file"] is None:
            values["password"] = environ.get(PASSWORD_ENV) or None
        if not any(values.values()):
            return None
        try:
            return cls(**values)
        except ValueError as error:
            source = "settings and " if any(overrides.values()) else ""
            raise ValueError(
                f"{error} (from the {source}KVSTORE_ETCD_* environment variables)"
            ) from None


@dataclass(frozen=True)
class EtcdAccess:
    """EtcdOptions with their files read, checked against a target's scheme."""

    tls: bool = False
    root_pem: bytes | None = None  # None with tls: the system's trust store
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    server_name: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    # Where the PEM bytes came from, for messages and for diagnosing a failed handshake.
    options: EtcdOptions = field(default_factory=EtcdOptions)


def load_access(target: EtcdTarget, options: EtcdOptions | None) -> EtcdAccess:
    """Read the files `options` name; ValueError naming what is wrong and how to fix it:
    TLS settings for an `etcd://` target, a file that cannot be read or is not PEM, a
    user without a password."""
    options = options if options is not None else EtcdOptions()
    if not target.tls and options.has_tls_settings:
        named = [flag for name, flag, _, _ in ETCD_SETTINGS if name in _TLS_FIELDS]
        raise ValueError(
            f"etcd TLS settings ({', '.join(named)}) are set but the cluster URL is "
            f"{SCHEME} (plaintext): write {TLS_SCHEME}HOST:PORT/PREFIX to speak TLS to etcd"
        )
    try:
        root = read_pem(options.ca_file) if options.ca_file is not None else None
        chain = read_pem(options.cert_file) if options.cert_file is not None else None
        key = read_pem(options.key_file) if options.key_file is not None else None
    except TLSFilesError as error:
        raise ValueError(f"etcd TLS: {error}") from None
    password = options.password
    if options.password_file is not None:
        password = read_password_file(options.password_file)
    if options.user is not None and not password:
        raise ValueError(
            f"etcd user {options.user!r} needs a password: --etcd-password-file FILE "
            f"(or password_file), or the {PASSWORD_ENV} environment variable"
        )
    return EtcdAccess(
        tls=target.tls,
        root_pem=root,
        cert_pem=chain,
        key_pem=key,
        server_name=options.server_name,
        user=options.user,
        password=password,
        options=options,
    )


def read_password_file(path: str) -> str:
    """The password in a file: its first line, without the line ending; ValueError naming
    the file when it cannot be read or holds none."""
    try:
        with open(path, encoding="utf-8") as file:
            first_line = file.readline()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise ValueError(f"cannot read the etcd password file {path}: {reason}") from None
    password = first_line.rstrip("\r\n")
    if not password:
        raise ValueError(f"the etcd password file {path} is empty (its first line is the password)")
    return password
