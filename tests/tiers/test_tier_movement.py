"""Exact scenarios for demotion, eviction and promotion between DRAM and SSD.

The core tests drive BlockStore + TierMover in the test's event loop without the
background watermark task, so every move happens at a known point: `put` calls
`mover.ensure_room` before each declared block as the server's transfer module does,
`mover.make_room()` is one watermark pass, and `settle` awaits the SSD writes the mover
started. Every block of LAYOUT is exactly one 512 B page, so a DRAM of N pages holds N blocks.

Under write-back a put that finds DRAM full demotes a batch of up to four blocks
(so SSD writes overlap), taken in the eviction policy's order. Right after puts,
LRU order is commit order (a chain's head is its oldest block); a lookup or get
touches a chain head-last, so its tail becomes the coldest.

The server tests at the end check the same moves through LookupPrefix, GetBlocks
and Stats on a real in-process server (background pass off: high watermark 1.0).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstore.checksum import ChecksumKind, checksum
from kvstore.client import KVClient, KVForm, TierKind
from kvstore.config import StoreConfig
from kvstore.enums import Durability, PutOutcome
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.mover import TierMover
from kvstore.put import PutSession
from kvstore.read import ReadSession
from kvstore.server import RunningServer
from kvstore.store import BlockStore
from kvstore.tiers.blockfile import BlockFileHeader, encode_header
from kvstore.tiers.ssd import SsdTier
from kvstore.v1 import kvstore_pb2 as pb

PAGE_BYTES = 512
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
NS = Namespace(tenant="t", model_fingerprint="m", layout=LAYOUT)
CHECKSUM = ChecksumKind.XXH3_64


# -- core factories ----------------------------------------------------------------------------


def payload(key: bytes, layout: KVLayout = LAYOUT) -> bytes:
    """The block bytes stored under `key`: recomputable from the key alone."""
    seed = hashlib.sha256(key).digest()
    return (seed * (layout.block_bytes // len(seed) + 1))[: layout.block_bytes]


@dataclass
class Rig:
    store: BlockStore
    mover: TierMover

    @property
    def ssd(self) -> SsdTier:
        assert self.store.pool.ssd is not None
        return self.store.pool.ssd


_OPEN_MOVERS: list[TierMover] = []


def make_rig(tmp_path: Path, *, dram_blocks: int = 5, **config: Any) -> Rig:
    """A store with DRAM of `dram_blocks` blocks and an SSD under `tmp_path`; not started."""
    assert LAYOUT.block_bytes == PAGE_BYTES
    settings: dict[str, Any] = {
        "dram_bytes": dram_blocks * PAGE_BYTES,
        "page_bytes": PAGE_BYTES,
        "ssd_dir": str(tmp_path / "ssd"),
    }
    store = BlockStore(StoreConfig(**{**settings, **config}))
    mover = TierMover(store)
    mover.recover()
    _OPEN_MOVERS.append(mover)
    return Rig(store, mover)


@pytest.fixture(autouse=True)
async def _close_movers() -> AsyncIterator[None]:
    """Shut down the SSD I/O threads of every mover a test made."""
    yield
    while _OPEN_MOVERS:
        await _OPEN_MOVERS.pop().close()


async def settle(mover: TierMover) -> None:
    """Await every SSD write the mover started, and any those started in turn."""
    while mover._tasks:
        await asyncio.gather(*list(mover._tasks))


def chain(keys: str, parent: str = "") -> list[tuple[bytes, bytes]]:
    """(key, parent_key) pairs of a chain of one-letter keys: chain("ABC") is A→B→C."""
    pairs, previous = [], parent.encode()
    for letter in keys:
        pairs.append((letter.encode(), previous))
        previous = letter.encode()
    return pairs


async def put(rig: Rig, blocks: list[tuple[bytes, bytes]]) -> list[PutOutcome]:
    session = PutSession(rig.store, NS, CHECKSUM)
    try:
        # As the client sends them: each block declared just before its bytes.
        for index, (key, parent) in enumerate(blocks):
            await rig.mover.ensure_room(TierKind.DRAM, LAYOUT.block_bytes)
            session.declare(key, parent)
            data = payload(key)
            for layer in range(LAYOUT.num_layers):
                part = data[layer * LAYOUT.layer_bytes : (layer + 1) * LAYOUT.layer_bytes]
                session.write(index, layer, 0, part, checksum(CHECKSUM, part))
            # As the server does after each message: the write policy acts on commits.
            rig.mover.on_committed(session.take_committed())
        outcomes = session.finish()
    finally:
        session.abort()
    await settle(rig.mover)
    return outcomes


async def put_chains(rig: Rig, *chains: str) -> None:
    for keys in chains:
        assert set(await put(rig, chain(keys))) == {PutOutcome.COMMITTED}


async def get(rig: Rig, keys: str) -> list[bytes]:
    """GetBlocks in the core: the served prefix's bytes, in key order."""
    session = ReadSession(rig.store, NS, [letter.encode() for letter in keys])
    try:
        await session.load(rig.mover)
        blocks = [bytearray() for _ in session.entries]
        # One chunk per block-layer; chunks come layer-major.
        async for chunk in session.stream_chunks(LAYOUT.layer_bytes):
            blocks[chunk.block_index] += b"".join(bytes(view) for view in chunk.views)
        # A block found unreadable while layer 0 streamed ends the served prefix.
        del blocks[session.num_blocks :]
    finally:
        session.close()
    await settle(rig.mover)
    return [bytes(block) for block in blocks]


