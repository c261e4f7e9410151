"""The client's TLS material, from TLSOptions: gRPC channel credentials and the data
plane's ssl.SSLContext, both read from the same files when the client is made."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

import grpc

from kvstore.client._options import TLSOptions
from kvstore.wire.tls import CLIENT_TLS_SETTINGS, TLSFilesError, client_context, read_pem

# Where ClientOptions.tls is None, these environment variables make a TLSOptions, as
# KVSTORE_TOKEN gives the token: tools and child processes (kvstore-bench's load
# generators) take TLS settings without code.


def tls_from_environment() -> TLSOptions | None:
    """TLSOptions from KVSTORE_TLS_*; None when none of them is set."""
    values = {
        name: os.environ.get(variable) or None for name, _, variable, _ in CLIENT_TLS_SETTINGS
    }
    if not any(values.values()):
        return None
    try:
        return TLSOptions(**values)
    except ValueError as error:
        raise ValueError(f"{error} (from the KVSTORE_TLS_* environment variables)") from None


@dataclass(frozen=True)
class ClientTLS:
    grpc_credentials: grpc.ChannelCredentials
    data_plane_context: ssl.SSLContext
    server_name: str | None  # checked against the server's certificate instead of the host

    def channel_options(self) -> list[tuple[str, str]]:
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def load_client_tls(options: TLSOptions) -> ClientTLS:
    """Read the files; ValueError naming the one that cannot be read or is not PEM."""
    try:
        root = read_pem(options.ca_file) if options.ca_file is not None else None
        key = read_pem(options.key_file) if options.key_file is not None else None
        chain = read_pem(options.cert_file) if options.cert_file is not None else None
        context = client_context(options.ca_file, options.cert_file, options.key_file)
    except TLSFilesError as error:
        raise ValueError(f"TLSOptions: {error}") from None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=chain
    )
    return ClientTLS(credentials, context, options.server_name)
