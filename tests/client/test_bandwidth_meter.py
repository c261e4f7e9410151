"""The client's bandwidth meter, fed by real gets: one server (data plane and gRPC), the SSD
tier, a cluster of three (per node), and the blocking facade."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch
from metered_blocks import big_layout, tokens_for  # tests/metered_blocks.py

from kvstore.client import BandwidthMeter, ClientOptions, KVClient, SyncKVClient, TierKind
from kvstore.layout import KVLayout, Namespace
from kvstore.server import RunningServer

ServerFactory = Callable[..., Awaitable[RunningServer]]
ClientFactory = Callable[..., KVClient]
MiB = 1 << 20


async def test_a_get_is_a_sample_of_the_tier_that_served_it(
    connect: ClientFactory,
    make_layout: Callable[..., KVLayout],
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
) -> None:
    layout = big_layout(make_layout)
    client = connect(make_namespace(layout))
    assert isinstance(client.bandwidth, BandwidthMeter)
    tokens = tokens_for(8, layout.block_tokens)
    kv = make_kv(layout, 8)
    await client.put(tokens, kv)
    assert client.bandwidth.rate() is None, "a put is not a sample of what gets deliver"

    match = await client.lookup(tokens)
    assert match.tiers == (TierKind.DRAM,) * 8
    started = time.perf_counter()
    assert await client.get_into(match, torch.zeros_like(kv)) == 8
    elapsed = time.perf_counter() - started

    assert set(client.bandwidth.snapshot()) == {("", "dram")}
    rate = client.bandwidth.rate(tier="dram")
    assert rate is not None
    # The meter times less than the whole call, never more: the rate is at least this.
    assert rate >= 8 * layout.block_bytes / elapsed
    assert client.bandwidth.rate(tier="ssd") is None


async def test_a_miss_and_a_get_stopped_early_are_no_samples(
    connect: ClientFactory,
    make_layout: Callable[..., KVLayout],
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
) -> None:
    layout = big_layout(make_layout)
    client = connect(make_namespace(layout))
    tokens = tokens_for(4, layout.block_tokens, seed=2)
    assert await client.get_into(client.keys(tokens), make_kv(layout, 4)) == 0
    await client.put(tokens, make_kv(layout, 4))
    async for arrival in client.iter_layers(client.keys(tokens)):
        assert arrival.layer == 0
        break
    assert client.bandwidth.rate() is None


async def test_blocks_served_from_ssd_count_for_the_ssd_tier(
    server_factory: ServerFactory,
    tmp_path: Path,
    make_layout: Callable[..., KVLayout],
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
) -> None:
    server = await server_factory(
        store__dram_bytes=2 * MiB,
        store__ssd_dir=str(tmp_path / "ssd"),
        store__write_policy="write-through",
    )
    layout = big_layout(make_layout)
    async with KVClient(f"127.0.0.1:{server.port}", make_namespace(layout)) as client:
        first = tokens_for(4, layout.block_tokens, seed=3)
        await client.put(first, make_kv(layout, 4, seed=1))
        # 8 MiB more through 2 MiB of DRAM: the first chain survives on SSD only.
        for seed in range(4, 12):
            await client.put(tokens_for(8, layout.block_tokens, seed=seed), make_kv(layout, 8))
        match = await client.lookup(first)
        assert match.num_matched == 4
        assert TierKind.SSD in match.tiers
        assert await client.get_into(match, make_kv(layout, 4)) == 4
        assert ("", "ssd") in client.bandwidth.snapshot()


async def test_a_cluster_client_meters_each_node(
    server_factory: ServerFactory,
    make_namespace: Callable[..., Namespace],
    make_layout: Callable[..., KVLayout],
    make_kv: Callable[..., torch.Tensor],
) -> None:
    nodes = [await server_factory() for _ in range(3)]
    addresses = [f"127.0.0.1:{node.port}" for node in nodes]
    layout = big_layout(make_layout)
    options = ClientOptions(cluster_run_blocks=2, cluster_retry_s=60)
    target = "cluster://" + ",".join(addresses)
    async with KVClient(target, make_namespace(layout), options=options) as cluster:
        tokens = tokens_for(24, layout.block_tokens, seed=5)
        kv = make_kv(layout, 24)
        await cluster.put(tokens, kv)
        assert await cluster.get_into(await cluster.lookup(tokens), torch.zeros_like(kv)) == 24
        snapshot = cluster.bandwidth.snapshot()
        served_by = {node for node, _ in snapshot}
        assert len(served_by) > 1, "the chain spreads over several nodes, each one metered"
        assert served_by <= set(addresses)  # a static target's members are named by address
        assert {tier for _, tier in snapshot} == {"dram"}
        for address in served_by:
            assert cluster.bandwidth.rate(node=address) is not None


def test_the_sync_facade_hands_out_the_same_meter(
    store_target: str,
    make_layout: Callable[..., KVLayout],
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
) -> None:
    layout = big_layout(make_layout)
    with SyncKVClient(store_target, make_namespace(layout, tenant="sync-meter")) as client:
        tokens = tokens_for(2, layout.block_tokens, seed=7)
        kv = make_kv(layout, 2)
        client.put(tokens, kv)
        assert client.bandwidth.rate() is None
        assert client.get_into(client.lookup(tokens), torch.zeros_like(kv)) == 2
        assert client.bandwidth.rate(tier="dram") is not None
