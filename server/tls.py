"""The daemon's TLS material, read once at start-up: gRPC server credentials and the data
plane's ssl.SSLContext, from the same `[tls]` files (kvstore.server.config.TLSConfig).

Both transports present the same certificate; with a client CA both require and verify
a client certificate (mutual TLS). A file that changes later is not reread: rotating a
certificate takes a restart.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import grpc

from kvstore.errors import InvalidRequest
from kvstore.server.config import TLSConfig
from kvstore.wire.tls import TLSFilesError, read_pem, server_context


@dataclass(frozen=True)
class ServerTLS:
    grpc_credentials: grpc.ServerCredentials
    data_plane_context: ssl.SSLContext
    mutual: bool


def load_server_tls(config: TLSConfig) -> ServerTLS:
    """Read and check the files; InvalidRequest naming the file that is wrong."""
    ca_file = config.client_ca_file or None
    try:
        certificate = read_pem(config.cert_file)
        key = read_pem(config.key_file)
        client_ca = read_pem(ca_file) if ca_file is not None else None
        context = server_context(config.cert_file, config.key_file, ca_file)
    except TLSFilesError as error:
        raise InvalidRequest(f"[tls]: {error}") from None
    credentials = grpc.ssl_server_credentials(
        [(key, certificate)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    return ServerTLS(credentials, context, mutual=client_ca is not None)