def placement(rig: Rig, keys: str) -> list[str]:
    """Where each block has copies, e.g. ["DRAM", "SSD", "DRAM+SSD", "-"], without touching it."""
    state = rig.store.pool.find_namespace(NS)
    out = []
    for letter in keys:
        entry = state.blocks.get(letter.encode()) if state is not None else None
        if entry is None:
            out.append("-")
        else:
            out.append("+".join(kind.name for kind in sorted(entry.copies, key=lambda k: k.value)))
    return out


def file_bytes(key: bytes, parent_key: bytes = b"") -> int:
    """The size of the block file that holds `key` (header + payload)."""
    data = payload(key)
    header = BlockFileHeader(
        namespace=NS,
        key=key,
        parent_key=parent_key,
        checksum_kind=CHECKSUM,
        layer_checksums=tuple(
            checksum(CHECKSUM, data[i * LAYOUT.layer_bytes : (i + 1) * LAYOUT.layer_bytes])
            for i in range(LAYOUT.num_layers)
        ),
        chain_root=not parent_key,  # every block here is put under its parent, or as a root
    )
    return len(encode_header(header)) + LAYOUT.block_bytes


def block_files(rig: Rig) -> set[str]:
    return {path.stem for path in rig.ssd.directory.glob("*/*.kvb")}


