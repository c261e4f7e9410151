"""`kvstore-server cluster status --cluster etcd://HOST:PORT/PREFIX`: every registered
member, its address, capacity, use and health, and how long its lease has left.

Membership comes from etcd (kvstore.cluster.etcd), over TLS and logged in where the
`--etcd-*` flags or KVSTORE_ETCD_* variables say (kvstore.cluster.etcd_options); use
and health come from each member's own Stats, asked over gRPC with the same token and
TLS flags as `kvstore-server stats`. A member that does not answer is listed with the
status it failed with: it is registered, but it serves nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import grpc
from rich.console import Console
from rich.table import Table

from kvstore.cluster.etcd import EtcdUnavailable, list_members
from kvstore.cluster.etcd_options import EtcdOptions
from kvstore.cluster.members import Member
from kvstore.units import human_bytes
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

ChannelFor = Callable[[str], grpc.Channel]
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class MemberStatus:
    node_id: str
    address: str
    data_port: int
    capacity_bytes: dict[str, int]
    used_bytes: dict[str, int]  # per tier, from its Stats; empty when it did not answer
    health: str  # SERVING, or the status code its Stats failed with
    lease_ttl_left_s: int


def member_status(
    member: Member, channel_for: ChannelFor, metadata: Metadata, timeout_s: float
) -> MemberStatus:
    """One member's row: its registration, and what its own Stats say."""
    used: dict[str, int] = {}
    try:
        with channel_for(member.address) as channel:
            stats = pb_grpc.KVStoreStub(channel).Stats(
                pb.StatsRequest(), timeout=timeout_s, metadata=metadata
            )
        used = {tier.name: tier.used_bytes for tier in stats.tiers}
        health = "SERVING"
    except grpc.RpcError as error:
        health = error.code().name
    return MemberStatus(
        node_id=member.node_id,
        address=member.address,
        data_port=member.data_port,
        capacity_bytes=dict(member.capacity_bytes),
        used_bytes=used,
        health=health,
        lease_ttl_left_s=member.lease_ttl_left_s,
    )


def run_cluster_status(
    args: argparse.Namespace,
    channel_for: ChannelFor,
    metadata: Metadata,
    etcd_options: EtcdOptions | None = None,
) -> int:
    """Print the members of `args.cluster`; 1 when etcd cannot be read (the message says
    why, and what to change where etcd refused these settings)."""
    try:
        members = asyncio.run(
            list_members(args.cluster, options=etcd_options, timeout_s=args.timeout)
        )
    except (EtcdUnavailable, ValueError) as error:
        print(f"kvstore-server cluster status: {error}")
        return 1
    rows = [member_status(member, channel_for, metadata, args.timeout) for member in members]
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
        return 0
    table = Table(title=f"kvstore cluster {args.cluster}: {len(rows)} member(s)")
    for column in ("node", "address", "data port", "DRAM used / capacity", "health", "lease"):
        table.add_column(column)
    for row in rows:
        dram = f"{human_bytes(row.used_bytes.get('dram', 0))} / " + human_bytes(
            row.capacity_bytes.get("dram", 0)
        )
        lease = f"{row.lease_ttl_left_s} s" if row.lease_ttl_left_s >= 0 else "?"
        table.add_row(row.node_id, row.address, str(row.data_port), dram, row.health, lease)
    Console().print(table)
    return 0
