"""BlockStore, PutSession and ReadSession: eviction order, pins, commits, reclamation, deletes.

Every block of LAYOUT is exactly one 512 B arena page, so an arena of N pages holds N
blocks and each new block evicts exactly one victim once the arena is full.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from kvstore.checksum import ChecksumKind, checksum
from kvstore.enums import PutOutcome, TierKind
from kvstore.errors import CapacityExhausted, ChecksumMismatch, InvalidRequest
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.put import PutSession
from kvstore.read import ReadSession
from kvstore.store import BlockStore, StoreConfig

PAGE_BYTES = 512
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
NS = Namespace(tenant="t", model_fingerprint="m", layout=LAYOUT)
OTHER_NS = Namespace(tenant="other", model_fingerprint="m", layout=LAYOUT)
A, B, C, D, E = b"A", b"B", b"C", b"D", b"E"


def make_store(num_pages: int = 5, **config: object) -> BlockStore:
    assert LAYOUT.block_bytes == PAGE_BYTES
    return BlockStore(
        StoreConfig(dram_bytes=num_pages * PAGE_BYTES, page_bytes=PAGE_BYTES, **config)  # type: ignore[arg-type]
    )


def layer_data(key: bytes, layer: int, salt: bytes = b"") -> bytes:
    seed = hashlib.sha256(salt + key + bytes([layer])).digest()
    return (seed * (LAYOUT.layer_bytes // len(seed) + 1))[: LAYOUT.layer_bytes]


def put(
    store: BlockStore,
    blocks: list[tuple[bytes, bytes]],
    *,
    namespace: Namespace = NS,
    salt: bytes = b"",
    kind: ChecksumKind = ChecksumKind.XXH3_64,
) -> list[PutOutcome]:
    """Put whole blocks (key, parent_key) in one session: declare all, then send each layer."""
    session = PutSession(store, namespace, kind)
    try:
        for key, parent in blocks:
            session.declare(key, parent)
        for index, (key, _) in enumerate(blocks):
            for layer in range(LAYOUT.num_layers):
                data = layer_data(key, layer, salt)
                session.write(index, layer, 0, data, checksum(kind, data))
        return session.finish()
    finally:
        session.abort()


def put_root(store: BlockStore, key: bytes) -> None:
    assert put(store, [(key, b"")]) == [PutOutcome.COMMITTED]


def read_block(store: BlockStore, key: bytes, namespace: Namespace = NS) -> bytes:
    session = ReadSession(store, namespace, [key])
    try:
        assert len(session.entries) == 1
        return b"".join(
            b"".join(bytes(view) for view in chunk.views) for chunk in session.chunks(100)
        )
    finally:
        session.close()


def present(store: BlockStore, key: bytes, namespace: Namespace = NS) -> bool:
    """Whether `key` is findable, without touching it (a lookup would change LRU order)."""
    return bool(store.find_prefix(namespace, [key]))


def assert_no_orphans(store: BlockStore) -> None:
    for entry in store.pool.entries():
        if entry.parent is not None:
            assert entry.namespace.blocks.get(entry.parent.key) is entry.parent, (
                f"{entry.key!r} is findable but its parent {entry.parent.key!r} is gone"
            )


def fill_two_chains(store: BlockStore) -> None:
    """A→B→C, then D→E: five blocks in a five-page arena."""
    assert put(store, [(A, b""), (B, A), (C, B)]) == [PutOutcome.COMMITTED] * 3
    assert put(store, [(D, b""), (E, D)]) == [PutOutcome.COMMITTED] * 2
    assert store.dram.arena.free_bytes == 0


def eviction_order(store: BlockStore, num_pages: int) -> list[bytes]:
    """Reserve `num_pages` pages one at a time, as puts in flight do; the keys they evict.

    The reservations are kept, so the arena stays full and each one evicts one victim.
    """
    order: list[bytes] = []
    for _ in range(num_pages):
        before = {entry.key for entry in store.pool.entries()}
        store.pool.allocate(TierKind.DRAM, PAGE_BYTES)
        after = {entry.key for entry in store.pool.entries()}
        vanished = before - after
        assert len(vanished) == 1, f"one reservation evicted {sorted(vanished)}"
        order.extend(vanished)
        assert_no_orphans(store)
    return order


# -- eviction order -----------------------------------------------------------------------------


def test_lru_evicts_chain_tails_first_in_exact_order() -> None:
    store = make_store()
    fill_two_chains(store)
    assert eviction_order(store, 5) == [C, B, A, E, D]
    assert store.dram.counters.evictions == 5


def test_lookup_makes_a_chain_recent() -> None:
    store = make_store()
    fill_two_chains(store)
    assert store.lookup(NS, [A, B, C]).num_matched == 3
    assert eviction_order(store, 5) == [E, D, C, B, A]


def test_deferred_lookup_touch_ranks_the_chain_before_any_victim_is_taken() -> None:
    store = make_store()
    fill_two_chains(store)
    assert store.lookup(NS, [A, B, C], defer_touch=True).num_matched == 3
    # An immediate touch after it is newer still: the ticks were taken at lookup time.
    assert store.lookup(NS, [D, E]).num_matched == 2
    assert eviction_order(store, 5) == [C, B, A, E, D]


def test_deferred_lookup_touch_is_applied_when_settled() -> None:
    store = make_store()
    fill_two_chains(store)
    before = [entry.last_access for entry in store.find_prefix(NS, [A, B, C])]
    store.lookup(NS, [A, B, C], defer_touch=True)
    assert [entry.last_access for entry in store.find_prefix(NS, [A, B, C])] == before
    store.settle_touches()
    after = [entry.last_access for entry in store.find_prefix(NS, [A, B, C])]
    assert min(after) > max(before)
    assert after[0] > after[1] > after[2], "the head gets the newest tick"


def test_lookup_never_reports_a_child_whose_parent_was_evicted() -> None:
    store = make_store()
    fill_two_chains(store)
    put_root(store, b"x")  # evicts C
    put_root(store, b"y")  # evicts B
    assert store.lookup(NS, [A, B, C]).num_matched == 1
    assert not present(store, B)
    assert not present(store, C)


# -- pins -----------------------------------------------------------------------------------


def test_leased_tail_keeps_its_whole_chain_and_full_store_is_exhausted() -> None:
    store = make_store()
    fill_two_chains(store)
    count, expires_at = store.pin(NS, [E], ttl_s=60)
    assert count == 1
    assert expires_at > time.time() + 50
    assert eviction_order(store, 3) == [C, B, A]  # the arena is now full of D→E and reservations
    assert store.pin(NS, [D, b"absent"], ttl_s=60)[0] == 1
    with pytest.raises(CapacityExhausted, match="nothing can be evicted now"):
        put(store, [(b"one-too-many", b"")])
    assert present(store, D)
    assert present(store, E)
    assert store.dram.arena.free_bytes == 0
    assert store.report().num_pinned == 2

    assert store.unpin(NS, [E]) == 1
    put_root(store, b"after-unpin")
    assert not present(store, E)
    assert present(store, D)
    assert_no_orphans(store)


def test_lease_on_an_inner_block_protects_only_it_and_its_ancestors() -> None:
    store = make_store()
    fill_two_chains(store)
    store.pin(NS, [B], ttl_s=60)
    assert eviction_order(store, 3) == [C, E, D]
    with pytest.raises(CapacityExhausted):
        put(store, [(b"x", b""), (b"y", b""), (b"z", b"")])
    assert present(store, A)
    assert present(store, B)


def test_expired_lease_becomes_evictable() -> None:
    store = make_store(num_pages=1, max_lease_s=0.02)
    put_root(store, A)
    _, expires_at = store.pin(NS, [A], ttl_s=3600)  # capped by max_lease_s
    assert expires_at <= time.time() + 0.02 + 0.01
    with pytest.raises(CapacityExhausted):
        put(store, [(B, b"")])
    deadline = time.monotonic() + 0.03
    while time.monotonic() < deadline:  # let the capped lease lapse (bounded busy wait)
        pass
    put_root(store, B)
    assert not present(store, A)


def test_pin_rejects_a_non_positive_ttl() -> None:
    store = make_store()
    put_root(store, A)
    with pytest.raises(InvalidRequest, match="ttl"):
        store.pin(NS, [A], ttl_s=0)


def test_pin_counts_each_block_once_however_often_it_is_named() -> None:
    store = make_store()
    put_root(store, A)
    assert store.pin(NS, [A, A, A, b"absent"], ttl_s=60)[0] == 1


def test_read_in_flight_is_never_evicted() -> None:
    store = make_store()
    fill_two_chains(store)
    session = ReadSession(store, NS, [A, B, C])
    assert len(session.entries) == 3
    free_before = store.dram.arena.free_bytes
    # x and y take D and E's pages; z finds only the read's blocks and its own
    # parents, and fails without evicting anything.
    chain = [(b"x", b""), (b"y", b"x"), (b"z", b"y")]
    with pytest.raises(CapacityExhausted):
        put(store, chain)
    assert all(present(store, key) for key in (A, B, C, b"x", b"y"))
    assert not present(store, D)
    assert not present(store, E)
    assert store.dram.arena.free_bytes == free_before, "z's failed start holds no page"

    chunks = list(session.chunks(LAYOUT.layer_bytes))
    assert [(chunk.layer, chunk.block_index) for chunk in chunks] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
    ]
    assert bytes(chunks[4].views[0]) == layer_data(B, 1)
    session.close()
    assert put(store, chain) == [PutOutcome.ALREADY_PRESENT] * 2 + [PutOutcome.COMMITTED]
    assert not present(store, C), "once the read ended, its tail is evictable again"
    assert store.lookup(NS, [A, B, C]).num_matched == 2


# -- put sessions -------------------------------------------------------------------------------


def test_abandoned_put_frees_its_pages() -> None:
    store = make_store()
    put_root(store, A)
    free_before = store.dram.arena.free_bytes
    session = PutSession(store, NS, ChecksumKind.XXH3_64)
    session.declare(B, A)
    session.declare(C, B)
    data = layer_data(B, 0)
    session.write(0, 0, 0, data[:100], checksum(ChecksumKind.XXH3_64, data))
    # Room is reserved as bytes arrive: C, declared but not sent, holds nothing.
    assert store.dram.arena.free_bytes == free_before - PAGE_BYTES
    assert store.pool.put_reserved_bytes == PAGE_BYTES
    session.abort()
    session.abort()  # idempotent
    assert store.dram.arena.free_bytes == free_before
    assert store.pool.put_reserved_bytes == 0
    assert store.counters.puts_abandoned == 1
    assert store.lookup(NS, [A, B, C]).num_matched == 1


def test_aborted_put_keeps_the_blocks_it_completed() -> None:
    store = make_store()
    session = PutSession(store, NS, ChecksumKind.XXH3_64)
    session.declare(A, b"")
    session.declare(B, A)
    for layer in range(LAYOUT.num_layers):
        data = layer_data(A, layer)
        session.write(0, layer, 0, data, checksum(ChecksumKind.XXH3_64, data))
    session.abort()
    assert present(store, A)
    assert not present(store, B)
    assert store.dram.used_bytes == PAGE_BYTES


def test_finish_with_an_incomplete_block_raises_and_frees_it() -> None:
    store = make_store()
    session = PutSession(store, NS, ChecksumKind.XXH3_64)
    session.declare(A, b"")
    data = layer_data(A, 0)
    session.write(0, 0, 0, data, checksum(ChecksumKind.XXH3_64, data))
    with pytest.raises(InvalidRequest, match=r"incomplete.*lacks layers \[1\]"):
        session.finish()
    assert store.dram.used_bytes == 0
    assert not present(store, A)


def test_block_is_visible_only_when_every_layer_is_verified() -> None:
    store = make_store()
    session = PutSession(store, NS, ChecksumKind.XXH3_64)
    session.declare(A, b"")
    first = layer_data(A, 0)
    session.write(0, 0, 0, first[:64], checksum(ChecksumKind.XXH3_64, first))
    session.write(0, 0, 64, first[64:], 0)  # checksum is read from offset 0 only
    assert not present(store, A)
    last = layer_data(A, 1)
    session.write(0, 1, 0, last, checksum(ChecksumKind.XXH3_64, last))
    assert present(store, A)
    assert session.finish() == [PutOutcome.COMMITTED]
    assert read_block(store, A) == first + last


def test_child_completed_before_its_parent_waits_for_it() -> None:
    store = make_store()
    session = PutSession(store, NS, ChecksumKind.XXH3_64)
    session.declare(A, b"")
    session.declare(B, A)
    for layer in range(LAYOUT.num_layers):
        data = layer_data(B, layer)
        session.write(1, layer, 0, data, checksum(ChecksumKind.XXH3_64, data))
    assert not present(store, B), "a child must not be findable before its parent"
    for layer in range(LAYOUT.num_layers):
        data = layer_data(A, layer)
        session.write(0, layer, 0, data, checksum(ChecksumKind.XXH3_64, data))
    assert store.lookup(NS, [A, B]).num_matched == 2
    assert session.finish() == [PutOutcome.COMMITTED, PutOutcome.COMMITTED]


@pytest.mark.parametrize("kind", list(ChecksumKind))
def test_checksum_mismatch_raises_and_stores_nothing(kind: ChecksumKind) -> None:
    store = make_store()
    session = PutSession(store, NS, kind)
    session.declare(A, b"")
    data = layer_data(A, 0)
    with pytest.raises(ChecksumMismatch, match="not stored"):
        session.write(0, 0, 0, data, checksum(kind, data) ^ 1)
    session.abort()
    assert not present(store, A)
    assert store.counters.checksum_failures == 1
    assert store.dram.used_bytes == 0


def test_crc32c_blocks_carry_their_kind() -> None:
    store = make_store()
    assert put(store, [(A, b"")], kind=ChecksumKind.CRC32C) == [PutOutcome.COMMITTED]
    session = ReadSession(store, NS, [A])
    chunk = next(session.chunks(LAYOUT.layer_bytes))
    assert chunk.checksum_kind_value == ChecksumKind.CRC32C.value
    assert chunk.layer_checksum == checksum(ChecksumKind.CRC32C, layer_data(A, 0))
    session.close()


def test_duplicate_and_self_parent_declarations_are_rejected() -> None:
    store = make_store()
    session = PutSession(store, NS, ChecksumKind.XXH3_64)
    session.declare(A, b"")
    with pytest.raises(InvalidRequest, match="declared twice"):
        session.declare(A, b"")
    with pytest.raises(InvalidRequest, match="itself"):
        session.declare(B, B)
    with pytest.raises(InvalidRequest, match="empty"):
        session.declare(b"", b"")
    with pytest.raises(InvalidRequest, match="at most 64"):
        session.declare(b"k" * 65, b"")
    session.abort()
    assert store.dram.used_bytes == 0


@pytest.mark.parametrize(
    ("block_index", "layer", "offset", "size", "fragment"),
    [
        (1, 0, 0, 10, "declare a block"),
        (0, 2, 0, 10, "has 2 layers"),
        (0, 0, 5, 10, "offset 5"),
        (0, 0, 0, LAYOUT.layer_bytes + 1, f"a layer is {LAYOUT.layer_bytes} bytes"),
        (0, 0, 0, 0, "empty chunk"),
    ],
    ids=["undeclared-block", "bad-layer", "offset-gap", "layer-overflow", "empty-chunk"],
)
def test_malformed_chunks_are_rejected(
    block_index: int, layer: int, offset: int, size: int, fragment: str
) -> None:
    store = make_store()
    session = PutSession(store, NS, ChecksumKind.XXH3_64)
    session.declare(A, b"")
    with pytest.raises(InvalidRequest, match=fragment):
        session.write(block_index, layer, offset, b"\x01" * size, 0)
    session.abort()
    assert store.dram.used_bytes == 0


def test_parent_missing_blocks_are_dropped() -> None:
    store = make_store()
    outcomes = put(store, [(B, b"no-such-parent"), (C, B)])
    assert outcomes == [PutOutcome.PARENT_MISSING, PutOutcome.PARENT_MISSING]
    assert not present(store, B)
    assert not present(store, C)
    assert store.dram.used_bytes == 0


def test_already_present_keeps_the_stored_bytes() -> None:
    store = make_store()
    put_root(store, A)
    original = read_block(store, A)
    assert put(store, [(A, b""), (B, A)], salt=b"different") == [
        PutOutcome.ALREADY_PRESENT,
        PutOutcome.COMMITTED,
    ]
    assert read_block(store, A) == original
    assert store.dram.used_bytes == 2 * PAGE_BYTES
    assert store.lookup(NS, [A, B]).num_matched == 2


def test_oversized_block_fails_without_evicting_anything() -> None:
    """A layout whose block exceeds the whole tier must not wipe the cache before failing."""
    store = make_store()
    fill_two_chains(store)
    huge = Namespace(
        tenant="t",
        model_fingerprint="m",
        layout=KVLayout(
            num_layers=64, num_kv_heads=8, head_dim=128, dtype=DType.FLOAT16, block_tokens=16
        ),
    )
    with pytest.raises(CapacityExhausted, match="larger than"):
        PutSession(store, huge, ChecksumKind.XXH3_64)
    assert store.pool.num_namespaces == 1, "the refused put left no namespace behind"
    assert all(present(store, key) for key in (A, B, C, D, E))
    assert store.dram.counters.evictions == 0


# -- namespaces and deletes ----------------------------------------------------------------------


def test_namespaces_do_not_share_blocks() -> None:
    store = make_store()
    put_root(store, A)
    assert store.lookup(OTHER_NS, [A]).num_matched == 0
    assert put(store, [(A, b"")], namespace=OTHER_NS, salt=b"x") == [PutOutcome.COMMITTED]
    assert read_block(store, A) != read_block(store, A, OTHER_NS)
    assert store.report().num_namespaces == 2


def test_delete_cascades_to_descendants() -> None:
    store = make_store()
    fill_two_chains(store)
    result = store.delete(NS, [B])
    assert (result.num_deleted, result.num_busy) == (2, 0)
    assert store.lookup(NS, [A, B, C]).num_matched == 1
    assert store.dram.used_bytes == 3 * PAGE_BYTES
    assert store.delete(OTHER_NS, [A]).num_deleted == 0
    assert present(store, A)
    assert_no_orphans(store)


def test_delete_skips_pinned_blocks_and_their_ancestors() -> None:
    store = make_store()
    fill_two_chains(store)
    store.pin(NS, [B], ttl_s=60)
    result = store.delete(NS, [A])
    assert (result.num_deleted, result.num_busy) == (1, 2)  # C goes; B is pinned; A is B's parent
    assert store.lookup(NS, [A, B, C]).num_matched == 2
    session = ReadSession(store, NS, [D, E])
    result = store.delete(NS, [D])
    assert (result.num_deleted, result.num_busy) == (0, 2)
    session.close()
    assert store.delete(NS, [D]).num_deleted == 2
    assert_no_orphans(store)


def test_delete_counts_each_block_once_when_keys_share_a_chain() -> None:
    store = make_store()
    assert put(store, [(A, b""), (B, A), (C, B)]) == [PutOutcome.COMMITTED] * 3
    store.pin(NS, [C], ttl_s=60)
    # Every key names the same chain: each block is busy once, not once per key above it.
    result = store.delete(NS, [A, B, C])
    assert (result.num_deleted, result.num_busy) == (0, 3)
    store.unpin(NS, [C])
    result = store.delete(NS, [A, B, C])
    assert (result.num_deleted, result.num_busy) == (3, 0)
    assert store.dram.used_bytes == 0
    assert_no_orphans(store)


# -- policies -----------------------------------------------------------------------------------


def read_once(store: BlockStore, key: bytes) -> None:
    ReadSession(store, NS, [key]).close()


def test_lfu_evicts_the_least_hit_block_first() -> None:
    store = make_store(num_pages=3, eviction_policy="lfu")
    put_root(store, A)
    read_once(store, A)
    read_once(store, A)
    put_root(store, B)
    read_once(store, B)
    put_root(store, C)  # never read, and the most recent
    assert eviction_order(store, 3) == [C, B, A]


def test_lfu_breaks_ties_by_recency() -> None:
    store = make_store(num_pages=3, eviction_policy="lfu")
    for key in (A, B, C):
        put_root(store, key)
    read_once(store, A)
    read_once(store, C)
    read_once(store, B)
    assert eviction_order(store, 3) == [A, C, B]


def test_lru_differs_from_lfu_on_the_same_history() -> None:
    store = make_store(num_pages=3, eviction_policy="lru")
    put_root(store, A)
    read_once(store, A)
    read_once(store, A)
    put_root(store, B)
    read_once(store, B)
    put_root(store, C)
    assert eviction_order(store, 3) == [A, B, C]


def test_session_policy_keeps_once_leased_chains_longest() -> None:
    store = make_store(num_pages=3, eviction_policy="session")
    put_root(store, A)
    store.pin(NS, [A], ttl_s=60)
    assert store.unpin(NS, [A]) == 1
    put_root(store, B)
    put_root(store, C)
    # LRU would take A first; the session policy takes the never-leased blocks first.
    assert eviction_order(store, 3) == [B, C, A]


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="eviction policy"):
        StoreConfig(eviction_policy="fifo")


def test_report_counts_blocks_bytes_and_hits() -> None:
    store = make_store()
    fill_two_chains(store)
    read_block(store, A)
    report = store.report()
    (dram,) = report.tiers
    assert dram.kind is TierKind.DRAM
    assert (dram.capacity_bytes, dram.used_bytes, dram.num_blocks) == (2560, 2560, 5)
    assert dram.counters.hits == 1
    assert report.counters.blocks_put == 5
    assert report.counters.blocks_got == 1
    assert report.counters.bytes_got == PAGE_BYTES


def test_a_parent_another_put_commits_first_stays_pinned_for_this_puts_children() -> None:
    store = make_store(num_pages=2)
    session = PutSession(store, NS, ChecksumKind.XXH3_64)
    try:
        session.declare(A, b"")  # A is not stored yet: nothing to pin at declare
        session.declare(B, A)
        assert put(store, [(A, b"")]) == [PutOutcome.COMMITTED]  # another put, meanwhile

        def send(index: int, key: bytes) -> None:
            for layer in range(LAYOUT.num_layers):
                data = layer_data(key, layer)
                session.write(index, layer, 0, data, checksum(ChecksumKind.XXH3_64, data))

        send(0, A)  # ALREADY_PRESENT at commit: still B's parent, so it stays
        put_root(store, C)  # DRAM is full now; A is the least recently used
        send(1, B)  # B's own room must not come from its parent
        assert session.finish() == [PutOutcome.ALREADY_PRESENT, PutOutcome.COMMITTED]
    finally:
        session.abort()
    assert [entry.key for entry in store.find_prefix(NS, [A, B])] == [A, B]