async def poll(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# -- write-back: demotion --------------------------------------------------------------------


async def test_put_into_full_dram_demotes_lru_blocks_and_loses_none(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, dram_blocks=5)
    await put_chains(rig, "ABC", "DE")
    assert placement(rig, "ABCDE") == ["DRAM"] * 5
    await put_chains(rig, "F")
    # LRU is commit order here: A..D (a batch of four) go to SSD, heads included,
    # since demotion keeps them findable; nothing is evicted outright.
    assert placement(rig, "ABCDEF") == ["SSD", "SSD", "SSD", "SSD", "DRAM", "DRAM"]
    dram, ssd = rig.store.dram.counters, rig.ssd.counters
    assert (dram.demotions, dram.evictions, ssd.bytes_written) == (4, 0, 4 * PAGE_BYTES)
    assert block_files(rig) == {b"A".hex(), b"B".hex(), b"C".hex(), b"D".hex()}
    assert await get(rig, "ABC") == [payload(b"A"), payload(b"B"), payload(b"C")]
    assert await get(rig, "DE") == [payload(b"D"), payload(b"E")]


async def test_lookup_makes_chain_tails_demote_first(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, dram_blocks=5, high_watermark=0.7, low_watermark=0.5)
    await put_chains(rig, "ABC", "DE")
    # A lookup touches a chain head last: LRU order is now E, D, then C, B, A.
    rig.store.lookup(NS, [b"D", b"E"])
    rig.store.lookup(NS, [b"A", b"B", b"C"])
    assert _queue_order(rig, TierKind.DRAM) == "EDCBA"
    # One watermark pass: 5 of 5 pages used > 0.7, free down to 0.5 → three blocks.
    # C's parents are written to SSD before C (and keep their DRAM copy), so a crash
    # never leaves C on SSD without them.
    rig.mover.make_room()
    await settle(rig.mover)
    assert placement(rig, "ABCDE") == ["DRAM+SSD", "DRAM+SSD", "SSD", "SSD", "SSD"]
    assert rig.store.dram.counters.demotions == 3
    assert rig.store.lookup(NS, [b"A", b"B", b"C"]).tiers == (
        TierKind.DRAM,
        TierKind.DRAM,
        TierKind.SSD,
    )


def _queue_order(rig: Rig, kind: TierKind) -> str:
    """The tier's victims in order, as one-letter keys; the queue is restored after."""
    popped = []
    with rig.store.pool.victims(kind) as victims:
        while (entry := victims.take()) is not None:
            popped.append(entry)
            victims.keep(entry)
    return "".join(entry.key.decode() for entry in popped)


async def test_watermark_pass_runs_in_the_background(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, dram_blocks=10, high_watermark=0.8, low_watermark=0.4)
    await rig.mover.start()
    try:
        for letter in "ABCDEFGHI":
            await put_chains(rig, letter)
        # 9 of 10 blocks > 0.8: the background pass demotes down to 4 blocks; the puts
        # themselves never waited for the SSD.
        await poll(lambda: rig.store.dram.used_bytes <= 4 * PAGE_BYTES)
        await settle(rig.mover)
    finally:
        await rig.mover.close()
    assert placement(rig, "ABCDEFGHI") == ["SSD"] * 5 + ["DRAM"] * 4
    assert (rig.store.dram.counters.demotions, rig.store.dram.counters.evictions) == (5, 0)


async def test_watermark_pass_drops_redundant_copies_without_writing(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, dram_blocks=4, high_watermark=0.7, low_watermark=0.5)
    await put_chains(rig, "A", "B", "C", "D", "E")  # E's put demotes A..D
    assert placement(rig, "ABCDE") == ["SSD", "SSD", "SSD", "SSD", "DRAM"]
    assert await get(rig, "AB") == [payload(b"A"), payload(b"B")]  # promoted back
    assert placement(rig, "AB") == ["DRAM+SSD", "DRAM+SSD"]
    written = rig.ssd.counters.bytes_written
    rig.store.lookup(NS, [b"E"])  # E is now the most recent; B then A the coldest
    rig.mover.make_room()  # 3 of 4 > 0.7 → free down to 2: one block
    await settle(rig.mover)
    assert placement(rig, "ABE") == ["DRAM+SSD", "SSD", "DRAM"]
    assert rig.ssd.counters.bytes_written == written  # B was on SSD already


async def test_lookup_reports_each_blocks_fastest_tier_as_runs(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, dram_blocks=4)
    await put_chains(rig, "A", "B", "C", "D", "E")  # E's put demotes A..D to SSD
    assert await get(rig, "B") == [payload(b"B")]  # promoted back: DRAM+SSD
    match = rig.store.lookup(NS, [b"A", b"B", b"C", b"E", b"X", b"D"])
    assert placement(rig, "ABCE") == ["SSD", "DRAM+SSD", "SSD", "DRAM"]
    assert match.num_matched == 4  # X is missing, so D does not count
    assert match.tier_runs == (
        (TierKind.SSD, 1),
        (TierKind.DRAM, 1),
        (TierKind.SSD, 1),
        (TierKind.DRAM, 1),
    )
    assert match.tiers == (TierKind.SSD, TierKind.DRAM, TierKind.SSD, TierKind.DRAM)
    assert rig.store.lookup(NS, [b"C", b"A"]).tier_runs == ((TierKind.SSD, 2),)


async def test_pinned_blocks_keep_every_copy(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, dram_blocks=4, high_watermark=0.7, low_watermark=0.2)
    await put_chains(rig, "A", "B", "C")
    rig.store.pin(NS, [b"A"], ttl_s=60)
    rig.mover.make_room()  # needs 2 blocks gone; A is leased
    await settle(rig.mover)
    assert placement(rig, "ABC") == ["DRAM", "SSD", "SSD"]
    rig.store.unpin(NS, [b"A"])
    rig.mover.make_room()  # 1 of 4 is under the high watermark: nothing moves
    assert placement(rig, "A") == ["DRAM"]


# -- write-through ------------------------------------------------------------------------------


async def test_write_through_writes_every_block_at_put(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, dram_blocks=3, write_policy="write-through")
    await put_chains(rig, "ABC")
    assert placement(rig, "ABC") == ["DRAM+SSD"] * 3
    assert block_files(rig) == {b"A".hex(), b"B".hex(), b"C".hex()}
    ssd = rig.ssd.counters
    assert ssd.bytes_written == 3 * PAGE_BYTES
    assert rig.ssd.used_bytes == sum(file_bytes(key, parent) for key, parent in chain("ABC"))
    # DRAM is full: D evicts A's DRAM copy (LRU), which SSD still holds; no SSD write.
    await put_chains(rig, "D")
    assert placement(rig, "ABCD") == ["SSD", "DRAM+SSD", "DRAM+SSD", "DRAM+SSD"]
    assert rig.store.dram.counters.evictions == 1
    assert rig.store.dram.counters.demotions == 0
    assert ssd.bytes_written == 4 * PAGE_BYTES
    assert await get(rig, "ABC") == [payload(b"A"), payload(b"B"), payload(b"C")]


async def test_admission_filter_keeps_once_seen_blocks_off_ssd_write_through(
    tmp_path: Path,
) -> None:
    rig = make_rig(tmp_path, write_policy="write-through", ssd_admit_after_seen=2)
    await put_chains(rig, "AB")
    assert placement(rig, "AB") == ["DRAM", "DRAM"]
    assert rig.ssd.counters.bytes_written == 0
    rig.store.lookup(NS, [b"A"])  # seen twice, but a lookup writes nothing
    assert placement(rig, "AB") == ["DRAM", "DRAM"]
    assert await get(rig, "A") == [payload(b"A")]  # seen three times, and read: written
    assert placement(rig, "AB") == ["DRAM+SSD", "DRAM"]
    assert block_files(rig) == {b"A".hex()}


async def test_admission_filter_under_write_back_evicts_once_seen_blocks(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, dram_blocks=3, ssd_admit_after_seen=2)
    await put_chains(rig, "A", "B", "C")
    rig.store.lookup(NS, [b"A"])  # A is seen twice (and now the most recent)
    await put_chains(rig, "D")  # B and C may not go to SSD: A is demoted instead
    assert placement(rig, "ABCD") == ["SSD", "DRAM", "DRAM", "DRAM"]
    await put_chains(rig, "E")  # nothing admitted is left in DRAM: the LRU tail B is evicted
    assert placement(rig, "ABCDE") == ["SSD", "-", "DRAM", "DRAM", "DRAM"]
    dram = rig.store.dram.counters
    assert (dram.demotions, dram.evictions) == (1, 1)
    assert block_files(rig) == {b"A".hex()}


# -- promotion ---------------------------------------------------------------------------------


async def test_get_promotes_ssd_blocks_into_dram(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, dram_blocks=5)
    await put_chains(rig, "ABC", "DE", "F")  # F's put demotes A..D
    dram, ssd = rig.store.dram.counters, rig.ssd.counters
    assert (dram.hits, dram.misses, ssd.hits, ssd.misses, ssd.bytes_read) == (0, 0, 0, 0, 0)
    assert await get(rig, "ABCX") == [payload(b"A"), payload(b"B"), payload(b"C")]
    # Promotion needs room: DRAM held E and F, so A, B, C fit next to them.
    assert placement(rig, "ABCDEF") == ["DRAM+SSD"] * 3 + ["SSD", "DRAM", "DRAM"]
    assert dram.promotions == 3
    assert ssd.bytes_read == 3 * PAGE_BYTES
    # Each block: a DRAM miss and an SSD hit; the missing X: a miss in both tiers.
    assert (dram.hits, dram.misses, ssd.hits, ssd.misses) == (0, 4, 3, 1)
    assert rig.store.lookup(NS, [b"A", b"B", b"C"]).tiers == (TierKind.DRAM,) * 3
    # A second get is served from DRAM: no SSD read.
    assert await get(rig, "ABC") == [payload(b"A"), payload(b"B"), payload(b"C")]
    assert ssd.bytes_read == 3 * PAGE_BYTES


async def test_promotion_makes_room_by_demoting_when_dram_is_full(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, dram_blocks=3)
    await put_chains(rig, "A", "B", "C", "D")  # D's put demotes A, B, C
    await put_chains(rig, "E", "F")
    assert placement(rig, "ABCDEF") == ["SSD", "SSD", "SSD", "DRAM", "DRAM", "DRAM"]
    # DRAM is full of DRAM-only root blocks (tails): promotion evicts the LRU one, D.
    assert await get(rig, "A") == [payload(b"A")]
    assert placement(rig, "AD") == ["DRAM+SSD", "-"]
    assert rig.store.dram.counters.evictions == 1


async def test_without_promote_on_hit_blocks_are_served_from_ssd(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, dram_blocks=3, promote_on_hit=False)
    await put_chains(rig, "AB", "C", "D")  # D's put demotes A, B, C
    for _ in range(2):
        assert await get(rig, "AB") == [payload(b"A"), payload(b"B")]
        assert placement(rig, "AB") == ["SSD", "SSD"]
    assert rig.store.dram.counters.promotions == 0
    assert rig.ssd.counters.bytes_read == 4 * PAGE_BYTES  # read again every time


async def test_a_cold_gets_first_ssd_read_runs_alone_then_the_rest_start(
    tmp_path: Path,
) -> None:
    """The first block's read has the disk to itself until its layer 0 is in, so the
    get's first bytes leave after one small read; the others start right after that,
    all at once, while the rest of the first block is still being read."""
    rig = make_rig(tmp_path, dram_blocks=3, promote_on_hit=False)
    await put_chains(rig, "ABC", "D", "E", "F")  # D, E and F demote A, B and C
    assert placement(rig, "ABC") == ["SSD", "SSD", "SSD"]
    session = ReadSession(rig.store, NS, [b"A", b"B", b"C"])
    try:
        load = rig.mover.load(session.entries)
        assert load.num_reads == 1  # A only
        assert not load.next_first_layer_is_ready()
        servable, layer = await load.next_first_layer()
        assert servable
        assert layer is not None
        assert bytes(layer) == payload(b"A")[: LAYOUT.layer_bytes]
        await asyncio.sleep(0)  # they start just after the get's own wake-up
        assert load.num_reads == 3  # B and C, started together once A's layer 0 was in
        assert await load.next_block() == (True, payload(b"A"))
        for key in (b"B", b"C"):
            servable, layer = await load.next_first_layer()
            assert servable
            assert layer is not None
            assert bytes(layer) == payload(key)[: LAYOUT.layer_bytes]
            assert await load.next_block() == (True, payload(key))
        assert await load.next_first_layer() == (False, None)
        assert await load.next_block() == (False, None)
    finally:
        session.close()
    assert await get(rig, "ABC") == [payload(b"A"), payload(b"B"), payload(b"C")]


async def test_a_block_unreadable_after_its_layer_0_ends_the_load_there(tmp_path: Path) -> None:
    """B's layer 0 is handed out, then its last layer fails: A is still served whole,
    B and its descendant C are dropped, and no later block is handed out."""
    rig = make_rig(tmp_path, dram_blocks=3, promote_on_hit=False)
    await put_chains(rig, "ABC", "D", "E", "F")
    path = rig.ssd.path_for(NS, b"B")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # in the last layer
    path.write_bytes(bytes(data))
    session = ReadSession(rig.store, NS, [b"A", b"B", b"C"])
    try:
        load = rig.mover.load(session.entries)
        for key in (b"A", b"B"):
            servable, layer = await load.next_first_layer()
            assert servable
            assert layer is not None
            assert bytes(layer) == payload(key)[: LAYOUT.layer_bytes]
        assert await load.next_block() == (True, payload(b"A"))
        assert await load.next_block() == (False, None)
        assert await load.next_first_layer() == (False, None)
    finally:
        session.close()
    assert placement(rig, "ABC") == ["SSD", "-", "-"]
    assert await get(rig, "ABC") == [payload(b"A")]


# -- eviction policies drive the demotion order --------------------------------------------------


async def test_lru_and_lfu_disagree_on_a_block_read_often_long_ago(tmp_path: Path) -> None:
    outcomes = {}
    for policy in ("lru", "lfu"):
        rig = make_rig(
            tmp_path / policy,
            dram_blocks=4,
            eviction_policy=policy,
            high_watermark=0.9,
            low_watermark=0.75,
        )
        await put_chains(rig, "A")
        for _ in range(3):
            await get(rig, "A")
        await put_chains(rig, "B", "C", "D")
        rig.mover.make_room()  # free down to 3 blocks: one goes
        await settle(rig.mover)
        outcomes[policy] = placement(rig, "ABCD")
    assert outcomes["lru"] == ["SSD", "DRAM", "DRAM", "DRAM"]
    assert outcomes["lfu"] == ["DRAM", "SSD", "DRAM", "DRAM"]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # LRU ignores leases that lapsed: A and B are the oldest blocks.
        ("lru", ["SSD", "SSD", "SSD", "DRAM", "DRAM"]),
        # The session policy demotes C, D and E before the once-leased chain.
        ("session", ["DRAM", "DRAM", "SSD", "SSD", "SSD"]),
    ],
)
async def test_session_policy_demotes_once_leased_chains_last(
    tmp_path: Path, policy: str, expected: list[str]
) -> None:
    rig = make_rig(
        tmp_path, dram_blocks=5, eviction_policy=policy, high_watermark=0.9, low_watermark=0.5
    )
    await put_chains(rig, "AB", "C", "D", "E")
    rig.store.pin(NS, [b"A", b"B"], ttl_s=60)
    rig.store.unpin(NS, [b"A", b"B"])  # the lease lapsed; the session policy remembers it
    rig.mover.make_room()  # free down to 2.5 blocks: three go
    await settle(rig.mover)
    assert placement(rig, "ABCDE") == expected


