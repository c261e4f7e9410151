"""Hard per-tenant quotas through a real server and the real client, on both transports:
a noisy neighbour cannot evict a quoted tenant's working set, a quota with nothing
evictable is RESOURCE_EXHAUSTED naming the quota, pinned bytes, and max_transfers (a
stalled layer put holds a slot)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
import torch
from rich.console import Console

from kvstore.client import (
    ClientOptions,
    DType,
    KVClient,
    KVForm,
    KVLayout,
    Namespace,
    ResourceExhausted,
)
from kvstore.server import RunningServer
from kvstore.server.main import print_stats
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=16)
BLOCK_BYTES = 2048
NOISY = Namespace(tenant="noisy", model_fingerprint="toy", layout=LAYOUT)
QUIET = Namespace(tenant="quiet", model_fingerprint="toy", layout=LAYOUT)
TRANSPORTS = pytest.mark.parametrize("data_plane", [False, True], ids=["grpc", "data-plane"])

ServerFactory = Callable[..., Awaitable[RunningServer]]
MakeKV = Callable[..., torch.Tensor]
Poll = Callable[..., Awaitable[None]]


async def start(server_factory: ServerFactory, dram_blocks: int, **quotas: Any) -> RunningServer:
    assert LAYOUT.block_bytes == BLOCK_BYTES
    return await server_factory(
        **{
            "store.dram_bytes": dram_blocks * BLOCK_BYTES,
            "store.page_bytes": BLOCK_BYTES,
            "quotas": quotas,
        }
    )


def client(running: RunningServer, namespace: Namespace, data_plane: bool) -> KVClient:
    options = ClientOptions(data_plane=data_plane)
    return KVClient(f"127.0.0.1:{running.port}", namespace, options=options)


async def assert_all_hit(quiet: KVClient, keys: list[bytes], kv: torch.Tensor) -> None:
    assert (await quiet.lookup_keys(keys)).num_matched == len(keys)
    dest = torch.zeros_like(kv)
    assert await quiet.get_into(keys, dest, form=KVForm.BLOCKS) == len(keys)
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))


@TRANSPORTS
@pytest.mark.parametrize("noisy_quota", [None, "64KiB"], ids=["noisy-unquoted", "noisy-quoted"])
async def test_a_noisy_neighbour_never_evicts_a_quoted_working_set(
    server_factory: ServerFactory, make_kv: MakeKV, data_plane: bool, noisy_quota: str | None
) -> None:
    quotas: dict[str, Any] = {"quiet": {"dram_bytes": "32KiB"}}  # 16 blocks of 64 in DRAM
    if noisy_quota is not None:
        quotas["noisy"] = {"dram_bytes": noisy_quota}
    running = await start(server_factory, 64, **quotas)
    working_set = [b"quiet-%d" % i for i in range(12)]
    quiet_kv = make_kv(LAYOUT, len(working_set), form=KVForm.BLOCKS, seed=7)
    flood_kv = make_kv(LAYOUT, 16, form=KVForm.BLOCKS, seed=8)
    async with (
        client(running, QUIET, data_plane) as quiet,
        client(running, NOISY, data_plane) as noisy,
    ):
        assert (await quiet.put_blocks(working_set, quiet_kv)).num_committed == 12
        for round_number in range(4):
            # More than all of DRAM between two uses of the working set: a global LRU
            # would have evicted it each time.
            for put_number in range(5):
                keys = [b"flood-%d-%d-%d" % (round_number, put_number, i) for i in range(16)]
                assert (await noisy.put_blocks(keys, flood_kv)).num_committed == 16
            await assert_all_hit(quiet, working_set, quiet_kv)
        stats = await quiet.stats()
    (dram,) = [tier for tier in stats.tiers if tier.tier == pb.DRAM]
    assert dram.evictions >= 320 - 64  # the flood did evict, its own blocks only


@TRANSPORTS
async def test_a_full_quota_with_nothing_evictable_is_resource_exhausted_naming_it(
    server_factory: ServerFactory, make_kv: MakeKV, data_plane: bool
) -> None:
    running = await start(server_factory, 32, quiet={"dram_bytes": "16KiB"})  # 8 blocks
    held = [b"held-%d" % i for i in range(8)]
    kv = make_kv(LAYOUT, 8, form=KVForm.BLOCKS)
    async with (
        client(running, QUIET, data_plane) as quiet,
        client(running, NOISY, data_plane) as noisy,
    ):
        assert (await noisy.put_blocks([b"n-%d" % i for i in range(8)], kv)).num_committed == 8
        assert (await quiet.put_blocks(held, kv)).num_committed == 8
        assert await quiet.pin(held, ttl_s=60) == 8
        message = (
            r"tenant 'quiet' is at its DRAM quota \(16\.0 KiB, 16\.0 KiB used, 0 B evictable\)"
        )
        with pytest.raises(ResourceExhausted, match=message):
            await quiet.put_blocks([b"late-%d" % i for i in range(2)], kv[:2])

        async def layer_put() -> None:
            async with quiet.layer_put([b"layer-late"]) as put:
                for layer in range(LAYOUT.num_layers):
                    await put.send_layer(layer, kv[:1, layer].contiguous())

        with pytest.raises(ResourceExhausted, match=message):
            await layer_put()
        # Nothing was evicted: quiet's blocks and noisy's all stay; the server serves on.
        await assert_all_hit(quiet, held, kv)
        assert (await noisy.lookup_keys([b"n-%d" % i for i in range(8)])).num_matched == 8
        assert (await noisy.put_blocks([b"n-late"], kv[:1])).num_committed == 1


@TRANSPORTS
@pytest.mark.parametrize("quoted_tier", [False, True], ids=["whole-tier", "shared-space"])
async def test_an_out_of_room_error_tells_a_tenant_nothing_of_the_others(
    server_factory: ServerFactory, make_kv: MakeKV, data_plane: bool, quoted_tier: bool
) -> None:
    # Another tenant's pinned blocks fill the space: the error says there is no room,
    # not how much the others use, pin or could evict (their own Stats hide that too).
    quotas = {"somebody": {"dram_bytes": "8KiB"}} if quoted_tier else {}
    running = await start(server_factory, 16, **quotas)
    count = 11 if quoted_tier else 13  # of the 12 blocks shared, or the tier's 16
    kv = make_kv(LAYOUT, count, form=KVForm.BLOCKS)
    pinned = [b"noisy-%d" % i for i in range(count)]
    async with (
        client(running, QUIET, data_plane) as quiet,
        client(running, NOISY, data_plane) as noisy,
    ):
        for start_at in range(0, count, 4):  # a put holds at most a few started blocks
            batch = slice(start_at, start_at + 4)
            await noisy.put_blocks(pinned[batch], kv[batch])
        assert await noisy.pin(pinned, ttl_s=60) == count
        with pytest.raises(ResourceExhausted) as raised:
            await quiet.put_blocks([b"q-%d" % i for i in range(4)], kv[:4])
    message = str(raised.value)
    assert str(count) not in message  # the pinned blocks' count
    assert "used" not in message
    assert "evictable" not in message
    assert "free of" not in message


async def test_a_pin_past_the_pinned_quota_is_resource_exhausted(
    server_factory: ServerFactory, make_kv: MakeKV
) -> None:
    running = await start(server_factory, 32, quiet={"pinned_bytes": "4KiB"})  # 2 blocks
    keys = [b"p-%d" % i for i in range(3)]
    async with client(running, QUIET, False) as quiet:
        await quiet.put_blocks(keys, make_kv(LAYOUT, 3, form=KVForm.BLOCKS))
        assert await quiet.pin(keys[:2], ttl_s=60) == 2
        with pytest.raises(ResourceExhausted, match="tenant 'quiet' is at its pinned_bytes quota"):
            await quiet.pin(keys[2:], ttl_s=60)
        assert await quiet.unpin(keys[:1]) == 1
        assert await quiet.pin(keys[2:], ttl_s=60) == 1
        assert (await quiet.stats()).num_pinned == 2


@TRANSPORTS
async def test_max_transfers_counts_a_stalled_layer_put_and_frees_its_slot(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll, data_plane: bool
) -> None:
    running = await start(server_factory, 32, quiet={"max_transfers": 1})
    kv = make_kv(LAYOUT, 2, form=KVForm.BLOCKS)
    async with (
        client(running, QUIET, data_plane) as stalled,
        client(running, QUIET, data_plane) as other,
        client(running, NOISY, data_plane) as noisy,
    ):
        await other.put_blocks([b"stored"], kv[:1])
        go_on = asyncio.Event()
        layer_zero_in = asyncio.Event()

        async def stalled_put() -> None:
            async with stalled.layer_put([b"slow"]) as put:
                await put.send_layer(0, kv[:1, 0].contiguous())
                layer_zero_in.set()
                await go_on.wait()
                await put.send_layer(1, kv[:1, 1].contiguous())

        task = asyncio.create_task(stalled_put())
        await layer_zero_in.wait()

        async def slot_taken() -> bool:
            try:
                await other.put_blocks([b"probe"], kv[:1])
            except ResourceExhausted as error:
                return "tenant 'quiet' is at its max_transfers quota (1 puts" in str(error)
            await other.delete([b"probe"])
            return False

        await poll(slot_taken, timeout_s=10.0)
        dest = torch.zeros_like(kv[:1])
        with pytest.raises(ResourceExhausted, match="max_transfers quota"):
            await other.get_into([b"stored"], dest, form=KVForm.BLOCKS)
        # Another tenant's transfers do not count.
        assert (await noisy.put_blocks([b"n"], kv[:1])).num_committed == 1
        go_on.set()
        await task
        assert (await other.lookup_keys([b"slow"])).num_matched == 1
        assert await other.get_into([b"stored"], dest, form=KVForm.BLOCKS) == 1
        # A transfer that fails after taking its slot frees it too.
        huge_layout = KVLayout(
            num_layers=80, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=16
        )
        huge = Namespace(tenant="quiet", model_fingerprint="huge", layout=huge_layout)
        async with client(running, huge, data_plane) as too_big:
            with pytest.raises(ResourceExhausted, match="larger than the whole DRAM tier"):
                await too_big.put_blocks([b"big"], make_kv(huge_layout, 1, form=KVForm.BLOCKS))
        assert (await other.put_blocks([b"after"], kv[:1])).num_committed == 1


async def test_stats_report_each_tenant_against_its_quotas(
    server_factory: ServerFactory, make_kv: MakeKV
) -> None:
    running = await start(server_factory, 32, quiet={"dram_bytes": "8KiB", "pinned_bytes": "4KiB"})
    kv = make_kv(LAYOUT, 6, form=KVForm.BLOCKS)
    async with (
        client(running, QUIET, False) as quiet,
        client(running, NOISY, False) as noisy,
    ):
        for first in (0, 2, 4):  # 4 fit: the first chain is evicted
            await quiet.put_blocks([b"q-%d" % first, b"q-%d" % (first + 1)], kv[:2])
        await quiet.pin([b"q-5"], ttl_s=60)
        await noisy.put_blocks([b"n-0", b"n-1"], kv[:2])
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        async with channel:
            stats = await pb_grpc.KVStoreStub(channel).Stats(pb.StatsRequest(), timeout=5)
    by_name = {tenant.tenant: tenant for tenant in stats.tenants}
    assert sorted(by_name) == ["noisy", "quiet"]
    (quiet_dram,) = [tier for tier in by_name["quiet"].tiers if tier.tier == pb.DRAM]
    assert (quiet_dram.used_bytes, quiet_dram.num_blocks) == (8192, 4)
    assert (quiet_dram.has_quota, quiet_dram.quota_bytes, quiet_dram.quota_evictions) == (
        True,
        8192,
        2,
    )
    assert (by_name["quiet"].pinned_bytes, by_name["quiet"].pinned_quota_bytes) == (2048, 4096)
    (noisy_dram,) = [tier for tier in by_name["noisy"].tiers if tier.tier == pb.DRAM]
    assert (noisy_dram.used_bytes, noisy_dram.has_quota) == (4096, False)
    console = Console(record=True, width=200)
    print_stats(stats, console)
    text = console.export_text()
    assert "kvstore tenants" in text
    assert "8.0 KiB / 8.0 KiB (4, 2)" in text
    assert "4.0 KiB / shared (2, 0)" in text


async def test_stats_of_more_tenants_than_a_message_holds_is_cut_to_fit(
    server_factory: ServerFactory,
) -> None:
    """An admin's (or an unauthenticated) Stats lists every tenant only while the reply
    fits the message limit; it says how many it left out, rather than failing."""
    names = [f"tenant-{index:05d}-{'x' * 40}" for index in range(3000)]
    running = await server_factory(
        **{
            "limits.max_message_bytes": 64 << 10,
            "limits.default_chunk_bytes": 60 << 10,
            "quotas": {name: {"pinned_bytes": 1 << 20} for name in names},
        }
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.KVStoreStub(channel)
        reply = await stub.Stats(pb.StatsRequest(), timeout=10)
    listed = [entry.tenant for entry in reply.tenants]
    assert listed == names[: len(listed)]  # the first ones by name
    assert 0 < len(listed) < len(names)
    assert reply.tenants_omitted == len(names) - len(listed)
    assert reply.ByteSize() <= 64 << 10
    # Printed by `kvstore-server stats` with the count left out.
    console = Console(record=True, width=200)
    print_stats(reply, console)
    assert f"{reply.tenants_omitted} more tenants left out" in console.export_text()
