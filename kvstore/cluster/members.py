"""Cluster membership as etcd holds it: the `etcd://` target (`etcds://` for etcd over
TLS), and what a member registers.

A daemon started with `--cluster etcd://HOST:PORT[,HOST:PORT...]/PREFIX` keeps one key,
`PREFIX/members/<node_id>`, alive under a lease (kvstore.server.membership); its value is
a `Member` as JSON. This module parses targets and values and imports neither the client
nor the server, so both may use it; kvstore.cluster.etcd reads the members from etcd.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from kvstore.units import parse_size

SCHEME = "etcd://"
TLS_SCHEME = "etcds://"  # etcd over TLS (kvstore.cluster.etcd_options says with what)
ETCD_SCHEMES = (SCHEME, TLS_SCHEME)
STATIC_SCHEME = "cluster://"


def is_cluster_target(target: str) -> bool:
    """Whether a client target names a cluster (`etcd://`, `etcds://` or `cluster://`), not
    one daemon."""
    return target.startswith((*ETCD_SCHEMES, STATIC_SCHEME))


def is_etcd_target(target: str) -> bool:
    """Whether a target names a cluster kept in etcd (`etcd://` or `etcds://`)."""
    return target.startswith(ETCD_SCHEMES)


@dataclass(frozen=True)
class EtcdTarget:
    """Where etcd answers (HOST, PORT pairs, tried in order), the key prefix to use, and
    whether etcd is spoken to over TLS (`etcds://`)."""

    endpoints: tuple[tuple[str, int], ...]
    prefix: str
    tls: bool = False

    @property
    def members_prefix(self) -> str:
        return f"{self.prefix}/members/"

    def member_key(self, node_id: str) -> str:
        return self.members_prefix + node_id


def parse_etcd_url(url: str) -> EtcdTarget:
    """`etcd://HOST:PORT[,HOST:PORT...]/PREFIX` (`etcds://...` for TLS) → EtcdTarget;
    ValueError saying what is wrong."""
    usage = (
        "expected etcd://HOST:PORT[,HOST:PORT...]/PREFIX (etcds:// for TLS), "
        "e.g. etcd://127.0.0.1:2379/kvstore"
    )
    if not url.startswith(ETCD_SCHEMES):
        raise ValueError(f"cluster URL {url!r} must start with {SCHEME} or {TLS_SCHEME}; {usage}")
    tls = url.startswith(TLS_SCHEME)
    rest = url[len(TLS_SCHEME if tls else SCHEME) :]
    hosts, slash, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not slash or not prefix:
        raise ValueError(f"cluster URL {url!r} has no key prefix after the hosts; {usage}")
    if any(char.isspace() for char in prefix):
        raise ValueError(f"cluster URL {url!r}: the prefix must not contain spaces")
    endpoints = tuple(
        parse_host_port(part, what=f"cluster URL {url!r}") for part in hosts.split(",")
    )
    return EtcdTarget(endpoints, "/" + prefix, tls=tls)


def parse_static_target(target: str) -> tuple[Member, ...]:
    """`cluster://HOST:PORT[=SIZE][,HOST:PORT[=SIZE]...]` → one Member per address, in the
    order given.

    A static list has no registrations to read: each member's node id is its address and
    its data port is found as for a lone daemon. `=SIZE` (e.g. `=64GiB`) is the member's
    DRAM, which weighs its share of runs as a registered capacity does; a list gives a
    size to every member or to none (then all weigh the same). Every client of one store
    must use the same list, sizes included: placement is computed from it.
    ValueError says what is wrong.
    """
    usage = (
        "expected cluster://HOST:PORT[=SIZE][,HOST:PORT[=SIZE]...], "
        "e.g. cluster://h1:50051,h2:50051 or cluster://h1:50051=64GiB,h2:50051=32GiB"
    )
    if not target.startswith(STATIC_SCHEME):
        raise ValueError(f"cluster target {target!r} must start with {STATIC_SCHEME}; {usage}")
    entries = [part.strip() for part in target[len(STATIC_SCHEME) :].split(",")]
    if not any(entries):
        raise ValueError(f"cluster target {target!r} names no daemon; {usage}")
    members = []
    for entry in entries:
        address, equals, size_text = entry.partition("=")
        address = address.strip()
        parse_host_port(address, what=f"cluster target {target!r}")
        capacity: dict[str, int] = {}
        if equals:
            try:
                size = parse_size(size_text)
            except ValueError as error:
                raise ValueError(f"cluster target {target!r}: {address}'s size: {error}") from None
            if size <= 0:
                raise ValueError(f"cluster target {target!r}: {address}'s size must be above 0")
            capacity["dram"] = size
        members.append(
            Member(node_id=address, address=address, data_port=0, capacity_bytes=capacity)
        )
    addresses = [member.address for member in members]
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"cluster target {target!r} names a daemon twice")
    if len({bool(member.capacity_bytes) for member in members}) > 1:
        raise ValueError(
            f"cluster target {target!r} gives a size to some daemons only: give one to every "
            "daemon, or to none"
        )
    return tuple(members)


def parse_host_port(text: str, *, what: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` → (host, port); ValueError naming `what` otherwise."""
    host, colon, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{what}: {text!r} is not HOST:PORT with a port in 1..65535")
    return host, int(port_text)