# -- the SSD's logical capacity -------------------------------------------------------------------


async def test_full_ssd_drops_its_coldest_copies(tmp_path: Path) -> None:
    sizes = [file_bytes(letter.encode()) for letter in "ABCDE"]
    # Room for three block files, never four.
    capacity = max(sizes) * 3 + min(sizes) // 2
    rig = make_rig(tmp_path, dram_blocks=8, write_policy="write-through", ssd_bytes=capacity)
    await put_chains(rig, "A", "B", "C", "D", "E")
    assert placement(rig, "ABCDE") == ["DRAM"] * 2 + ["DRAM+SSD"] * 3
    ssd = rig.ssd.counters
    assert (ssd.evictions, ssd.bytes_written) == (2, 5 * PAGE_BYTES)
    assert rig.ssd.used_bytes == sum(sizes[2:]) <= capacity
    await poll(lambda: block_files(rig) == {b"C".hex(), b"D".hex(), b"E".hex()})


async def test_full_ssd_under_write_back_takes_only_chain_tails(tmp_path: Path) -> None:
    sizes = [file_bytes(key, parent) for key, parent in chain("ABCD")]
    capacity = max(sizes) * 2 + min(sizes) // 2  # two block files
    rig = make_rig(tmp_path, dram_blocks=2, ssd_bytes=capacity)
    await put_chains(rig, "ABCD")  # C's put demotes A and B: the SSD is full
    assert placement(rig, "ABCD") == ["SSD", "SSD", "DRAM", "DRAM"]
    # E needs room, but C cannot be demoted: the SSD holds only A and B, which have
    # children and may not go. So DRAM drops its coldest chain tail, D; for F, then C.
    await put_chains(rig, "E", "F")
    assert placement(rig, "ABCDEF") == ["SSD", "SSD", "-", "-", "DRAM", "DRAM"]
    dram, ssd = rig.store.dram.counters, rig.ssd.counters
    assert (dram.demotions, dram.evictions, ssd.evictions) == (2, 2, 0)
    # Now B is a tail: G's put demotes E and F (a batch: all DRAM holds), and to
    # take them the SSD drops its coldest tails, B, then A.
    await put_chains(rig, "G")
    assert placement(rig, "ABEFG") == ["-", "-", "SSD", "SSD", "DRAM"]
    assert (dram.demotions, dram.evictions, ssd.evictions) == (4, 2, 2)
    assert rig.ssd.used_bytes <= capacity
    assert await get(rig, "EFG") == [payload(b"E"), payload(b"F"), payload(b"G")]


