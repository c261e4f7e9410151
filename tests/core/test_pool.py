"""BlockPool's victims iterator: the one eviction loop's order and what it puts back."""

from __future__ import annotations

import hashlib
import time

import pytest

from kvstore.checksum import ChecksumKind, checksum
from kvstore.enums import PutOutcome, TierKind
from kvstore.index import BlockEntry
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.pool import BlockPool
from kvstore.put import PutSession
from kvstore.store import BlockStore, StoreConfig

PAGE_BYTES = 512
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
NS = Namespace(tenant="t", model_fingerprint="m", layout=LAYOUT)
KIND = ChecksumKind.XXH3_64


def make_store(num_pages: int = 8, **config: object) -> BlockStore:
    assert LAYOUT.block_bytes == PAGE_BYTES
    return BlockStore(
        StoreConfig(dram_bytes=num_pages * PAGE_BYTES, page_bytes=PAGE_BYTES, **config)  # type: ignore[arg-type]
    )


def put(store: BlockStore, key: bytes, parent: bytes = b"") -> None:
    session = PutSession(store, NS, KIND)
    try:
        session.declare(key, parent)
        for layer in range(LAYOUT.num_layers):
            data = hashlib.sha256(key + bytes([layer])).digest() * (LAYOUT.layer_bytes // 32)
            session.write(0, layer, 0, data, checksum(KIND, data))
        assert session.finish() == [PutOutcome.COMMITTED]
    finally:
        session.abort()


def entry_of(store: BlockStore, key: bytes) -> BlockEntry:
    (entry,) = store.find_prefix(NS, [key])
    return entry


def take_all(pool: BlockPool, kind: TierKind, *, keep: bool = True) -> list[bytes]:
    """Every victim of `kind` in order; with `keep`, each goes back when the pass ends."""
    taken = []
    with pool.victims(kind) as victims:
        while (victim := victims.take()) is not None:
            taken.append(victim.key)
            if keep:
                victims.keep(victim)
    return taken


def four_roots_used_in_order() -> BlockStore:
    """Roots A, B, C, D put in that order, then B and A looked up: LRU order C, D, B, A."""
    store = make_store()
    for key in (b"A", b"B", b"C", b"D"):
        put(store, key)
    store.lookup(NS, [b"B"])
    store.lookup(NS, [b"A"])
    return store


def test_victims_come_in_policy_order_and_kept_ones_are_requeued() -> None:
    store = four_roots_used_in_order()
    assert take_all(store.pool, TierKind.DRAM) == [b"C", b"D", b"B", b"A"]
    # The kept victims went back, ranked as before.
    assert take_all(store.pool, TierKind.DRAM) == [b"C", b"D", b"B", b"A"]


def test_victims_not_kept_stay_out_of_the_queue() -> None:
    store = four_roots_used_in_order()
    with store.pool.victims(TierKind.DRAM) as victims:
        first = victims.take()
        assert first is not None
        assert first.key == b"C"
    assert take_all(store.pool, TierKind.DRAM) == [b"D", b"B", b"A"]
    # Whoever took it puts it back where it belongs.
    store.pool.refresh(first)
    assert take_all(store.pool, TierKind.DRAM) == [b"C", b"D", b"B", b"A"]


def keep_two_then_fail(pool: BlockPool) -> None:
    with pool.victims(TierKind.DRAM) as victims:
        for _ in range(2):
            victim = victims.take()
            assert victim is not None
            victims.keep(victim)
        raise RuntimeError("the pass gave up")


def test_kept_victims_are_requeued_when_the_pass_fails() -> None:
    store = four_roots_used_in_order()
    with pytest.raises(RuntimeError, match="gave up"):
        keep_two_then_fail(store.pool)
    assert take_all(store.pool, TierKind.DRAM) == [b"C", b"D", b"B", b"A"]


def test_a_pinned_block_is_not_offered_and_returns_once_unpinned() -> None:
    store = four_roots_used_in_order()
    store.pin(NS, [b"D"], ttl_s=60)
    assert take_all(store.pool, TierKind.DRAM) == [b"C", b"B", b"A"]
    store.unpin(NS, [b"D"])
    assert take_all(store.pool, TierKind.DRAM) == [b"C", b"D", b"B", b"A"]


def test_a_stale_queue_entry_is_skipped_and_ranked_where_it_belongs() -> None:
    store = four_roots_used_in_order()
    entry = entry_of(store, b"D")
    # A lease set without re-ranking: the queue still offers D, and take must not.
    entry.lease_expiry = time.monotonic() + 60
    assert take_all(store.pool, TierKind.DRAM) == [b"C", b"B", b"A"]
    # take re-ranked it as leased, so an eviction pass finds it once the lease lapses.
    entry.lease_expiry = time.monotonic() - 1
    store.pool.release_expired_leases()
    assert take_all(store.pool, TierKind.DRAM) == [b"C", b"D", b"B", b"A"]


def test_deferred_touches_settle_before_victims_are_chosen() -> None:
    store = four_roots_used_in_order()
    store.lookup(NS, [b"C"], defer_touch=True)
    assert take_all(store.pool, TierKind.DRAM) == [b"D", b"B", b"A", b"C"]


def test_only_chain_tails_are_victims_without_another_copy() -> None:
    store = make_store()
    put(store, b"A")
    put(store, b"B", b"A")
    put(store, b"C")
    assert take_all(store.pool, TierKind.DRAM) == [b"B", b"C"]
    assert take_all(store.pool, TierKind.DRAM, keep=False) == [b"B", b"C"]
    assert take_all(store.pool, TierKind.DRAM) == []


def test_allocate_evicts_in_victims_order() -> None:
    store = four_roots_used_in_order()
    pool = store.pool
    for _ in range(4):  # the arena's free pages
        pool.allocate(TierKind.DRAM, PAGE_BYTES)
    evicted = []
    for _ in range(4):
        before = {entry.key for entry in pool.entries()}
        pool.allocate(TierKind.DRAM, PAGE_BYTES)
        evicted.extend(before - {entry.key for entry in pool.entries()})
    assert evicted == [b"C", b"D", b"B", b"A"]
    assert store.dram.counters.evictions == 4


def test_entry_layout_is_its_namespace_layout() -> None:
    store = make_store()
    put(store, b"A")
    assert entry_of(store, b"A").layout is LAYOUT
