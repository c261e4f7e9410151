"""The read throttle on a real server, over the data plane and gRPC: moving N bytes from a
tier throttled to R takes at least about N / R, all gets together; other tiers, lookups and
the event loop are not held up; Stats reports the rate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch
from metered_blocks import FakeClock, big_layout, tokens_for  # tests/metered_blocks.py

from kvstore.client import KVClient, TierKind
from kvstore.layout import KVLayout, Namespace
from kvstore.server import RunningServer
from kvstore.server.throttle import BURST_S, ReadThrottle, TokenBucket

ServerFactory = Callable[..., Awaitable[RunningServer]]
ClientFactory = Callable[..., KVClient]
MB = 1000**2
RATE = 8 * MB
NUM_BLOCKS = 16  # of 128 KiB: 2 MiB, 0.26 s at RATE


def least_seconds(nbytes: int, rate: float = RATE) -> float:
    """The shortest time the throttle allows for `nbytes`: a full bucket's burst goes free."""
    return (nbytes - rate * BURST_S) / rate


async def test_a_throttled_get_takes_at_least_bytes_over_rate(
    server_factory: ServerFactory,
    connect: ClientFactory,
    make_layout: Callable[..., KVLayout],
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    server = await server_factory(store__read_bytes_per_s={"dram": RATE})
    layout = big_layout(make_layout)
    client = connect(make_namespace(layout), at=f"127.0.0.1:{server.port}")
    tokens = tokens_for(NUM_BLOCKS, layout.block_tokens)
    kv = make_kv(layout, NUM_BLOCKS)
    await client.put(tokens, kv)  # puts are not throttled
    nbytes = NUM_BLOCKS * layout.block_bytes

    dest = torch.zeros_like(kv)
    started = time.perf_counter()
    assert await client.get_into(await client.lookup(tokens), dest) == NUM_BLOCKS
    elapsed = time.perf_counter() - started
    assert same_bytes(dest, kv)
    assert elapsed >= least_seconds(nbytes)
    # Generous: a throttle that stalls, or charges far more than it should, fails this.
    assert elapsed < 10 * nbytes / RATE + 3.0
    measured = client.bandwidth.rate(tier="dram")
    assert measured is not None
    assert measured <= RATE * 1.1

    stats = await client.stats()
    rates = {tier.tier: tier.read_bytes_per_s for tier in stats.tiers}
    assert rates[TierKind.DRAM] == RATE


async def test_concurrent_gets_share_the_rate_and_lookups_go_on(
    server_factory: ServerFactory,
    make_layout: Callable[..., KVLayout],
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
) -> None:
    server = await server_factory(store__read_bytes_per_s={"dram": RATE})
    layout = big_layout(make_layout)
    async with KVClient(f"127.0.0.1:{server.port}", make_namespace(layout)) as client:
        chains = [tokens_for(NUM_BLOCKS, layout.block_tokens, seed=seed) for seed in (1, 2)]
        for seed, tokens in enumerate(chains):
            await client.put(tokens, make_kv(layout, NUM_BLOCKS, seed=seed))
        matches = [await client.lookup(tokens) for tokens in chains]

        started = time.perf_counter()
        gets = [
            asyncio.create_task(client.get_into(match, make_kv(layout, NUM_BLOCKS)))
            for match in matches
        ]
        await asyncio.sleep(0.05)
        # The event loop is free while gets wait on the bucket: a lookup answers meanwhile.
        assert (await client.lookup(chains[0])).num_matched == NUM_BLOCKS
        assert not all(get.done() for get in gets)
        assert await asyncio.gather(*gets) == [NUM_BLOCKS, NUM_BLOCKS]
        elapsed = time.perf_counter() - started
        assert elapsed >= least_seconds(2 * NUM_BLOCKS * layout.block_bytes)


async def test_only_the_named_tier_is_throttled(
    server_factory: ServerFactory,
    tmp_path: Path,
    make_layout: Callable[..., KVLayout],
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
) -> None:
    slow = 100_000  # 0.1 MB/s: 2 MiB from this tier would take 20 s
    server = await server_factory(
        store__ssd_dir=str(tmp_path / "ssd"), store__read_bytes_per_s={"ssd": slow}
    )
    layout = big_layout(make_layout)
    async with KVClient(f"127.0.0.1:{server.port}", make_namespace(layout)) as client:
        tokens = tokens_for(NUM_BLOCKS, layout.block_tokens)
        await client.put(tokens, make_kv(layout, NUM_BLOCKS))
        match = await client.lookup(tokens)
        assert set(match.tiers) == {TierKind.DRAM}
        started = time.perf_counter()
        assert await client.get_into(match, make_kv(layout, NUM_BLOCKS)) == NUM_BLOCKS
        assert time.perf_counter() - started < 10.0
        rates = {tier.tier: tier.read_bytes_per_s for tier in (await client.stats()).tiers}
        assert rates == {TierKind.DRAM: 0, TierKind.SSD: slow}


def test_the_bucket_lends_its_burst_then_charges_debt_in_order() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst_bytes=100.0, clock=clock)
    assert bucket.charge(100) == 0.0  # the burst
    assert bucket.charge(500) == pytest.approx(0.5)
    assert bucket.charge(500) == pytest.approx(1.0)  # queued behind the first debt
    clock.now = 1.0
    assert bucket.charge(0) == 0.0  # repaid
    clock.now = 100.0
    assert bucket.charge(150) == pytest.approx(0.05)  # refilled only up to the burst


async def test_a_message_waits_for_its_slowest_tier() -> None:
    throttle = ReadThrottle({TierKind.DRAM: 1e12, TierKind.SSD: 1000.0})
    assert throttle.enabled
    assert not ReadThrottle({TierKind.DRAM: 0}).enabled
    started = time.perf_counter()
    # 300 bytes, a third of them from SSD: 100 bytes at 1000 B/s, less its 5-byte burst.
    await throttle.pace([TierKind.DRAM, TierKind.DRAM, TierKind.SSD], 300)
    assert time.perf_counter() - started >= 0.095


def test_a_bucket_needs_a_positive_rate() -> None:
    with pytest.raises(ValueError, match="a throttle rate must be positive"):
        TokenBucket(0.0)