# -- through the server --------------------------------------------------------------------------

SERVER_LAYOUT = KVLayout(
    num_layers=2, num_kv_heads=2, head_dim=16, dtype=DType.FLOAT16, block_tokens=16
)
SERVER_NS = Namespace(tenant="tiers", model_fingerprint="toy", layout=SERVER_LAYOUT)
BLOCK = SERVER_LAYOUT.block_bytes  # 4 KiB: one page of the test server's arena


def block_tensor(keys: list[bytes]) -> torch.Tensor:
    """The blocks-form tensor for `keys`, each block's bytes being payload(key)."""
    raw = b"".join(payload(key, SERVER_LAYOUT) for key in keys)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    shape = (len(keys), SERVER_LAYOUT.num_layers, *SERVER_LAYOUT.layer_shape)
    return flat.view(torch.float16).reshape(shape)


async def put_server_chain(client: KVClient, keys: str) -> None:
    encoded = [f"key-{letter}".encode() for letter in keys]
    result = await client.put_blocks(encoded, block_tensor(encoded))
    assert result.num_committed == len(keys)


def skeys(keys: str) -> list[bytes]:
    return [f"key-{letter}".encode() for letter in keys]


async def get_server(client: KVClient, keys: str) -> list[bytes]:
    encoded = skeys(keys)
    dest = torch.zeros(
        (len(encoded), SERVER_LAYOUT.num_layers, *SERVER_LAYOUT.layer_shape), dtype=torch.float16
    )
    served = await client.get_into(encoded, dest, form=KVForm.BLOCKS)
    return [dest[i].contiguous().view(torch.uint8).numpy().tobytes() for i in range(served)]


