"""The SSD tier's own byte accounting (reserve, commit, release) and the files it leaves."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from pathlib import Path

from kvstore.checksum import ChecksumKind, checksum
from kvstore.enums import PutOutcome, TierKind
from kvstore.index import BlockEntry
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.mover import TierMover
from kvstore.put import PutSession
from kvstore.store import BlockStore, StoreConfig
from kvstore.tiers.ssd import SUFFIX, SsdLocation, SsdTier

PAGE_BYTES = 512
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
NS = Namespace(tenant="t", model_fingerprint="m", layout=LAYOUT)
KIND = ChecksumKind.XXH3_64


def make_store(tmp_path: Path, **config: object) -> BlockStore:
    settings: dict[str, object] = {
        "dram_bytes": 8 * PAGE_BYTES,
        "page_bytes": PAGE_BYTES,
        "ssd_dir": str(tmp_path / "ssd"),
    }
    return BlockStore(StoreConfig(**{**settings, **config}))  # type: ignore[arg-type]


def put(
    store: BlockStore, key: bytes, parent: bytes = b"", namespace: Namespace = NS
) -> BlockEntry:
    layout = namespace.layout
    session = PutSession(store, namespace, KIND)
    try:
        session.declare(key, parent)
        for layer in range(layout.num_layers):
            data = hashlib.sha256(key + bytes([layer])).digest() * (layout.layer_bytes // 32)
            session.write(0, layer, 0, data, checksum(KIND, data))
        assert session.finish() == [PutOutcome.COMMITTED]
    finally:
        session.abort()
    (entry,) = store.find_prefix(namespace, [key])
    return entry


def ssd_of(store: BlockStore) -> SsdTier:
    ssd = store.pool.ssd
    assert ssd is not None
    return ssd


def block_files(store: BlockStore) -> list[Path]:
    return sorted(ssd_of(store).directory.glob(f"*/*{SUFFIX}"))


def test_reservations_and_used_bytes_never_pass_the_capacity(tmp_path: Path) -> None:
    ssd = SsdTier(tmp_path, 1000, fsync=False)
    first, second = SsdLocation(tmp_path / "a", 600), SsdLocation(tmp_path / "b", 400)
    assert ssd.reserve(first.nbytes)
    assert ssd.reserve(second.nbytes)
    assert not ssd.reserve(1)
    assert (ssd.used_bytes, ssd.reserved_bytes) == (0, 1000)
    ssd.commit(first)
    assert (ssd.used_bytes, ssd.reserved_bytes) == (600, 400)
    ssd.release(second)
    assert (ssd.used_bytes, ssd.reserved_bytes) == (600, 0)
    assert not ssd.reserve(401)
    assert ssd.reserve(400)
    ssd.release(second)
    first.path.write_bytes(b"x")
    ssd.free(first)
    assert (ssd.used_bytes, ssd.reserved_bytes) == (0, 0)
    assert not first.path.exists()
    ssd.close()


def test_recovered_files_are_adopted_once(tmp_path: Path) -> None:
    store = make_store(tmp_path)

    async def write() -> None:
        assert await store.pool.write_to_ssd(put(store, b"A"))

    asyncio.run(write())
    (nbytes,) = [path.stat().st_size for path in block_files(store)]
    store.pool.close()
    restarted = make_store(tmp_path)
    assert TierMover(restarted).recover() == 1
    assert (ssd_of(restarted).used_bytes, ssd_of(restarted).reserved_bytes) == (nbytes, 0)
    restarted.pool.close()


async def test_a_written_block_counts_once(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    entry = put(store, b"A")
    assert await store.pool.write_to_ssd(entry)
    (path,) = block_files(store)
    ssd = ssd_of(store)
    assert (ssd.used_bytes, ssd.reserved_bytes) == (path.stat().st_size, 0)
    assert ssd.counters.bytes_written == LAYOUT.block_bytes
    # The block is on SSD already: a second write says so, and neither writes nor counts.
    assert await store.pool.write_to_ssd(entry)
    assert (ssd.used_bytes, ssd.reserved_bytes) == (path.stat().st_size, 0)
    assert ssd.counters.bytes_written == LAYOUT.block_bytes
    assert set(entry.copies) == {TierKind.DRAM, TierKind.SSD}
    store.pool.close()


async def test_a_failed_write_releases_its_reservation(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    entry = put(store, b"A")
    ssd = ssd_of(store)
    # A plain file where the namespace's folder belongs: the write fails with an OSError.
    folder = ssd.location_for(NS, b"A", 0).path.parent
    folder.write_bytes(b"")
    assert not await store.pool.write_to_ssd(entry)
    assert (ssd.used_bytes, ssd.reserved_bytes, ssd.counters.errors) == (0, 0, 1)
    assert ssd.counters.bytes_written == 0
    assert set(entry.copies) == {TierKind.DRAM}
    # Still a victim of DRAM: the failed write put it back.
    with store.pool.victims(TierKind.DRAM) as victims:
        assert victims.take() is entry
        victims.keep(entry)
    store.pool.close()


async def test_a_dropped_ssd_copy_leaves_no_file(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    entry = put(store, b"A")
    assert await store.pool.write_to_ssd(entry)
    assert len(block_files(store)) == 1
    store.pool.drop_copy(entry, TierKind.SSD)
    assert set(entry.copies) == {TierKind.DRAM}
    assert ssd_of(store).used_bytes == 0
    # The file goes on an I/O thread; closing the tier waits for it.
    store.pool.close()
    assert block_files(store) == []


async def test_a_deleted_block_leaves_no_file(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    assert await store.pool.write_to_ssd(put(store, b"A"))
    assert store.delete(NS, [b"A"]).num_deleted == 1
    assert ssd_of(store).used_bytes == 0
    store.pool.close()
    assert block_files(store) == []


def test_without_a_loop_a_dropped_copy_goes_at_once(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    entry = put(store, b"A")

    async def write() -> None:
        assert await store.pool.write_to_ssd(entry)

    asyncio.run(write())
    store.pool.drop_copy(entry, TierKind.SSD)
    assert block_files(store) == []
    store.pool.close()


async def test_wait_durable_waits_for_the_write_through_file(tmp_path: Path) -> None:
    store = make_store(tmp_path, write_policy="write-through")
    mover = TierMover(store)
    entry = put(store, b"A")
    mover.on_committed([entry])
    await asyncio.sleep(0)  # the write starts in its own task
    assert store.pool.num_ssd_writes == 1
    await store.pool.wait_durable([entry])
    assert len(block_files(store)) == 1
    assert TierKind.SSD in entry.copies
    await mover.close()


async def test_room_for_a_larger_file_is_made_along_one_chain_tail_first(tmp_path: Path) -> None:
    # SSD copies leave tail first, so the chain's second-to-last file becomes a victim
    # only once the last one is gone: a reservation needing both must still be made.
    chain = [b"c0", b"c1", b"c2", b"c3"]
    probe = make_store(tmp_path / "probe")
    for index, key in enumerate(chain):
        assert await probe.pool.write_to_ssd(put(probe, key, chain[index - 1] if index else b""))
    chain_bytes = ssd_of(probe).used_bytes
    probe.pool.close()
    store = make_store(tmp_path, ssd_bytes=chain_bytes)
    for index, key in enumerate(chain):
        assert await store.pool.write_to_ssd(put(store, key, chain[index - 1] if index else b""))
    assert ssd_of(store).used_bytes == chain_bytes
    wide = Namespace(
        tenant="t", model_fingerprint="wide", layout=dataclasses.replace(LAYOUT, num_layers=3)
    )
    big = put(store, b"big", namespace=wide)
    assert await store.pool.write_to_ssd(big)
    assert TierKind.SSD in big.copies
    on_ssd = [entry.key for entry in store.find_prefix(NS, chain) if TierKind.SSD in entry.copies]
    assert on_ssd == chain[:2]  # the two tails' files made the room
    assert ssd_of(store).used_bytes <= chain_bytes
    store.pool.close()


async def one_file_bytes(directory: Path) -> int:
    """What one block's file takes on SSD, measured in a store of its own."""
    probe = make_store(directory)
    assert await probe.pool.write_to_ssd(put(probe, b"A"))
    file_bytes = ssd_of(probe).used_bytes
    probe.pool.close()
    return file_bytes


