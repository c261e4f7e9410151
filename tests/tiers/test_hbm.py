"""The HBM tier: torch CUDA memory on a GPU node, torch's CPU device ("emulated") elsewhere.

Every test runs on the CPU, where the tier must call itself "hbm (emulated)", and again
on CUDA (`gpu` mark) where a device is present; the code path is the same tensor-copy
path either way.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstore.checksum import ChecksumKind, checksum
from kvstore.client import KVClient, KVForm, TierKind
from kvstore.config import StoreConfig, TenantQuota
from kvstore.enums import PutOutcome
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.mover import TierMover
from kvstore.put import PutSession
from kvstore.read import ReadSession
from kvstore.server import build_server, load_config
from kvstore.store import BlockStore
from kvstore.tiers.hbm import HbmTier, resolve_device
from kvstore.v1 import kvstore_pb2 as pb

PAGE_BYTES = 512
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
NS = Namespace(tenant="t", model_fingerprint="m", layout=LAYOUT)
CHECKSUM = ChecksumKind.XXH3_64

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


def payload(key: bytes, nbytes: int = LAYOUT.block_bytes) -> bytes:
    seed = hashlib.sha256(key).digest()
    return (seed * (nbytes // len(seed) + 1))[:nbytes]


def expected_name(device: str) -> str:
    return "hbm (emulated)" if device == "cpu" else "hbm (cuda)"


# -- the tier itself -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_tier_round_trips_bytes_across_scattered_pages(device: str) -> None:
    tier = HbmTier(16 * PAGE_BYTES, PAGE_BYTES, torch.device(device))
    assert tier.name == expected_name(device)
    assert tier.emulated is (device == "cpu")
    assert tier.capacity_bytes == 16 * PAGE_BYTES
    # Leave holes, so the next block's pages are not adjacent.
    handles = [tier.allocate(PAGE_BYTES) for _ in range(6)]
    for handle in handles[1::2]:
        tier.free(handle)
    nbytes = 3 * PAGE_BYTES - 77
    block = tier.allocate(nbytes)
    assert block is not None
    assert tier.used_bytes == 6 * PAGE_BYTES
    data = payload(b"scattered", nbytes)
    # Writes of odd sizes and offsets, from bytes and from a writable memoryview.
    tier.write(block, 0, data[:100])
    tier.write(block, 100, memoryview(bytearray(data[100:777])))
    tier.write(block, 777, data[777:])
    assert b"".join(bytes(view) for view in tier.read(block, 0, nbytes)) == data
    assert b"".join(bytes(view) for view in tier.read(block, 499, 600)) == data[499:1099]
    assert (tier.counters.bytes_written, tier.counters.bytes_read) == (nbytes, nbytes + 600)
    tier.free(block)
    assert tier.allocate(17 * PAGE_BYTES) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_hbm_without_a_gpu_is_refused() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        BlockStore(
            StoreConfig(
                dram_bytes=4 * PAGE_BYTES,
                page_bytes=PAGE_BYTES,
                hbm_bytes=4 * PAGE_BYTES,
                hbm_device="cuda",
            )
        )


# -- promotion and demotion through the store ------------------------------------------------------


_OPEN_MOVERS: list[TierMover] = []


def make_mover(store: BlockStore) -> TierMover:
    mover = TierMover(store)
    _OPEN_MOVERS.append(mover)
    return mover


@pytest.fixture(autouse=True)
async def _close_movers() -> AsyncIterator[None]:
    """Shut down the SSD I/O threads of every mover a test made."""
    yield
    while _OPEN_MOVERS:
        await _OPEN_MOVERS.pop().close()


def make_store(device: str, *, tmp_path: Path | None = None, **config: Any) -> BlockStore:
    settings: dict[str, Any] = {
        "dram_bytes": 4 * PAGE_BYTES,
        "page_bytes": PAGE_BYTES,
        "hbm_bytes": 4 * PAGE_BYTES,
        "hbm_device": device,
        "ssd_dir": str(tmp_path / "ssd") if tmp_path is not None else None,
    }
    return BlockStore(StoreConfig(**{**settings, **config}))


async def put(store: BlockStore, mover: TierMover, key: bytes, parent: bytes = b"") -> None:
    await mover.ensure_room(TierKind.DRAM, LAYOUT.block_bytes)
    session = PutSession(store, NS, CHECKSUM)
    try:
        session.declare(key, parent)
        data = payload(key)
        for layer in range(LAYOUT.num_layers):
            part = data[layer * LAYOUT.layer_bytes : (layer + 1) * LAYOUT.layer_bytes]
            session.write(0, layer, 0, part, checksum(CHECKSUM, part))
        mover.on_committed(session.take_committed())
        assert session.finish() == [PutOutcome.COMMITTED]
    finally:
        session.abort()


async def get(store: BlockStore, mover: TierMover, keys: list[bytes]) -> list[bytes]:
    session = ReadSession(store, NS, keys)
    try:
        await session.load(mover)
        blocks = [bytearray() for _ in session.entries]
        async for chunk in session.stream_chunks(LAYOUT.layer_bytes):
            blocks[chunk.block_index] += b"".join(bytes(view) for view in chunk.views)
        # A block found unreadable while layer 0 streamed ends the served prefix.
        del blocks[session.num_blocks :]
    finally:
        session.close()
    return [bytes(block) for block in blocks]


def copies(store: BlockStore, key: bytes) -> set[TierKind]:
    (entry,) = store.find_prefix(NS, [key])
    return set(entry.copies)


@pytest.mark.parametrize("device", DEVICES)
async def test_blocks_seen_often_are_promoted_and_served_from_hbm(device: str) -> None:
    store = make_store(device, hbm_promote_after_seen=3)
    mover = make_mover(store)
    hbm = store.pool.hbm
    assert hbm is not None
    assert hbm.name == expected_name(device)
    await put(store, mover, b"A")
    await put(store, mover, b"B", b"A")
    assert await get(store, mover, [b"A", b"B"]) == [payload(b"A"), payload(b"B")]  # seen 2
    assert copies(store, b"A") == {TierKind.DRAM}
    assert await get(store, mover, [b"A"]) == [payload(b"A")]  # seen 3: promoted
    assert copies(store, b"A") == {TierKind.HBM, TierKind.DRAM}
    assert copies(store, b"B") == {TierKind.DRAM}
    assert (hbm.counters.promotions, hbm.used_bytes) == (1, PAGE_BYTES)
    assert store.lookup(NS, [b"A", b"B"]).tiers == (TierKind.HBM, TierKind.DRAM)
    # Fill DRAM: E evicts B (the LRU chain tail), F then A's DRAM copy, redundant
    # next to its HBM copy; A is served from HBM after that.
    for key in (b"C", b"D", b"E", b"F"):
        await put(store, mover, key)
    assert copies(store, b"A") == {TierKind.HBM}
    assert not store.find_prefix(NS, [b"B"])
    assert store.dram.counters.evictions == 2
    read_before = hbm.counters.bytes_read
    assert await get(store, mover, [b"A"]) == [payload(b"A")]
    assert hbm.counters.bytes_read == read_before + PAGE_BYTES
    report = {tier.kind: tier for tier in store.report().tiers}
    assert report[TierKind.HBM].name == expected_name(device)
    assert (report[TierKind.HBM].num_blocks, report[TierKind.HBM].capacity_bytes) == (
        1,
        4 * PAGE_BYTES,
    )


@pytest.mark.parametrize("device", DEVICES)
async def test_hbm_watermark_pass_drops_hbm_copies_first(device: str) -> None:
    store = make_store(device, hbm_promote_after_seen=2, high_watermark=0.7, low_watermark=0.5)
    mover = make_mover(store)
    for key in (b"A", b"B", b"C", b"D"):
        await put(store, mover, key)
        await get(store, mover, [key])
    hbm = store.pool.hbm
    assert hbm is not None
    assert hbm.used_bytes == 4 * PAGE_BYTES
    mover.make_room()  # HBM and DRAM are both full: each drops copies down to half
    assert [copies(store, key) for key in (b"A", b"B", b"C", b"D")] == [
        {TierKind.DRAM},
        {TierKind.DRAM},
        {TierKind.HBM},
        {TierKind.HBM},
    ]
    assert (hbm.counters.demotions, store.dram.counters.demotions) == (2, 2)
    assert await get(store, mover, [b"A", b"B", b"C", b"D"]) == [
        payload(key) for key in (b"A", b"B", b"C", b"D")
    ]


@pytest.mark.parametrize("device", DEVICES)
async def test_an_hbm_only_block_moves_down_into_free_dram_and_never_evicts_for_it(
    device: str,
) -> None:
    """Over HBM's high watermark, a block whose only copy is in HBM (its DRAM copy was
    dropped as redundant) moves into DRAM where DRAM has free room; where it has none it
    stays in HBM, and no DRAM block is evicted to take it."""
    store = make_store(device, hbm_promote_after_seen=2, high_watermark=0.2, low_watermark=0.1)
    mover = make_mover(store)
    await put(store, mover, b"A")
    await get(store, mover, [b"A"])
    for key in (b"B", b"C", b"D", b"E"):  # DRAM is full: A's redundant DRAM copy goes
        await put(store, mover, key)
    assert copies(store, b"A") == {TierKind.HBM}
    hbm, dram = store.pool.hbm, store.dram
    assert hbm is not None
    dram_keys = {entry.key for entry in store.pool.entries() if TierKind.DRAM in entry.copies}

    mover.make_room()  # DRAM is full: A cannot move, and nothing is evicted for it
    assert copies(store, b"A") == {TierKind.HBM}
    assert {e.key for e in store.pool.entries() if TierKind.DRAM in e.copies} == dram_keys
    assert (hbm.counters.demotions, dram.counters.evictions) == (0, 1)

    assert store.delete(NS, [b"E"]).num_deleted == 1  # one page of DRAM free
    promotions = dram.counters.promotions
    mover.make_room()
    assert copies(store, b"A") == {TierKind.DRAM}
    assert hbm.used_bytes == 0
    assert hbm.counters.demotions == 1
    assert dram.counters.promotions == promotions  # a move down, not a promotion
    assert await get(store, mover, [b"A"]) == [payload(b"A")]


@pytest.mark.parametrize("device", DEVICES)
async def test_an_hbm_only_parent_moves_down_into_free_dram(device: str) -> None:
    """A block with children cannot be dropped from HBM while it has no other copy, but
    it can move: into free DRAM, its children kept reachable through it. (Such parents
    stayed in HBM for good, and HBM filled with them.)"""
    store = make_store(device, hbm_promote_after_seen=2, high_watermark=0.2, low_watermark=0.1)
    mover = make_mover(store)
    await put(store, mover, b"A")
    await get(store, mover, [b"A"])  # seen twice: promoted into HBM
    await put(store, mover, b"B", b"A")  # A has a child now
    for key in (b"C", b"D", b"E"):  # DRAM is full: A's redundant DRAM copy goes
        await put(store, mover, key)
    assert copies(store, b"A") == {TierKind.HBM}
    hbm = store.pool.hbm
    assert hbm is not None

    assert store.delete(NS, [b"E"]).num_deleted == 1  # one page of DRAM free
    mover.make_room()
    assert copies(store, b"A") == {TierKind.DRAM}
    assert hbm.used_bytes == 0
    assert hbm.counters.demotions == 1
    assert await get(store, mover, [b"A", b"B"]) == [payload(b"A"), payload(b"B")]


@pytest.mark.parametrize("device", DEVICES)
async def test_an_hbm_only_block_moves_down_only_within_its_tenants_dram_quota(
    device: str,
) -> None:
    """DRAM with free pages is not room for a tenant at its DRAM quota: its HBM-only
    block stays in HBM until its own share has room, and none of its blocks is evicted
    for the move."""
    store = make_store(
        device,
        dram_bytes=8 * PAGE_BYTES,
        quotas={NS.tenant: TenantQuota(dram_bytes=2 * PAGE_BYTES)},
        hbm_promote_after_seen=2,
        high_watermark=0.2,
        low_watermark=0.1,
    )
    mover = make_mover(store)
    await put(store, mover, b"A")
    await get(store, mover, [b"A"])
    for key in (b"B", b"C"):  # its share is full: A's redundant DRAM copy goes
        await put(store, mover, key)
    assert copies(store, b"A") == {TierKind.HBM}
    assert store.dram.used_bytes == 2 * PAGE_BYTES  # six pages free, none of them its own

    mover.make_room()
    assert copies(store, b"A") == {TierKind.HBM}
    assert (copies(store, b"B"), copies(store, b"C")) == ({TierKind.DRAM}, {TierKind.DRAM})

    assert store.delete(NS, [b"C"]).num_deleted == 1
    mover.make_room()
    assert copies(store, b"A") == {TierKind.DRAM}
    assert await get(store, mover, [b"A"]) == [payload(b"A")]


@pytest.mark.parametrize("device", DEVICES)
async def test_hbm_only_blocks_flush_to_ssd_and_survive_a_restart(
    device: str, tmp_path: Path
) -> None:
    store = make_store(device, tmp_path=tmp_path, hbm_promote_after_seen=2)
    mover = make_mover(store)
    await put(store, mover, b"A")
    await get(store, mover, [b"A"])
    # Three more blocks need DRAM: A's DRAM copy is redundant next to its HBM copy.
    for key in (b"B", b"C", b"D", b"E"):
        await put(store, mover, key)
    assert copies(store, b"A") == {TierKind.HBM}
    written, unwritten = await mover.flush_all()
    assert (written, unwritten) >= (1, 0)  # A is written from HBM
    assert unwritten == 0
    assert copies(store, b"A") == {TierKind.HBM, TierKind.SSD}

    restarted = make_store(device, tmp_path=tmp_path)
    restarted_mover = make_mover(restarted)
    assert restarted_mover.recover() >= 1
    assert await get(restarted, restarted_mover, [b"A"]) == [payload(b"A")]


# -- through the server ----------------------------------------------------------------------------

SERVER_LAYOUT = KVLayout(
    num_layers=2, num_kv_heads=2, head_dim=16, dtype=DType.FLOAT16, block_tokens=16
)
SERVER_NS = Namespace(tenant="hbm", model_fingerprint="toy", layout=SERVER_LAYOUT)


def blocks_tensor(keys: list[bytes]) -> torch.Tensor:
    raw = bytearray(b"".join(payload(key, SERVER_LAYOUT.block_bytes) for key in keys))
    flat = torch.frombuffer(raw, dtype=torch.uint8).view(torch.float16)
    return flat.reshape(len(keys), SERVER_LAYOUT.num_layers, *SERVER_LAYOUT.layer_shape)


@pytest.mark.parametrize("device", DEVICES)
async def test_server_reports_and_serves_the_hbm_tier(device: str, server_factory: Any) -> None:
    block_bytes = SERVER_LAYOUT.block_bytes
    running = await server_factory(
        store__hbm_bytes=8 * block_bytes,
        store__hbm_device=device,
        store__hbm_promote_after_seen=2,
    )
    keys = [b"h0", b"h1", b"h2"]
    async with KVClient(f"127.0.0.1:{running.port}", SERVER_NS) as client:
        await client.put_blocks(keys, blocks_tensor(keys))
        assert (await client.lookup_keys(keys)).tiers == (TierKind.DRAM,) * 3
        dest = torch.zeros_like(blocks_tensor(keys))
        for _ in range(2):
            assert await client.get_into(keys, dest, form=KVForm.BLOCKS) == 3
            assert torch.equal(dest.view(torch.uint8), blocks_tensor(keys).view(torch.uint8))
        assert (await client.lookup_keys(keys)).tiers == (TierKind.HBM,) * 3
        stats = await client.stats()
    (hbm,) = [tier for tier in stats.tiers if tier.tier == pb.HBM]
    assert (hbm.name, hbm.capacity_bytes, hbm.num_blocks) == (
        expected_name(device),
        8 * block_bytes,
        3,
    )
    assert (hbm.used_bytes, hbm.promotions, hbm.bytes_written) == (
        3 * block_bytes,
        3,
        3 * block_bytes,
    )
    # Hits: the second get and the last lookup; misses: the first lookup and get.
    assert (hbm.hits, hbm.misses) == (6, 6)


def test_emulated_name_is_used_in_the_startup_log(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    async def start_and_stop() -> None:
        config = load_config(
            None,
            {
                "listen": "127.0.0.1:0",
                "store.dram_bytes": "1MiB",
                "store.hbm_bytes": "1MiB",
                "store.hbm_device": "cpu",
            },
        )
        running = await build_server(config)
        await running.drain()

    with caplog.at_level("INFO", logger="kvstore.server"):
        asyncio.run(start_and_stop())
    assert "hbm (emulated) 1 MiB" in caplog.text


@pytest.mark.parametrize("device", DEVICES)
async def test_a_child_kept_in_hbm_still_holds_its_parent_in_dram(device: str) -> None:
    """Evicting a child's DRAM copy while its HBM copy stays leaves it a child: its parent
    (only in DRAM) is no chain tail and must not be planned as one. It was: the parent's
    last copy went, the index refused to drop a non-tail, and the chain was left with a
    copyless parent that lookups still matched."""
    store = make_store(device, hbm_promote_after_seen=3)
    mover = make_mover(store)
    await put(store, mover, b"P")
    await put(store, mover, b"C", b"P")
    store.lookup(NS, [b"C"])  # C seen twice, P once
    assert await get(store, mover, [b"P", b"C"]) == [payload(b"P"), payload(b"C")]
    assert copies(store, b"C") == {TierKind.DRAM, TierKind.HBM}
    assert copies(store, b"P") == {TierKind.DRAM}
    await put(store, mover, b"X")
    await put(store, mover, b"Y")
    # A two-page block of another model: DRAM must free two pages.
    wide = Namespace(
        tenant="t", model_fingerprint="wide", layout=KVLayout(
            num_layers=4, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=8
        )
    )  # fmt: skip
    await mover.ensure_room(TierKind.DRAM, wide.layout.block_bytes)
    session = PutSession(store, wide, CHECKSUM)
    try:
        session.declare(b"Z", b"")
        data = payload(b"Z", wide.layout.block_bytes)
        layer_bytes = wide.layout.layer_bytes
        for layer in range(wide.layout.num_layers):
            part = data[layer * layer_bytes : (layer + 1) * layer_bytes]
            session.write(0, layer, 0, part, checksum(CHECKSUM, part))
        assert session.finish() == [PutOutcome.COMMITTED]
    finally:
        session.abort()
    # Whatever was evicted, every indexed block still has a copy and serves its bytes.
    for entry in store.pool.entries():
        assert entry.copies, f"{entry.key!r} is indexed with no copy"
    matched = store.lookup(NS, [b"P", b"C"]).num_matched
    assert await get(store, mover, [b"P", b"C"]) == [payload(b"P"), payload(b"C")][:matched]