def tier_stats(stats: pb.StatsResponse, kind: int) -> pb.TierStats:
    (tier,) = [tier for tier in stats.tiers if tier.tier == kind]
    return tier


@asynccontextmanager
async def tiered_server(
    server_factory: Any, tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[RunningServer, KVClient]]:
    settings: dict[str, Any] = {
        "store__ssd_dir": str(tmp_path / "ssd"),
        "store__dram_bytes": 6 * BLOCK,
        "store__high_watermark": 1.0,
        "store__low_watermark": 0.5,
    }
    running = await server_factory(**{**settings, **overrides})
    async with KVClient(f"127.0.0.1:{running.port}", SERVER_NS) as client:
        yield running, client


async def test_server_reports_tiers_and_counts_every_move(
    server_factory: Any, tmp_path: Path
) -> None:
    async with tiered_server(server_factory, tmp_path) as (_, client):
        await put_server_chain(client, "ABC")
        await put_server_chain(client, "DE")
        await put_server_chain(client, "F")
        stats = await client.stats()
        dram, ssd = tier_stats(stats, pb.DRAM), tier_stats(stats, pb.SSD)
        assert (dram.name, dram.capacity_bytes, dram.used_bytes, dram.num_blocks) == (
            "dram",
            6 * BLOCK,
            6 * BLOCK,
            6,
        )
        assert (ssd.name, ssd.num_blocks, ssd.used_bytes, ssd.degraded) == ("ssd", 0, 0, False)
        # G needs room: the four LRU blocks (commit order) are demoted to SSD.
        await put_server_chain(client, "G")
        abc = await client.lookup_keys(skeys("ABC"))
        de = await client.lookup_keys(skeys("DE"))
        fg = await client.lookup_keys(skeys("FG"))
        assert abc.tiers == (TierKind.SSD,) * 3
        assert de.tiers == (TierKind.SSD, TierKind.DRAM)
        assert fg.tiers == (TierKind.DRAM,) * 2
        stats = await client.stats()
        dram, ssd = tier_stats(stats, pb.DRAM), tier_stats(stats, pb.SSD)
        assert (dram.num_blocks, dram.used_bytes, dram.demotions, dram.evictions) == (
            3,
            3 * BLOCK,
            4,
            0,
        )
        assert (ssd.num_blocks, ssd.bytes_written, ssd.errors) == (4, 4 * BLOCK, 0)
        assert ssd.capacity_bytes == 16 << 30
        assert ssd.used_bytes > 4 * BLOCK  # payloads plus headers
        # Lookups (7 blocks): every SSD block is a DRAM miss and an SSD hit.
        assert (dram.hits, dram.misses, ssd.hits, ssd.misses) == (3, 4, 4, 0)
        # A get of A, B, C promotes them (DRAM has room for three).
        assert await get_server(client, "ABC") == [payload(k, SERVER_LAYOUT) for k in skeys("ABC")]
        stats = await client.stats()
        dram, ssd = tier_stats(stats, pb.DRAM), tier_stats(stats, pb.SSD)
        assert (dram.promotions, dram.num_blocks, ssd.bytes_read) == (3, 6, 3 * BLOCK)
        assert (await client.lookup_keys(skeys("ABC"))).tiers == (TierKind.DRAM,) * 3
        assert stats.blocks_got == 3


