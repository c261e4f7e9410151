"""Talking to etcd for membership, through aetcd (an asyncio etcd v3 client).

`open_etcd` returns a connected client for the first endpoint of a target that answers;
`read_members` and `list_members` read what the daemons registered (kvstore.cluster.Member).
"""

from __future__ import annotations

import logging

import aetcd

from kvstore.cluster.members import EtcdTarget, Member, parse_etcd_url

logger = logging.getLogger("kvstore.cluster")


class EtcdUnavailable(ConnectionError):
    """No endpoint of the target answered."""


async def open_etcd(target: EtcdTarget, *, timeout_s: float = 3.0) -> aetcd.Client:
    """A client connected to the first endpoint that answers a status call, in order.

    Every call it makes gives up after `timeout_s` (aetcd takes whole seconds).
    """
    failures = []
    for host, port in target.endpoints:
        client = aetcd.Client(host=host, port=port, timeout=max(1, round(timeout_s)))
        try:
            await client.connect()
            await client.status()
        except (aetcd.ClientError, OSError) as error:
            await client.close()
            failures.append(f"{host}:{port}: {type(error).__name__} {error}".rstrip())
            continue
        return client
    raise EtcdUnavailable("no etcd endpoint answered (" + "; ".join(failures) + ")")


async def read_members(
    client: aetcd.Client, target: EtcdTarget, *, with_leases: bool = False
) -> list[Member]:
    """The members registered under the target's prefix, by node id; with `with_leases`,
    each with its lease's seconds left (one more call per member). Values that are not
    member records are skipped (and logged)."""
    found = await client.get_prefix(target.members_prefix.encode())
    members = []
    for entry in found:
        ttl_left_s = -1
        if with_leases and entry.lease:
            info = await client.get_lease_info(entry.lease, keys=False)
            ttl_left_s = int(info.TTL)
        try:
            members.append(Member.from_json(entry.value, lease_ttl_left_s=ttl_left_s))
        except ValueError as error:
            logger.warning("skipping %r in etcd: %s", entry.key, error)
    return sorted(members, key=lambda member: member.node_id)


async def list_members(etcd_url: str, *, timeout_s: float = 3.0) -> list[Member]:
    """The members registered under the URL's prefix, by node id, each with its lease's
    seconds left."""
    target = parse_etcd_url(etcd_url)
    client = await open_etcd(target, timeout_s=timeout_s)
    try:
        return await read_members(client, target, with_leases=True)
    finally:
        await client.close()