def is_concrete_host(host: str) -> bool:
    """Whether another machine could reach `host`: not empty and not a wildcard address."""
    if not host:
        return False
    try:
        return not ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return True  # a name


@dataclass(frozen=True)
class Member:
    """One daemon as it registers itself: where to reach it and how much it holds."""

    node_id: str
    address: str  # HOST:PORT of its gRPC service
    data_port: int  # its TCP data plane on the same host; 0: none
    capacity_bytes: dict[str, int] = field(default_factory=dict)  # per tier name
    # Seconds left on its lease when read (list_members); -1 where not known.
    lease_ttl_left_s: int = -1

    def to_json(self) -> bytes:
        value = {
            "node_id": self.node_id,
            "address": self.address,
            "data_port": self.data_port,
            "capacity_bytes": self.capacity_bytes,
        }
        return json.dumps(value, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, lease_ttl_left_s: int = -1) -> Member:
        """A registered value → Member; ValueError where it is not one. Anything in etcd
        may be written by anyone who can write there: every field is checked (a HOST:PORT
        address, not a URL; a port; capacities as bounded whole numbers) so that no
        value can stop a client from following the membership."""
        try:
            value: Any = json.loads(raw)
            capacity = {
                str(tier): _capacity(nbytes)
                for tier, nbytes in dict(value["capacity_bytes"]).items()
            }
            node_id, address = value["node_id"], value["address"]
            data_port = value["data_port"]
            if not isinstance(node_id, str) or not 0 < len(node_id) <= MAX_NODE_ID_CHARS:
                raise ValueError(f"node_id must be 1 to {MAX_NODE_ID_CHARS} characters")
            if not isinstance(address, str) or "/" in address or any(c.isspace() for c in address):
                raise ValueError(f"address {address!r} is not HOST:PORT")
            parse_host_port(address, what="address")
            if type(data_port) is not int or not 0 <= data_port < 65536:
                raise ValueError(f"data_port {data_port!r} is not a port")
            return cls(
                node_id=node_id,
                address=address,
                data_port=data_port,
                capacity_bytes=capacity,
                lease_ttl_left_s=lease_ttl_left_s,
            )
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as error:
            raise ValueError(f"not a kvstore member record: {error}") from None


# Longer node ids are refused: placement hashes at most the first 64 bytes of an id.
MAX_NODE_ID_CHARS = 64
# A capacity above this (1 EiB) is no real tier's.
_MAX_CAPACITY_BYTES = 1 << 60


def _capacity(value: object) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_CAPACITY_BYTES:
        raise ValueError(f"a capacity must be a whole number of bytes up to 1 EiB, not {value!r}")
    return value
