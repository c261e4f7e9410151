"""Throwaway certificates for the TLS tests (trustme), as PEM files in a directory.

pki = make_pki(directory, client_name="tenant-tls", server_alt_name="kvstore.internal")
pki.ca, pki.server_cert, pki.server_key       # a server certificate for 127.0.0.1
pki.client_cert, pki.client_key               # a client certificate the same CA signed
pki.other_ca, pki.foreign_cert, ...           # a CA nobody trusts, and its client
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Pki:
    ca: str  # the CA of the server and of the good client
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA nobody here uses: its client certificate is foreign
    foreign_cert: str
    foreign_key: str
    ca_key: str  # to issue more client certificates from `ca`


def write_cert(cert: trustme.LeafCert, directory: Path, name: str) -> tuple[str, str]:
    """`name`.pem (the chain) and `name`.key in `directory`; their paths."""
    chain = directory / f"{name}.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key = directory / f"{name}.key"
    cert.private_key_pem.write_to_path(str(key))
    return str(chain), str(key)


def make_pki(directory: Path, *, client_name: str, server_alt_name: str) -> Pki:
    """A CA, a server certificate for 127.0.0.1, localhost and `server_alt_name`, a client
    certificate whose common name is `client_name`, and the same client from another CA."""
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    ca.private_key_pem.write_to_path(str(directory / "ca.key"))
    other.cert_pem.write_to_path(str(directory / "other-ca.pem"))
    server = ca.issue_cert("127.0.0.1", "localhost", server_alt_name)
    client = ca.issue_cert(f"{client_name}.example", common_name=client_name)
    foreign = other.issue_cert(f"{client_name}.example", common_name=client_name)
    return Pki(
        str(directory / "ca.pem"),
        *write_cert(server, directory, "server"),
        *write_cert(client, directory, "client"),
        str(directory / "other-ca.pem"),
        *write_cert(foreign, directory, "foreign"),
        str(directory / "ca.key"),
    )


def issue_client_cert(pki: Pki, directory: Path, common_name: str) -> tuple[str, str]:
    """Another client certificate from `pki`'s CA, whose common name is `common_name`."""
    ca = trustme.CA.from_pem(Path(pki.ca).read_bytes(), Path(pki.ca_key).read_bytes())
    cert = ca.issue_cert("issued.example", common_name=common_name)
    return write_cert(cert, directory, "issued")
