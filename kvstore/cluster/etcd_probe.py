"""Why a connection to etcd failed, where the cause is the settings and not the network.

gRPC reports a plaintext client at a TLS etcd as "Socket closed" and a missing client
certificate as "Unwrap failed": nothing a person can act on. After such a failure,
`explain_tls_failure` opens a plain TCP connection and tries TLS handshakes itself
(Python's ssl, blocking: run it in a thread), and says what is wrong and what to change;
None where the endpoint cannot be reached at all, or TLS is not the trouble.
"""

from __future__ import annotations

import contextlib
import socket
import ssl

from kvstore.cluster.etcd_options import EtcdAccess
from kvstore.cluster.members import SCHEME, TLS_SCHEME

# What an HTTP/2 client sends first: a TLS etcd that refuses this client's certificate
# says so in an alert once the handshake is done, so something must be read after it.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def explain_tls_failure(
    host: str, port: int, access: EtcdAccess, timeout_s: float = 2.0
) -> str | None:
    """A sentence naming etcd at HOST:PORT, what does not fit, and what to change; None
    when it cannot be reached or the TLS settings are not the cause."""
    endpoint = f"{host}:{port}"
    first = _handshake_error(host, port, _any_certificate(), None, timeout_s, read=False)
    if first is _UNREACHABLE:
        return None
    # An alert is TLS too: a server that wants a client certificate may refuse in one.
    speaks_tls = first is None or (
        isinstance(first, ssl.SSLError) and "ALERT" in str(first.reason or "").upper()
    )
    if not access.tls:
        if not speaks_tls:
            return None
        return (
            f"etcd at {endpoint} speaks TLS, but the cluster URL is {SCHEME} (plaintext): "
            f"write {TLS_SCHEME}{endpoint}/PREFIX and give etcd's CA (--etcd-ca)"
        )
    if not speaks_tls:
        return (
            f"etcd at {endpoint} does not answer TLS (it serves plaintext?): the cluster URL "
            f"is {TLS_SCHEME}; write {SCHEME} for a plaintext etcd, or start etcd with "
            f"https:// --listen-client-urls and --cert-file/--key-file"
        )
    options = access.options
    try:
        context = _verifying_context(access)
    except ssl.SSLError:
        return None  # files that gRPC read but ssl does not: no better answer here
    error = _handshake_error(host, port, context, access.server_name or host, timeout_s, read=True)
    if isinstance(error, ssl.SSLCertVerificationError):
        trusted = options.ca_file or "the system's trust store"
        reason = error.verify_message or str(error)
        if "mismatch" in reason.lower():
            name = access.server_name or host
            hint = (
                f"its certificate does not name {name}: give a name it carries "
                f"(--etcd-server-name), or connect by that name"
            )
        else:
            hint = "give the CA that signed etcd's certificate (--etcd-ca)"
        return (
            f"etcd at {endpoint}: its TLS certificate does not verify against {trusted} "
            f"({reason}); {hint}"
        )
    if isinstance(error, ssl.SSLError):
        if options.cert_file is None:
            return (
                f"etcd at {endpoint} requires a client certificate (etcd's "
                f"--client-cert-auth): give --etcd-cert and --etcd-key ({error.reason})"
            )
        return (
            f"etcd at {endpoint} refused the client certificate {options.cert_file} "
            f"({error.reason}): give one signed by a CA in etcd's --trusted-ca-file"
        )
    return None


class _Unreachable:
    pass


_UNREACHABLE = _Unreachable()


def _handshake_error(
    host: str,
    port: int,
    context: ssl.SSLContext,
    server_name: str | None,
    timeout_s: float,
    *,
    read: bool,
) -> Exception | _Unreachable | None:
    """None when a TLS handshake (and with `read`, the first read after it) succeeds; the
    error that stopped it otherwise; _UNREACHABLE when no TCP connection opens."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return _UNREACHABLE
    with contextlib.closing(sock):
        try:
            with context.wrap_socket(sock, server_hostname=server_name) as tls:
                if not read:
                    return None
                tls.sendall(_HTTP2_PREFACE)
                # A TLS 1.3 server checks the client's certificate after the client's
                # handshake is done: its verdict is the first thing to read.
                if not tls.recv(1):
                    return ConnectionResetError("etcd closed the connection")
        except TimeoutError:
            return None  # it took the handshake and waits for more: TLS works
        except (ssl.SSLError, OSError) as error:
            return error
    return None


def _any_certificate() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _verifying_context(access: EtcdAccess) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # names checked, certs required
    if access.root_pem is not None:
        context.load_verify_locations(cadata=access.root_pem.decode("ascii", "replace"))
    else:
        context.load_default_certs()
    options = access.options
    if options.cert_file is not None and options.key_file is not None:
        context.load_cert_chain(options.cert_file, options.key_file)
    return context
