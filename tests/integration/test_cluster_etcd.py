"""The cluster client following membership in a real etcd (issue 16, items 3 and 4):
daemons that register are found, one that joins or drains changes placement, and etcd
going away leaves clients serving from the last membership, saying so."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from etcd_server import EtcdServer, etcd_server  # tests/etcd_server.py

from kvstore.client import ClientOptions, KVClient, PutOutcome, Unavailable
from kvstore.client._cluster import ClusterClient
from kvstore.cluster.etcd import list_members, open_etcd
from kvstore.cluster.etcd_options import EtcdAccess
from kvstore.cluster.members import parse_etcd_url
from kvstore.layout import Namespace
from kvstore.server import RunningServer, build_server, load_config

MiB = 1 << 20
PREFIX = "kvcluster"
NUM_BLOCKS = 12
OPTIONS = ClientOptions(cluster_run_blocks=2, cluster_refresh_s=0.1, cluster_retry_s=60)


async def wait_until(probe: Callable[[], Awaitable[bool] | bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = probe()
        if outcome if isinstance(outcome, bool) else await outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.05)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    with etcd_server(tmp_path) as server:
        yield server


@pytest.fixture
async def start_node(etcd: EtcdServer) -> AsyncIterator[Callable[..., Awaitable[RunningServer]]]:
    started: list[RunningServer] = []

    async def start(**settings: Any) -> RunningServer:
        config = load_config(
            None,
            {
                "listen": "127.0.0.1:0",
                "log_level": "warning",
                "store.dram_bytes": 8 * MiB,
                "store.page_bytes": 4096,
                "limits.drain_grace_s": 1.0,
                "cluster.etcd": etcd.url(PREFIX),
                "cluster.lease_ttl_s": 5,
                **settings,
            },
        )
        running = await build_server(config)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.drain()


async def registered(etcd: EtcdServer, count: int) -> None:
    async def enough() -> bool:
        return len(await list_members(etcd.url(PREFIX))) == count

    await wait_until(enough)


def tokens(seed: int) -> list[int]:
    block_tokens = 16  # the block size of the make_namespace fixture's layout
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (NUM_BLOCKS * block_tokens,), generator=generator).tolist()


async def test_the_client_finds_the_registered_nodes_and_uses_them_all(
    etcd: EtcdServer,
    start_node: Any,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    nodes = [await start_node() for _ in range(3)]
    await registered(etcd, 3)
    layout = make_namespace().layout
    kv = make_kv(layout, NUM_BLOCKS, seed=1)
    async with KVClient(etcd.url(PREFIX), make_namespace(), options=OPTIONS) as client:
        assert isinstance(client, ClusterClient)
        assert (await client.put(tokens(1), kv)).num_committed == NUM_BLOCKS
        assert len(client.membership.members) == 3
        dest = torch.zeros_like(kv)
        assert await client.get_into(await client.lookup(tokens(1)), dest) == NUM_BLOCKS
        assert same_bytes(dest, kv)
        placement = client.membership.placement
        keys = client.keys(tokens(1))
    # Each node holds exactly the runs placement gives it.
    for node in nodes:
        assert node.membership is not None
        node_id = node.membership.member.node_id
        owned = sum(
            run.stop - run.start for run in placement.runs(keys) if run.owner.node_id == node_id
        )
        assert node.store.report().tiers[0].num_blocks == owned


async def test_a_node_that_joins_or_drains_changes_the_membership(
    etcd: EtcdServer,
    start_node: Any,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    nodes = [await start_node() for _ in range(2)]
    await registered(etcd, 2)
    async with KVClient(etcd.url(PREFIX), make_namespace(), options=OPTIONS) as client:
        assert isinstance(client, ClusterClient)
        await client.lookup(tokens(2))
        assert len(client.membership.members) == 2
        await start_node()
        await wait_until(lambda: len(client.membership.members) == 3)
        await nodes[0].drain()
        await wait_until(lambda: len(client.membership.members) == 2)
        addresses = {member.address for member in client.membership.members}
        assert f"127.0.0.1:{nodes[0].port}" not in addresses
        kv = make_kv(make_namespace().layout, NUM_BLOCKS, seed=2)
        result = await client.put(tokens(2), kv)
        assert result.outcomes == (PutOutcome.COMMITTED,) * NUM_BLOCKS


async def test_clients_keep_the_last_membership_while_etcd_is_down(
    etcd: EtcdServer,
    start_node: Any,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    for _ in range(3):
        await start_node()
    await registered(etcd, 3)
    layout = make_namespace().layout
    kv = make_kv(layout, NUM_BLOCKS, seed=3)
    async with KVClient(etcd.url(PREFIX), make_namespace(), options=OPTIONS) as client:
        assert isinstance(client, ClusterClient)
        await client.put(tokens(3), kv)
        await asyncio.to_thread(etcd.stop)
        await wait_until(lambda: client.membership.stale_since is not None)
        stats = await client.cluster_stats()
        assert stats.membership_stale_since is not None
        assert stats.membership_error
        # Still serving, from the last membership.
        assert (await client.lookup(tokens(3))).num_matched == NUM_BLOCKS
        dest = torch.zeros_like(kv)
        assert await client.get_into(client.keys(tokens(3)), dest) == NUM_BLOCKS
        assert same_bytes(dest, kv)
        assert (await client.put(tokens(4), kv)).num_committed == NUM_BLOCKS
        await asyncio.to_thread(etcd.start)
        await wait_until(lambda: client.membership.stale_since is None, timeout_s=30)
        assert len(client.membership.members) == 3


async def test_an_unreachable_etcd_at_the_first_call_is_unavailable(
    etcd: EtcdServer,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    url = etcd.url(PREFIX)
    await asyncio.to_thread(etcd.stop)
    async with KVClient(url, make_namespace(), options=OPTIONS) as client:
        with pytest.raises(Unavailable, match="cannot read the cluster's members"):
            await client.lookup(tokens(5))


async def test_an_empty_cluster_misses_and_stores_nothing(
    etcd: EtcdServer,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    layout = make_namespace().layout
    async with KVClient(etcd.url(PREFIX), make_namespace(), options=OPTIONS) as client:
        assert (await client.lookup(tokens(6))).num_matched == 0
        result = await client.put(tokens(6), make_kv(layout, NUM_BLOCKS))
        assert result.outcomes == (PutOutcome.NODE_UNREACHABLE,) * NUM_BLOCKS
        assert await client.get_into(client.keys(tokens(6)), make_kv(layout, NUM_BLOCKS)) == 0


async def etcd_client(etcd: EtcdServer) -> Any:
    return await open_etcd(parse_etcd_url(etcd.url(PREFIX)), EtcdAccess())


HOSTILE_RECORDS = {
    "infinite capacity": b'{"node_id": "inf", "address": "127.0.0.1:1", "data_port": 0,'
    b' "capacity_bytes": {"dram": Infinity}}',
    "huge capacity": b'{"node_id": "big", "address": "127.0.0.1:1", "data_port": 0,'
    b' "capacity_bytes": {"dram": 1' + b"0" * 400 + b"}}",
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "a URL for an address": b'{"node_id": "url", "address": "cluster://127.0.0.1:1",'
    b' "data_port": 0, "capacity_bytes": {"dram": 1}}',
}


async def test_hostile_member_records_are_skipped_and_the_membership_followed(
    etcd: EtcdServer, start_node: Any, make_namespace: Callable[..., Namespace]
) -> None:
    # Anyone who can write under the prefix can write anything there: no value may stop
    # a client from following the membership, nor its close.
    first = await start_node()
    await registered(etcd, 1)
    assert first.membership is not None
    writer = await etcd_client(etcd)
    try:
        target = parse_etcd_url(etcd.url(PREFIX))
        for name, value in HOSTILE_RECORDS.items():
            await writer.put(target.member_key(name.replace(" ", "-")).encode(), value)
        # A second record of the first node's id, under another key: not that daemon's.
        twin = first.membership.member.to_json()
        await writer.put(target.member_key("twin").encode(), twin)
        client = KVClient(etcd.url(PREFIX), make_namespace(), options=OPTIONS)
        assert isinstance(client, ClusterClient)
        await client.lookup(tokens(3))
        assert [m.node_id for m in client.membership.members] == [first.membership.member.node_id]
        second = await start_node()
        assert second.membership is not None
        await wait_until(lambda: len(client.membership.members) == 2)
        await client.close()  # raises nothing
    finally:
        await writer.close()


async def test_a_daemon_whose_record_is_deleted_registers_again(
    etcd: EtcdServer, start_node: Any
) -> None:
    node = await start_node(**{"cluster.lease_ttl_s": 6})
    await registered(etcd, 1)
    assert node.membership is not None
    writer = await etcd_client(etcd)
    try:
        await writer.delete(node.membership.key.encode())  # its lease lives on
        assert await list_members(etcd.url(PREFIX)) == []
        await registered(etcd, 1)
    finally:
        await writer.close()
