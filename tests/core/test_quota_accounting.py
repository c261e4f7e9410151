"""Per-tenant accounting (kvstore.census.TenantUsage) against a brute-force recount after
every step of the seeded model run of tests/core/test_census.py, with quotas: the
footprint and blocks of each tenant in each tier, its put reservations, its leased
bytes, the shared space's footprint; and the quotas hold after every step.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from test_census import PAGE_BYTES, STEPS, FrozenClock, Model, clock  # noqa: F401

from kvstore.census import TenantUsage
from kvstore.config import TenantQuota
from kvstore.enums import TierKind
from kvstore.errors import CapacityExhausted
from kvstore.store import BlockStore
from kvstore.tiers.ssd import SsdLocation

Usage = dict[str, Any]


def recount(store: BlockStore, model: Model, now: float) -> dict[str, Usage]:
    """Every tenant's usage counted from scratch over the indexed entries and open puts."""
    pool = store.pool
    counted: dict[str, Usage] = {}

    def usage_of(tenant: str) -> Usage:
        return counted.setdefault(
            tenant,
            {
                "stored": dict.fromkeys(TierKind, 0),
                "reserved": dict.fromkeys(TierKind, 0),
                "blocks": dict.fromkeys(TierKind, 0),
                "leased": 0,
            },
        )

    for tenant in store.config.quotas:
        usage_of(tenant)
    for entry in pool.entries():
        usage = usage_of(entry.namespace.namespace.tenant)
        for kind, handle in entry.copies.items():
            usage["blocks"][kind] += 1
            if isinstance(handle, SsdLocation):
                usage["stored"][kind] += handle.nbytes
            else:
                usage["stored"][kind] += pool.memory_tier(kind).footprint_bytes(
                    entry.layout.block_bytes
                )
        if entry.lease_expiry > now:
            usage["leased"] += entry.layout.block_bytes
    for put in model.puts:
        usage = usage_of(put.namespace.tenant)
        started = sum(1 for block in put.session._blocks if block.handle is not None)
        usage["reserved"][TierKind.DRAM] += started * pool.dram.footprint_bytes(
            put.namespace.layout.block_bytes
        )
        # A put's namespace lives (and so its tenant) even before it stores a block.
    for state_tenant in {put.namespace.tenant for put in model.puts}:
        usage_of(state_tenant)
    return counted


def reported(usage: TenantUsage) -> Usage:
    return {
        "stored": dict(usage.stored_bytes),
        "reserved": dict(usage.reserved_bytes),
        "blocks": dict(usage.num_blocks),
        "leased": usage.leased_bytes,
    }


def check(model: Model, now: float, step: str) -> None:
    store = model.store
    pool = store.pool
    expected = recount(store, model, now)
    got = {usage.tenant: reported(usage) for usage in pool.tenant_usages()}
    assert got == expected, step
    for kind in store.tier_kinds:
        shared = sum(
            usage["stored"][kind] + usage["reserved"][kind]
            for tenant, usage in expected.items()
            if (quota := store.config.quotas.get(tenant)) is None or quota.tier_bytes(kind) is None
        )
        assert pool.group_used_bytes(kind, "") == shared, step
        # The quotas hold: no group is ever past its limit.
        for group, used, limit in pool.groups(kind):
            assert used <= limit, f"{step}: {group or 'shared'} {kind.name} {used} > {limit}"


class QuotaModel(Model):
    async def pin(self) -> None:
        try:
            await super().pin()
        except CapacityExhausted as error:
            self.seen["pin_refused"] += "pinned_bytes quota" in str(error)

    async def close(self) -> None:
        for usage in self.store.pool.tenant_usages():
            if usage.quota is not None:
                self.seen["quota_evictions"] += sum(usage.num_quota_evictions.values())
        await super().close()


@pytest.mark.parametrize(
    ("seed", "policy"),
    [
        (3, {"write_policy": "write-back", "hbm_bytes": 4 * PAGE_BYTES, "hbm_device": "cpu"}),
        (4, {"write_policy": "write-through", "eviction_policy": "session"}),
    ],
)
async def test_tenant_usage_matches_a_brute_force_count_after_every_step(
    tmp_path: Path,
    clock: FrozenClock,  # noqa: F811
    seed: int,
    policy: dict[str, Any],
) -> None:
    hbm = {"hbm_bytes": 2 * PAGE_BYTES} if "hbm_bytes" in policy else {}
    quotas = {
        "t0": TenantQuota(dram_bytes=4 * PAGE_BYTES, ssd_bytes=12 * 1024, **hbm),
        "t2": TenantQuota(dram_bytes=3 * PAGE_BYTES, pinned_bytes=2 * PAGE_BYTES, max_lease_s=1),
    }
    settings: dict[str, Any] = {
        "dram_bytes": 12 * PAGE_BYTES,
        "page_bytes": PAGE_BYTES,
        "ssd_dir": str(tmp_path / "ssd"),
        "ssd_bytes": 40 * 1024,
        "max_lease_s": 5.0,
        "high_watermark": 0.8,
        "low_watermark": 0.5,
        "quotas": quotas,
        **policy,
    }
    model = QuotaModel(random.Random(seed), clock, tmp_path / "ssd", settings)
    model.start()
    names, weights = list(STEPS), list(STEPS.values())
    try:
        for number in range(1500):
            step = model.rng.choices(names, weights)[0]
            await getattr(model, step)()
            model.seen[step] += 1
            check(model, clock.now, f"step {number}: {step}")
    finally:
        await model.close()
    print(dict(model.seen))
    # Quoted tenants evicted their own blocks to stay within their quotas, and a pin
    # past the pinned quota was refused.
    reached = ["pin_refused", "namespace_freed", "quota_evictions", "restored"]
    assert all(model.seen[name] for name in reached), model.seen
