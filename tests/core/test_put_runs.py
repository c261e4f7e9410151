"""PutSession.write_run: whole small layers of several declared blocks in one message."""

from __future__ import annotations

import hashlib

import pytest

from kvstore.checksum import ChecksumKind, checksum, checksums_of_slices
from kvstore.enums import PutOutcome
from kvstore.errors import ChecksumMismatch, InvalidRequest
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.put import PutSession
from kvstore.read import ReadSession
from kvstore.store import BlockStore, StoreConfig

PAGE_BYTES = 512
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
NS = Namespace(tenant="t", model_fingerprint="m", layout=LAYOUT)

KIND = ChecksumKind.XXH3_64
KEYS = [b"r0", b"r1", b"r2"]


def layer_data(key: bytes, layer: int) -> bytes:
    seed = hashlib.sha256(key + bytes([layer])).digest()
    return (seed * (LAYOUT.layer_bytes // len(seed) + 1))[: LAYOUT.layer_bytes]


def fresh_store() -> BlockStore:
    return BlockStore(StoreConfig(dram_bytes=16 * PAGE_BYTES, page_bytes=PAGE_BYTES))


def declared_session(store: BlockStore) -> PutSession:
    session = PutSession(store, NS, KIND)
    parent = b""
    for key in KEYS:
        session.declare(key, parent)
        parent = key
    return session


def stored_layers(store: BlockStore) -> dict[tuple[int, int], bytes]:
    """Every (block, layer) of KEYS' chain as the store serves it."""
    read = ReadSession(store, NS, KEYS)
    got = {(c.block_index, c.layer): b"".join(c.views) for c in read.chunks(1 << 20)}
    read.close()
    return got


def run_of(layer: int, keys: list[bytes]) -> tuple[bytes, list[int]]:
    parts = [layer_data(key, layer) for key in keys]
    return b"".join(parts), [checksum(KIND, part) for part in parts]


def test_runs_store_exactly_what_chunks_would() -> None:
    store = fresh_store()
    session = declared_session(store)
    for layer in range(LAYOUT.num_layers):
        data, checksums = run_of(layer, KEYS)
        session.write_run(0, 3, layer, data, checksums)
    assert session.finish() == [PutOutcome.COMMITTED] * 3
    assert stored_layers(store) == {
        (index, layer): layer_data(key, layer)
        for index, key in enumerate(KEYS)
        for layer in range(LAYOUT.num_layers)
    }


def test_a_run_mixes_with_chunks_and_commits_blocks_as_they_complete() -> None:
    store = fresh_store()
    session = declared_session(store)
    data, checksums = run_of(0, KEYS[:2])
    session.write_run(0, 2, 0, data, checksums)
    for index, key in enumerate(KEYS[:2]):
        part = layer_data(key, 1)
        session.write(index, 1, 0, part, checksum(KIND, part))
    assert store.lookup(NS, KEYS).num_matched == 2, "blocks 0 and 1 are whole, block 2 is not"
    session.abort()
    assert store.lookup(NS, KEYS).num_matched == 2


@pytest.mark.parametrize(
    ("first", "count", "layer", "size_delta", "message"),
    [
        (2, 2, 0, 0, "declared"),
        (-1, 1, 0, 0, "declared"),
        (0, 1, 5, 0, "layers"),
        (0, 2, 0, 1, "carries"),
        (0, 0, 0, 0, "at least one block"),
    ],
)
def test_bad_runs_are_invalid_and_store_nothing(
    first: int, count: int, layer: int, size_delta: int, message: str
) -> None:
    store = fresh_store()
    free_before = store.dram.arena.free_bytes
    session = declared_session(store)
    data, checksums = run_of(0, KEYS[: max(count, 1)])
    with pytest.raises(InvalidRequest, match=message):
        session.write_run(first, count, layer, data + b"x" * size_delta, checksums[:count])
    session.abort()
    assert store.lookup(NS, KEYS).num_matched == 0
    assert store.dram.arena.free_bytes == free_before


def test_a_layer_sent_twice_is_invalid() -> None:
    session = declared_session(fresh_store())
    data, checksums = run_of(0, KEYS)
    session.write_run(0, 3, 0, data, checksums)
    with pytest.raises(InvalidRequest, match="already sent"):
        session.write_run(1, 1, 0, layer_data(KEYS[1], 0), checksums[1:2])
    session.abort()


def test_a_bad_checksum_in_a_last_layer_keeps_the_blocks_before_it() -> None:
    store = fresh_store()
    session = declared_session(store)
    data, checksums = run_of(0, KEYS)
    session.write_run(0, 3, 0, data, checksums)
    data, checksums = run_of(1, KEYS)
    checksums[1] ^= 1
    with pytest.raises(ChecksumMismatch, match="block 1"):
        session.write_run(0, 3, 1, data, checksums)
    session.abort()
    assert store.counters.checksum_failures == 1
    # Block 0 was complete and verified before the bad layer of block 1 was reached.
    assert store.lookup(NS, KEYS).num_matched == 1
    assert store.lookup(NS, KEYS[2:]).num_matched == 0, "block 2 was whole too, but stays out"
    assert store.dram.arena.free_bytes == store.dram.arena.capacity_bytes - LAYOUT.block_bytes


def test_a_bad_checksum_in_a_run_is_data_loss() -> None:
    store = fresh_store()
    session = declared_session(store)
    data, checksums = run_of(0, KEYS)
    checksums[1] ^= 1
    with pytest.raises(ChecksumMismatch, match="block 1"):
        session.write_run(0, 3, 0, data, checksums)
    session.abort()
    assert store.lookup(NS, KEYS).num_matched == 0


def test_a_run_over_stored_and_new_blocks_writes_only_the_new_ones() -> None:
    store = fresh_store()
    first = PutSession(store, NS, KIND)
    first.declare(KEYS[0], b"")
    for layer in range(LAYOUT.num_layers):
        data, checksums = run_of(layer, KEYS[:1])
        first.write_run(0, 1, layer, data, checksums)
    assert first.finish() == [PutOutcome.COMMITTED]
    free_after_first = store.dram.arena.free_bytes

    session = declared_session(store)  # block 0 is already stored: checked, not written
    for layer in range(LAYOUT.num_layers):
        data, checksums = run_of(layer, KEYS)
        session.write_run(0, 3, layer, data, checksums)
    assert session.finish() == [
        PutOutcome.ALREADY_PRESENT,
        PutOutcome.COMMITTED,
        PutOutcome.COMMITTED,
    ]
    assert store.dram.arena.free_bytes == free_after_first - 2 * LAYOUT.block_bytes
    assert stored_layers(store) == {
        (index, layer): layer_data(key, layer)
        for index, key in enumerate(KEYS)
        for layer in range(LAYOUT.num_layers)
    }


@pytest.mark.parametrize("kind", list(ChecksumKind))
def test_run_checksums_are_the_checksums_of_each_layer(kind: ChecksumKind) -> None:
    parts = [layer_data(key, 0) for key in KEYS]
    joined = memoryview(b"".join(parts))
    assert checksums_of_slices(kind, joined, LAYOUT.layer_bytes) == [
        checksum(kind, part) for part in parts
    ]
    # A different byte anywhere changes that layer's checksum only.
    changed = bytearray(joined)
    changed[LAYOUT.layer_bytes + 5] ^= 0xFF
    got = checksums_of_slices(kind, memoryview(bytes(changed)), LAYOUT.layer_bytes)
    assert [a == b for a, b in zip(got, [checksum(kind, p) for p in parts], strict=True)] == [
        True,
        False,
        True,
    ]
