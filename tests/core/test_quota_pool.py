"""Hard per-tenant quotas in the pool (kvstore.pool): tenant-scoped eviction, the shared
space, RESOURCE_EXHAUSTED messages that name the quota, pinned bytes and leases."""

from __future__ import annotations

import hashlib
import time

import pytest

from kvstore.checksum import ChecksumKind, checksum
from kvstore.config import StoreConfig, TenantQuota
from kvstore.enums import PutOutcome, TierKind
from kvstore.errors import CapacityExhausted, InvalidRequest
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.put import PutSession
from kvstore.store import BlockStore

PAGE_BYTES = 512
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
KIND = ChecksumKind.XXH3_64
A, B, C = (Namespace(tenant=name, model_fingerprint="m", layout=LAYOUT) for name in "abc")


def make_store(num_pages: int = 12, **quotas: TenantQuota) -> BlockStore:
    assert LAYOUT.block_bytes == PAGE_BYTES
    return BlockStore(
        StoreConfig(dram_bytes=num_pages * PAGE_BYTES, page_bytes=PAGE_BYTES, quotas=quotas)
    )


def put(store: BlockStore, namespace: Namespace, key: bytes) -> None:
    session = PutSession(store, namespace, KIND)
    try:
        session.declare(key, b"")
        for layer in range(LAYOUT.num_layers):
            data = hashlib.sha256(key + bytes([layer])).digest() * (LAYOUT.layer_bytes // 32)
            session.write(0, layer, 0, data, checksum(KIND, data))
        assert session.finish() == [PutOutcome.COMMITTED]
    finally:
        session.abort()


def keys_of(store: BlockStore, namespace: Namespace) -> set[bytes]:
    state = store.pool.find_namespace(namespace)
    return set(state.blocks) if state is not None else set()


def pages(count: int) -> TenantQuota:
    return TenantQuota(dram_bytes=count * PAGE_BYTES)


def test_a_tenant_over_its_quota_evicts_only_its_own_blocks_in_lru_order() -> None:
    store = make_store(a=pages(4), b=pages(4))
    for key in (b"a1", b"a2", b"a3", b"a4"):
        put(store, A, key)
    for key in (b"b1", b"b2"):
        put(store, B, key)
    put(store, C, b"c1")
    store.lookup(A, [b"a1"])  # LRU order of a: a2, a3, a4, a1
    evicted = []
    for key in (b"a5", b"a6"):
        before = keys_of(store, A)
        put(store, A, key)
        evicted.extend(sorted(before - keys_of(store, A)))
    assert evicted == [b"a2", b"a3"]
    assert keys_of(store, B) == {b"b1", b"b2"}
    assert keys_of(store, C) == {b"c1"}
    usage = store.pool.tenant_usage("a")
    assert usage is not None
    assert usage.used_bytes(TierKind.DRAM) == 4 * PAGE_BYTES
    assert usage.num_quota_evictions[TierKind.DRAM] == 2
    # DRAM has free pages all along: the quota, not the tier, made a evict.
    assert store.dram.free_bytes >= 4 * PAGE_BYTES


def test_over_quota_with_nothing_evictable_names_the_quota_and_evicts_nothing() -> None:
    store = make_store(a=pages(2))
    put(store, A, b"a1")
    put(store, A, b"a2")
    put(store, B, b"b1")
    store.pin(A, [b"a1", b"a2"], ttl_s=60)
    with pytest.raises(CapacityExhausted) as raised:
        put(store, A, b"a3")
    assert str(raised.value).startswith(
        "tenant 'a' is at its DRAM quota (1.0 KiB, 1.0 KiB used, 0 B evictable): "
    )
    assert "quotas.a.dram_bytes" in str(raised.value)
    assert keys_of(store, A) == {b"a1", b"a2"}
    assert keys_of(store, B) == {b"b1"}
    assert store.dram.counters.evictions == 0


def test_unquoted_tenants_share_what_the_quotas_leave_and_evict_each_other_only() -> None:
    store = make_store(num_pages=8, a=pages(4))  # b and c share 4 pages
    put(store, A, b"a1")
    for key in (b"b1", b"b2"):
        put(store, B, key)
    for key in (b"c1", b"c2"):
        put(store, C, key)
    put(store, C, b"c3")  # the shared space is full: b's least recent block goes
    assert keys_of(store, B) == {b"b2"}
    assert keys_of(store, C) == {b"c1", b"c2", b"c3"}
    store.lookup(B, [b"b2"])
    put(store, B, b"b3")  # then c's least recent block
    assert keys_of(store, C) == {b"c2", b"c3"}
    assert keys_of(store, B) == {b"b2", b"b3"}
    # a's block stays, and a still has 3 free pages of its own, though DRAM has 0 free
    # pages for the tenants without a quota.
    assert keys_of(store, A) == {b"a1"}
    for key in (b"a2", b"a3", b"a4"):
        put(store, A, key)
    assert keys_of(store, A) == {b"a1", b"a2", b"a3", b"a4"}
    assert len(keys_of(store, B) | keys_of(store, C)) == 4


def test_the_shared_space_full_of_pinned_blocks_names_the_shared_space() -> None:
    store = make_store(num_pages=4, a=pages(2))
    put(store, B, b"b1")
    put(store, C, b"c1")
    store.pin(B, [b"b1"], ttl_s=60)
    store.pin(C, [b"c1"], ttl_s=60)
    with pytest.raises(CapacityExhausted, match=r"tenants without a DRAM quota share 1\.0 KiB"):
        put(store, B, b"b2")
    put(store, A, b"a1")  # a's own room is untouched
    assert keys_of(store, A) == {b"a1"}


def test_a_quoted_tenant_within_its_quota_never_evicts_for_others() -> None:
    store = make_store(num_pages=6, a=pages(3), b=pages(3))
    for key in (b"a1", b"a2", b"a3"):
        put(store, A, key)
    for key in (b"b1", b"b2", b"b3", b"b4", b"b5"):
        put(store, B, key)
    assert keys_of(store, A) == {b"a1", b"a2", b"a3"}
    assert keys_of(store, B) == {b"b3", b"b4", b"b5"}
    with pytest.raises(CapacityExhausted, match="tenants without a DRAM quota share 0 B"):
        put(store, C, b"c1")
    assert keys_of(store, A) == {b"a1", b"a2", b"a3"}


def test_a_pin_past_the_pinned_quota_pins_nothing() -> None:
    store = make_store(a=TenantQuota(pinned_bytes=2 * PAGE_BYTES))
    for key in (b"a1", b"a2", b"a3"):
        put(store, A, key)
    assert store.pin(A, [b"a1", b"a2"], ttl_s=60)[0] == 2
    assert store.pin(A, [b"a1", b"a2"], ttl_s=60)[0] == 2  # re-leasing adds no bytes
    with pytest.raises(CapacityExhausted) as raised:
        store.pin(A, [b"a3"], ttl_s=60)
    assert "tenant 'a' is at its pinned_bytes quota (1.0 KiB, 1.0 KiB leased)" in str(raised.value)
    assert store.pool.find_prefix(A, [b"a3"])[0].lease_expiry == 0.0
    assert store.unpin(A, [b"a1"]) == 1
    assert store.pin(A, [b"a3"], ttl_s=60)[0] == 1
    # Another tenant's pins do not count against a's quota.
    put(store, B, b"b1")
    assert store.pin(B, [b"b1"], ttl_s=60)[0] == 1


def test_a_tenant_lease_is_cut_to_its_max_lease_s() -> None:
    store = make_store(a=TenantQuota(max_lease_s=2.0))
    put(store, A, b"a1")
    put(store, B, b"b1")
    _, expiry = store.pin(A, [b"a1"], ttl_s=600)
    assert expiry - time.time() <= 2.0
    entry = store.pool.find_prefix(A, [b"a1"])[0]
    assert entry.lease_expiry - time.monotonic() <= 2.0
    _, expiry = store.pin(B, [b"b1"], ttl_s=600)  # b has the store's 3,600 s
    assert expiry - time.time() > 500


def test_tenant_accounting_is_freed_with_its_last_namespace_unless_quoted() -> None:
    store = make_store(a=pages(2))
    put(store, A, b"a1")
    put(store, B, b"b1")
    assert [usage.tenant for usage in store.pool.tenant_usages()] == ["a", "b"]
    store.delete(A, [b"a1"])
    store.delete(B, [b"b1"])
    assert [usage.tenant for usage in store.pool.tenant_usages()] == ["a"]
    assert store.pool.group_used_bytes(TierKind.DRAM, "") == 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"quotas": {"a": TenantQuota(hbm_bytes=PAGE_BYTES)}}, "no HBM tier"),
        ({"quotas": {"a": TenantQuota(ssd_bytes=PAGE_BYTES)}}, "no SSD tier"),
        (
            {"quotas": {"a": pages(8), "b": pages(5)}},
            r"dram_bytes quotas of \['a', 'b'\] add up to 6.5 KiB, more than the DRAM "
            r"tier's 6.0 KiB",
        ),
    ],
)
def test_bad_quotas_are_refused_at_start(settings: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        StoreConfig(dram_bytes=12 * PAGE_BYTES, page_bytes=PAGE_BYTES, **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dram_bytes": -1}, "quota dram_bytes must be >= 0, got -1"),
        ({"pinned_bytes": -5}, "quota pinned_bytes must be >= 0"),
        ({"max_lease_s": 0}, "quota max_lease_s must be > 0"),
    ],
)
def test_bad_quota_values_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        TenantQuota(**fields)  # type: ignore[arg-type]