async def test_ssd_copies_whose_lease_ended_make_room_again(tmp_path: Path) -> None:
    file_bytes = await one_file_bytes(tmp_path / "probe")
    store = make_store(tmp_path, ssd_bytes=2 * file_bytes + 16)
    for key in (b"A", b"B"):
        assert await store.pool.write_to_ssd(put(store, key))
    store.pin(NS, [b"A", b"B"], ttl_s=0.05)
    await asyncio.sleep(0.1)  # both leases have ended; nothing has looked at them since
    assert await store.pool.write_to_ssd(put(store, b"C"))
    on_ssd = [key for key in (b"A", b"B", b"C") if TierKind.SSD in entry_copies(store, key)]
    assert len(on_ssd) == 2
    assert b"C" in on_ssd
    store.pool.close()


def entry_copies(store: BlockStore, key: bytes) -> set[TierKind]:
    (entry,) = store.find_prefix(NS, [key])
    return set(entry.copies)


async def test_a_parent_whose_last_child_file_is_deleted_can_leave_ssd(tmp_path: Path) -> None:
    file_bytes = await one_file_bytes(tmp_path / "probe")
    store = make_store(tmp_path, ssd_bytes=3 * file_bytes + 16)
    parent = put(store, b"P")
    assert await store.pool.write_to_ssd(parent)
    assert await store.pool.write_to_ssd(put(store, b"C1", b"P"))
    put(store, b"C2", b"P")  # a child with no file
    assert await store.pool.write_to_ssd(put(store, b"A"))
    store.pin(NS, [b"C1", b"A"], ttl_s=60)
    # Full, and nothing may leave: P has a child on SSD, the rest are pinned. The
    # attempt took P off the SSD queue as not evictable.
    wide = Namespace(
        tenant="t", model_fingerprint="wide", layout=dataclasses.replace(LAYOUT, num_layers=4)
    )
    big = put(store, b"B", namespace=wide)  # its file takes about two of the others'
    assert not await store.pool.write_to_ssd(big)
    store.unpin(NS, [b"C1"])
    assert store.delete(NS, [b"C1"]).num_deleted == 1
    # C1's file freed one place; P's may go now too (its DRAM copy stays): room for B.
    assert await store.pool.write_to_ssd(big)
    assert TierKind.SSD not in parent.copies
    store.pool.close()
