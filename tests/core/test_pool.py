"""BlockPool's victims iterator: the one eviction loop's order and what it puts back."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest

from kvstore.checksum import ChecksumKind, checksum
from kvstore.enums import Durability, PutOutcome, TierKind
from kvstore.errors import CapacityExhausted
from kvstore.index import BlockEntry
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.pool import BlockPool
from kvstore.put import PutSession
from kvstore.store import DELETE_STEP_BLOCKS, BlockStore, StoreConfig

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


def test_a_shorter_pin_reports_the_longer_lease_it_leaves_in_force() -> None:
    store = four_roots_used_in_order()
    _, first_end = store.pin(NS, [b"D"], ttl_s=600)
    count, reported_end = store.pin(NS, [b"D"], ttl_s=1)
    assert count == 1
    # The block stays pinned for the first lease; the reply must not say 1 s.
    assert reported_end == pytest.approx(first_end, abs=0.5)
    _, both_end = store.pin(NS, [b"C", b"D"], ttl_s=5)
    assert both_end == pytest.approx(time.time() + 5, abs=0.5)  # C's lease ends first


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


# -- allocation: victims are planned before any is dropped --------------------------------------


def present(store: BlockStore, key: bytes) -> bool:
    return bool(store.find_prefix(NS, [key]))


def chain_and_roots(store: BlockStore) -> None:
    """A→B→C→D, then roots E and F: six of eight pages; LRU order F, E newest."""
    parent = b""
    for key in (b"A", b"B", b"C", b"D"):
        put(store, key, parent)
        parent = key
    put(store, b"E")
    put(store, b"F")


def test_an_allocation_that_cannot_fit_evicts_nothing() -> None:
    store = make_store()
    chain_and_roots(store)
    store.pin(NS, [b"B"], ttl_s=60)  # B's lease keeps A and B; C and D may still go
    free_pages = store.dram.arena.free_bytes // PAGE_BYTES
    assert free_pages == 2
    # Free pages, plus D, C, E and F: six pages at most; seven cannot fit.
    with pytest.raises(CapacityExhausted, match="DRAM tier is full"):
        store.pool.allocate(TierKind.DRAM, 7 * PAGE_BYTES)
    assert all(present(store, key) for key in (b"A", b"B", b"C", b"D", b"E", b"F"))
    assert store.dram.counters.evictions == 0
    # Everything that was taken off the queue went back on it, in order.
    assert take_all(store.pool, TierKind.DRAM) == [b"D", b"E", b"F"]


def test_planned_victims_free_their_parents_in_policy_order() -> None:
    """D goes first; C becomes a tail once D is planned and, being older than E and F,
    goes next; B after it: what dropping one victim at a time would do."""
    store = make_store()
    chain_and_roots(store)
    store.pool.allocate(TierKind.DRAM, 5 * PAGE_BYTES)  # 2 free + 3 victims
    assert [present(store, key) for key in (b"A", b"B", b"C", b"D", b"E", b"F")] == [
        True,
        False,
        False,
        False,
        True,
        True,
    ]
    assert store.dram.counters.evictions == 3


def test_a_block_claimed_for_a_write_through_write_is_not_evictable(tmp_path: Path) -> None:
    """Write-through claims at commit: until the write ends, no allocation can take the
    block's DRAM copy (the issue saw acknowledged blocks evicted before reaching SSD)."""
    store = make_store(num_pages=2, ssd_dir=str(tmp_path / "ssd"), write_policy="write-through")
    put(store, b"A")
    put(store, b"B")

    async def claim_then_allocate() -> None:
        entry = entry_of(store, b"A")
        assert store.pool.claim_ssd_write(entry)
        assert store.pool.num_ssd_writes == 1
        store.pool.allocate(TierKind.DRAM, PAGE_BYTES)  # takes B, never A
        assert present(store, b"A")
        assert not present(store, b"B")
        with pytest.raises(CapacityExhausted):
            store.pool.allocate(TierKind.DRAM, PAGE_BYTES)
        assert await store.pool.write_to_ssd(entry)
        assert store.pool.num_ssd_writes == 0
        assert await store.pool.wait_durable([entry]) is Durability.DURABLE_ON_SSD
        assert set(entry.copies) == {TierKind.DRAM, TierKind.SSD}
        store.pool.allocate(TierKind.DRAM, PAGE_BYTES)  # now A's DRAM copy may go

    asyncio.run(claim_then_allocate())
    assert entry_of(store, b"A").copies.keys() == {TierKind.SSD}
    store.pool.close()


