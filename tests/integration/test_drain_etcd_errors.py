"""A drain whose withdrawal from etcd fails still flushes write-back blocks: the etcd
password of a daemon is rotated while it runs (rotate, then roll the daemons), so its
withdrawal's re-login is refused with grpc's own error, which escaped the drain before
the flush and lost every DRAM-only block."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aetcd import rpc
from etcd_server import EtcdUser, enable_auth, etcd_server  # tests/etcd_server.py
from keyed_blocks import keyed_tensor  # tests/keyed_blocks.py

from kvstore.client import ClientOptions, KVClient
from kvstore.cluster.etcd import open_etcd
from kvstore.cluster.etcd_options import EtcdAccess, EtcdOptions, load_access
from kvstore.cluster.members import parse_etcd_url
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.server import build_server, load_config

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, dtype=DType.FLOAT16, block_tokens=16)
NS = Namespace(tenant="t", model_fingerprint="rotated", layout=LAYOUT)


async def test_a_refused_withdrawal_does_not_stop_the_flush(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as etcd:
        url = etcd.url("kvrot")
        await enable_auth(etcd, EtcdAccess(), "rootpw", [EtcdUser("kv", "pw1", "/kvrot/")])
        (tmp_path / "pw").write_text("pw1\n")
        ssd_dir = tmp_path / "ssd"
        settings: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "shm_socket": "off",
            "store.dram_bytes": 64 << 20,
            "store.page_bytes": 16 << 10,
            "store.ssd_dir": str(ssd_dir),
            "store.write_policy": "write-back",
            "limits.drain_grace_s": 1.0,
            "cluster.etcd": url,
            "cluster.etcd_user": "kv",
            "cluster.etcd_password_file": str(tmp_path / "pw"),
            "cluster.lease_ttl_s": 3,
        }
        running = await build_server(load_config(None, settings))
        membership = running.membership
        assert membership is not None
        for _ in range(100):
            if membership.registered:
                break
            await asyncio.sleep(0.1)
        assert membership.registered
        keys = [f"k/{index}".encode() for index in range(10)]
        options = ClientOptions(verify_checksums=False)
        async with KVClient(f"127.0.0.1:{running.port}", NS, options=options) as client:
            result = await client.put_blocks(keys, keyed_tensor(LAYOUT, keys))
            assert result.num_committed == len(keys)
        target = parse_etcd_url(url)
        root = await open_etcd(
            target, load_access(target, EtcdOptions(user="root", password="rootpw"))
        )
        try:
            await root.auth_stub.UserChangePassword(
                rpc.AuthUserChangePasswordRequest(name="kv", password="pw2"), metadata=root.metadata
            )
        finally:
            await root.close()
        await running.drain()  # raised before the flush
        assert len(list(ssd_dir.glob("*/*.kvb"))) == len(keys)
