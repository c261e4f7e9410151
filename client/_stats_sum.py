"""Many daemons' Stats as one: what a cluster client's `stats()` returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from kvstore.client._results import StoreStats, TenantStats, TenantTierStats, TierStats


def _sum_ints(items: Sequence[Any], skip: set[str]) -> dict[str, int]:
    names = [f.name for f in dataclasses.fields(items[0]) if f.type == "int" and f.name not in skip]
    return {name: sum(getattr(item, name) for item in items) for name in names}


def _grouped(items: Sequence[Any], key: Callable[[Any], Any]) -> dict[Any, list[Any]]:
    groups: dict[Any, list[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _sum_tiers(tiers: Sequence[TierStats]) -> tuple[TierStats, ...]:
    return tuple(
        TierStats(
            tier=kind,
            name=same[0].name,
            degraded=any(tier.degraded for tier in same),
            **_sum_ints(same, set()),
        )
        for kind, same in _grouped(tiers, lambda tier: tier.tier).items()
    )


def _sum_tenant_tiers(tiers: Sequence[TenantTierStats]) -> tuple[TenantTierStats, ...]:
    summed = []
    for kind, same in _grouped(tiers, lambda tier: tier.tier).items():
        quotas = [tier.quota_bytes for tier in same if tier.quota_bytes is not None]
        summed.append(
            TenantTierStats(
                tier=kind,
                used_bytes=sum(tier.used_bytes for tier in same),
                num_blocks=sum(tier.num_blocks for tier in same),
                quota_bytes=sum(quotas) if quotas else None,
                quota_evictions=sum(tier.quota_evictions for tier in same),
            )
        )
    return tuple(summed)


def _sum_tenants(tenants: Sequence[TenantStats]) -> tuple[TenantStats, ...]:
    summed = []
    for name, same in _grouped(tenants, lambda tenant: tenant.tenant).items():
        pinned_quotas = [t.pinned_quota_bytes for t in same if t.pinned_quota_bytes is not None]
        summed.append(
            TenantStats(
                tenant=name,
                tiers=_sum_tenant_tiers([tier for tenant in same for tier in tenant.tiers]),
                pinned_bytes=sum(tenant.pinned_bytes for tenant in same),
                pinned_quota_bytes=sum(pinned_quotas) if pinned_quotas else None,
            )
        )
    return tuple(summed)


def sum_store_stats(members: Sequence[StoreStats]) -> StoreStats:
    """Sizes and counters summed over members (quotas too: each member enforces its own);
    the worst loop lag; the youngest uptime; the weakest durability. `data_plane_port` is
    0, since each member has its own."""
    assert members, "no member's Stats to sum"
    policies = sorted({stats.write_policy for stats in members if stats.write_policy})
    durabilities = [stats.durability for stats in members if stats.durability is not None]
    special = {
        "uptime_ms",
        "data_plane_port",
        "loop_lag_max_us",
        "loop_lag_p99_us",
        "loop_lag_max_runqueue_us",
        "tenants_omitted",
    }
    # The longest lag is one member's: so is the wait for a core within it.
    worst = max(members, key=lambda stats: stats.loop_lag_max_us)
    return StoreStats(
        tiers=_sum_tiers([tier for stats in members for tier in stats.tiers]),
        tenants=_sum_tenants([tenant for stats in members for tenant in stats.tenants]),
        uptime_ms=min(stats.uptime_ms for stats in members),
        data_plane_port=0,
        loop_lag_max_us=max(stats.loop_lag_max_us for stats in members),
        loop_lag_p99_us=max(stats.loop_lag_p99_us for stats in members),
        loop_lag_max_runqueue_us=worst.loop_lag_max_runqueue_us,
        write_policy=",".join(policies),
        durability=min(durabilities) if durabilities else None,
        tenant_scope=members[0].tenant_scope,
        # Members list the same tenants by name: the most any one left out.
        tenants_omitted=max(stats.tenants_omitted for stats in members),
        **_sum_ints(members, special),
    )