# -- namespaces ----------------------------------------------------------------------------------


def test_a_namespace_is_freed_with_its_last_block_and_put() -> None:
    store = make_store()
    for number in range(1000):  # empty puts under new tenants, as the issue sent
        other = Namespace(tenant=f"t{number}", model_fingerprint="m", layout=LAYOUT)
        PutSession(store, other, KIND).abort()
    assert store.pool.num_namespaces == 0
    put(store, b"A")
    assert store.pool.num_namespaces == 1
    # A put that is open keeps its namespace even when the last block goes, so what it
    # commits next lands in the index, not in a forgotten namespace.
    session = PutSession(store, NS, KIND)
    store.delete(NS, [b"A"])
    assert store.pool.num_namespaces == 1
    session.declare(b"B", b"")
    for layer in range(LAYOUT.num_layers):
        data = bytes(LAYOUT.layer_bytes)
        session.write(0, layer, 0, data, checksum(KIND, data))
    assert session.finish() == [PutOutcome.COMMITTED]
    assert present(store, b"B")
    store.delete(NS, [b"B"])
    assert store.pool.num_namespaces == 0


def test_past_the_namespace_limit_a_put_is_refused() -> None:
    store = make_store(max_namespaces=2)
    first, second, third = (
        Namespace(tenant=tenant, model_fingerprint="m", layout=LAYOUT) for tenant in "abc"
    )
    held = [PutSession(store, first, KIND), PutSession(store, second, KIND)]
    with pytest.raises(CapacityExhausted, match="max_namespaces"):
        PutSession(store, third, KIND)
    PutSession(store, first, KIND).abort()  # an existing namespace is not a new one
    held[0].abort()
    PutSession(store, third, KIND).abort()
    held[1].abort()
    assert store.pool.num_namespaces == 0


async def test_a_deep_delete_lets_other_work_run_between_its_steps() -> None:
    """A Delete of a long chain that a pinned tail keeps deletes nothing, yet walks the
    chain: over the daemon's loop it must do so a step at a time."""
    depth = 3 * DELETE_STEP_BLOCKS
    store = make_store(num_pages=depth + 8)
    keys = [f"deep-{index}".encode() for index in range(depth)]
    for index, key in enumerate(keys):
        put(store, key, keys[index - 1] if index else b"")
    store.pin(NS, [keys[-1]], ttl_s=60)
    ticks = 0

    async def other_work() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    result = await store.delete_stepwise(NS, keys[:1])
    ticking.cancel()
    assert (result.num_deleted, result.num_busy) == (0, depth)
    assert ticks >= 4  # walked in three steps, then kept in three more
    # Unpinned, the same delete takes the whole chain, tails first.
    store.unpin(NS, [keys[-1]])
    result = await store.delete_stepwise(NS, keys[:1])
    assert (result.num_deleted, result.num_busy) == (depth, 0)
    assert store.find_prefix(NS, keys) == []


async def test_a_block_evicted_or_given_a_child_between_delete_steps_is_handled() -> None:
    store = make_store(num_pages=DELETE_STEP_BLOCKS * 2 + 8)
    keys = [f"c-{index}".encode() for index in range(DELETE_STEP_BLOCKS + 10)]
    for index, key in enumerate(keys):
        put(store, key, keys[index - 1] if index else b"")
    deleting = asyncio.create_task(store.delete_stepwise(NS, keys[:1]))
    await asyncio.sleep(0)  # the first step walked part of the chain
    put(store, b"late-child", keys[5])  # a child the walk may not have seen
    result = await deleting
    # The blocks below keys[5] went; keys[0..5] stay for the late child, which stays too.
    assert [entry.key for entry in store.find_prefix(NS, [*keys[:6], b"late-child"])] == [
        *keys[:6],
        b"late-child",
    ]
    assert result.num_deleted == len(keys) - 6


def test_a_delete_naming_several_keys_of_one_chain_takes_it_all() -> None:
    store = make_store(num_pages=16)
    keys = [f"k-{index}".encode() for index in range(8)]
    for index, key in enumerate(keys):
        put(store, key, keys[index - 1] if index else b"")
    put(store, b"side", keys[2])
    # Deepest first, shallowest last, a branch between: every one is deleted once.
    result = store.delete(NS, [keys[7], keys[5], b"side", keys[3], keys[1]])
    assert (result.num_deleted, result.num_busy) == (8, 0)
    assert [entry.key for entry in store.find_prefix(NS, keys)] == [keys[0]]