async def test_server_without_promote_on_hit_serves_from_ssd(
    server_factory: Any, tmp_path: Path
) -> None:
    async with tiered_server(
        server_factory,
        tmp_path,
        store__dram_bytes=4 * BLOCK,
        store__max_put_reserved_bytes=4 * BLOCK,  # "CDEF" is one put that fills DRAM
        store__promote_on_hit=False,
        store__write_policy="write-through",
    ) as (_, client):
        await put_server_chain(client, "AB")
        # Write-through: both are on SSD once their writes finish.
        await _poll_stats(client, lambda s: tier_stats(s, pb.SSD).num_blocks == 2)
        await put_server_chain(client, "CDEF")  # evicts A and B's DRAM copies
        assert (await client.lookup_keys(skeys("AB"))).tiers == (TierKind.SSD,) * 2
        for _ in range(2):
            assert await get_server(client, "AB") == [
                payload(k, SERVER_LAYOUT) for k in skeys("AB")
            ]
            assert (await client.lookup_keys(skeys("AB"))).tiers == (TierKind.SSD,) * 2
        stats = await client.stats()
        dram, ssd = tier_stats(stats, pb.DRAM), tier_stats(stats, pb.SSD)
        assert (dram.promotions, dram.evictions, ssd.bytes_read) == (0, 2, 4 * BLOCK)


async def test_server_admission_filter_writes_a_block_once_it_is_seen_twice(
    server_factory: Any, tmp_path: Path
) -> None:
    async with tiered_server(
        server_factory,
        tmp_path,
        store__write_policy="write-through",
        store__ssd_admit_after_seen=2,
    ) as (_, client):
        await put_server_chain(client, "AB")
        stats = await client.stats()
        assert (tier_stats(stats, pb.SSD).num_blocks, tier_stats(stats, pb.SSD).bytes_written) == (
            0,
            0,
        )
        await get_server(client, "A")
        await _poll_stats(client, lambda s: tier_stats(s, pb.SSD).num_blocks == 1)
        assert tier_stats(await client.stats(), pb.SSD).bytes_written == BLOCK


