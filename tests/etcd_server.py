"""A real etcd (Debian's etcd-server, 3.4) on free loopback ports, for tests.

    with etcd_server(tmp_path) as etcd:     # skips the test where `etcd` is not installed
        etcd.url("kvstore")                 # etcd://127.0.0.1:PORT/kvstore
        etcd.stop(); etcd.start()           # the same ports and data directory again

    with etcd_server(tmp_path, tls=EtcdServerTLS(cert, key)) as etcd:
        etcd.url("kvstore")                 # etcds://127.0.0.1:PORT/kvstore
        await enable_auth(etcd, access, ROOT_PASSWORD, [EtcdUser("kv", "pw", "/kvstore/")])

The launcher is the bench's (kvstore.bench.local_etcd), which LocalCluster uses too.
CI installs etcd (.ci/run), so there the tests always run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aetcd import rpc

from kvstore.bench.local_etcd import EtcdServer, EtcdServerTLS, etcd_missing_reason
from kvstore.cluster.etcd import open_etcd
from kvstore.cluster.etcd_options import EtcdAccess
from kvstore.cluster.members import parse_etcd_url

__all__ = [
    "EtcdServer",
    "EtcdServerTLS",
    "EtcdUser",
    "enable_auth",
    "etcd_missing_reason",
    "etcd_server",
]


@contextlib.contextmanager
def etcd_server(
    tmp_path: Path, *, tls: EtcdServerTLS | None = None, auth_token_ttl_s: int = 300
) -> Iterator[EtcdServer]:
    """A started etcd, stopped when the block ends; skips the test without the binary."""
    reason = etcd_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    server = EtcdServer(tmp_path / "etcd", tls=tls, auth_token_ttl_s=auth_token_ttl_s)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class EtcdUser:
    """A user to add, with read and write on the keys under `prefix` (none where empty)."""

    name: str
    password: str
    prefix: str = ""


async def enable_auth(
    etcd: EtcdServer, access: EtcdAccess, root_password: str, users: list[EtcdUser]
) -> None:
    """Turn etcd's authentication on through its Auth API, as `etcdctl user add root;
    etcdctl auth enable` would: user root (role root) with `root_password`, and `users`,
    each with a role of its own. `access` is how to reach etcd (its TLS)."""
    client = await open_etcd(parse_etcd_url(etcd.url("setup")), access)
    auth = client.auth_stub
    try:
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=root_password))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        for user in users:
            await auth.UserAdd(rpc.AuthUserAddRequest(name=user.name, password=user.password))
            if not user.prefix:
                continue
            role = f"{user.name}-role"
            await auth.RoleAdd(rpc.AuthRoleAddRequest(name=role))
            start = user.prefix.encode()
            end = start[:-1] + bytes([start[-1] + 1])  # every key that starts with it
            permission = rpc.Permission(permType=rpc.Permission.READWRITE, key=start, range_end=end)
            await auth.RoleGrantPermission(
                rpc.AuthRoleGrantPermissionRequest(name=role, perm=permission)
            )
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user.name, role=role))
        await auth.AuthEnable(rpc.AuthEnableRequest())
    finally:
        await client.close()