async def _poll_stats(client: KVClient, condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition(await client.stats()):
        assert time.monotonic() < deadline, "Stats never reached the expected state"
        await asyncio.sleep(0.01)


async def test_write_back_never_puts_a_block_on_ssd_before_its_parent(tmp_path: Path) -> None:
    """Under write-back a crash loses exactly the blocks only in DRAM: that holds only if
    no SSD block's parent is DRAM-only (recovery drops orphans). Checked after each put
    of a seeded storm of growing and branching chains that keeps DRAM turning over."""
    rig = make_rig(tmp_path, dram_blocks=6, high_watermark=0.7, low_watermark=0.4)
    await rig.mover.start()
    rng = random.Random(14)
    tails = [""]
    names = iter(f"k{number}" for number in range(10_000))
    for _ in range(60):
        parent = rng.choice(tails)
        keys = [next(names) for _ in range(rng.randint(1, 3))]
        pairs, previous = [], parent.encode()
        for key in keys:
            pairs.append((key.encode(), previous))
            previous = key.encode()
        outcomes = await put(rig, pairs)
        if outcomes[-1] is PutOutcome.COMMITTED:
            tails.append(keys[-1])
        rig.mover.make_room()
        await settle(rig.mover)
        for entry in rig.store.pool.entries():
            if TierKind.SSD in entry.copies and entry.parent is not None:
                assert TierKind.SSD in entry.parent.copies, (
                    f"{entry.key!r} is on SSD but its parent {entry.parent.key!r} is not"
                )
    assert rig.store.dram.counters.demotions > 10, "the storm must make DRAM turn over"


# -- acknowledged write-through blocks survive SSD eviction and a restart ----------------------


async def put_durably(rig: Rig, key: str, parent: str = "") -> Durability:
    """One block put as the server does, and what the put is acknowledged as."""
    session = PutSession(rig.store, NS, CHECKSUM)
    try:
        session.declare(key.encode(), parent.encode())
        data = payload(key.encode())
        for layer in range(LAYOUT.num_layers):
            part = data[layer * LAYOUT.layer_bytes : (layer + 1) * LAYOUT.layer_bytes]
            session.write(0, layer, 0, part, checksum(CHECKSUM, part))
        committed = session.take_committed()
        rig.mover.on_committed(committed)
        assert session.finish() == [PutOutcome.COMMITTED]
    finally:
        session.abort()
    durability = await rig.store.wait_durable(committed)
    await settle(rig.mover)
    return durability


async def test_blocks_acknowledged_on_ssd_survive_ssd_eviction_and_a_restart(
    tmp_path: Path,
) -> None:
    # An SSD with room for 4 block files, under write-through: SSD eviction must take
    # tails first (a file whose parent has none is dropped at restart), and a block put
    # under a parent whose file was evicted writes the parent again first.
    probe = make_rig(tmp_path / "probe", dram_blocks=64, write_policy="write-through")
    await put_chains(probe, "Q")
    file_bytes = probe.ssd.used_bytes
    rig = make_rig(
        tmp_path, dram_blocks=64, write_policy="write-through", ssd_bytes=4 * file_bytes + 10
    )
    for key, parent in (("P", ""), ("C", "P"), ("X", ""), ("Y", ""), ("Z", ""), ("D", "P")):
        durability = await put_durably(rig, key, parent)
        # Acknowledged durable on SSD only with its whole chain there.
        on_ssd = [
            letter
            for letter, where in zip("PCXYZD", placement(rig, "PCXYZD"), strict=True)
            if "SSD" in where
        ]
        assert (durability is Durability.DURABLE_ON_SSD) == ({key, parent} - {""} <= set(on_ssd))
    assert "D" in on_ssd  # the last put: the SSD took it, and kept its parent
    # As after kill -9: the files alone. Every block the SSD held (the cache may have
    # evicted others since their puts) comes back, none dropped as an orphan.
    restarted = make_rig(tmp_path, dram_blocks=64)
    state = restarted.store.pool.find_namespace(NS)
    assert state is not None
    assert [key for key in on_ssd if state.blocks.get(key.encode()) is None] == []
    assert await get(restarted, "PD") == [payload(b"P"), payload(b"D")]


async def test_two_reads_promoting_one_ssd_block_leave_one_dram_copy(tmp_path: Path) -> None:
    # Both reads of an SSD-only block promote it: the second must not allocate another
    # DRAM copy (memory no tenant's count knows of, never freed).
    rig = make_rig(tmp_path, dram_blocks=16, write_policy="write-through")
    await put_chains(rig, "AB")
    pool = rig.store.pool
    for key in (b"A", b"B"):
        entry = pool.find_namespace(NS).blocks[key]  # type: ignore[union-attr]
        pool.drop_copy(entry, TierKind.DRAM, demoted=True)
    assert placement(rig, "AB") == ["SSD", "SSD"]
    used_before = pool.dram.used_bytes
    first, second = await asyncio.gather(get(rig, "AB"), get(rig, "AB"))
    assert first == second == [payload(b"A"), payload(b"B")]
    assert placement(rig, "AB") == ["DRAM+SSD", "DRAM+SSD"]
    assert pool.dram.used_bytes == used_before + 2 * PAGE_BYTES
    for key in (b"A", b"B"):
        entry = pool.find_namespace(NS).blocks[key]  # type: ignore[union-attr]
        pool.drop_copy(entry, TierKind.DRAM)
    assert pool.dram.used_bytes == used_before  # every page came back


async def test_an_ssd_reservation_that_cannot_be_made_evicts_nothing(tmp_path: Path) -> None:
    probe = make_rig(tmp_path / "probe", dram_blocks=64, write_policy="write-through")
    await put_chains(probe, "Q")
    file_bytes = probe.ssd.used_bytes
    rig = make_rig(
        tmp_path, dram_blocks=64, write_policy="write-through", ssd_bytes=3 * file_bytes + 10
    )
    await put_chains(rig, "A", "B", "C")
    assert placement(rig, "ABC") == ["DRAM+SSD"] * 3
    pool = rig.store.pool
    state = pool.find_namespace(NS)
    assert state is not None
    pool.acquire_read([state.blocks[b"A"], state.blocks[b"B"]])  # only C could leave
    # Room for two more files needs two victims: there is one, so none is taken.
    assert not pool.reserve_ssd(2 * file_bytes)
    assert placement(rig, "ABC") == ["DRAM+SSD"] * 3
    assert pool.reserve_ssd(file_bytes)  # one file's room: C makes it
    assert placement(rig, "ABC") == ["DRAM+SSD", "DRAM+SSD", "DRAM"]
    pool.release_read([state.blocks[b"A"], state.blocks[b"B"]])
