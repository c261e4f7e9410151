"""The store's report (`BlockStore.report`: its counters and the census) as Prometheus
metric families, read at scrape time.

Nothing here counts: every number is one the store already keeps for Stats, so the hot
paths pay nothing for metrics being on. A report costs O(tiers + tenants), whatever the
number of blocks (kvstore.census). Counters are the store's own cumulative counts since
start-up; a restart begins them at 0 again, which Prometheus's `rate` takes as a reset.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvstore.enums import TierKind
from kvstore.store import StoreReport, TenantReport, TierReport

__all__ = ["store_families", "tenant_families", "tier_label"]


def tier_label(kind: TierKind) -> str:
    """A tier's `tier` label: hbm, dram or ssd."""
    return kind.name.lower()


# (metric name without _total, help, TierCounters field); every one a counter per tier.
_TIER_COUNTERS = (
    ("kvstore_tier_hits", "Looked-up blocks whose fastest copy was in this tier.", "hits"),
    (
        "kvstore_tier_misses",
        "Looked-up blocks (and lookups that missed) not found in this tier, counted in each "
        "tier faster than the one that held them.",
        "misses",
    ),
    ("kvstore_tier_evictions", "Copies dropped from this tier to make room.", "evictions"),
    ("kvstore_tier_promotions", "Copies made into this tier from a slower one.", "promotions"),
    ("kvstore_tier_demotions", "Copies moved from this tier to a slower one.", "demotions"),
    ("kvstore_tier_read_bytes", "Bytes read from this tier.", "bytes_read"),
    ("kvstore_tier_written_bytes", "Bytes written into this tier.", "bytes_written"),
    ("kvstore_tier_errors", "I/O errors of this tier.", "errors"),
)


def store_families(report: StoreReport) -> Iterator[Metric]:
    """Per-tier sizes and counters, and the store-wide counters and gauges."""
    yield from _tier_families(report.tiers)
    counters = report.counters
    for name, documentation, value in (
        ("kvstore_lookups", "LookupPrefix requests answered.", counters.lookups),
        ("kvstore_lookup_keys", "Keys asked for by lookups.", counters.lookup_keys),
        (
            "kvstore_lookup_hits",
            "Keys found by lookups (the matched prefixes).",
            counters.lookup_hits,
        ),
        ("kvstore_blocks_put", "Blocks committed by puts.", counters.blocks_put),
        ("kvstore_block_bytes_put", "Block bytes committed by puts.", counters.bytes_put),
        ("kvstore_blocks_got", "Blocks sent by gets.", counters.blocks_got),
        ("kvstore_block_bytes_got", "Block bytes sent by gets.", counters.bytes_got),
        ("kvstore_puts_abandoned", "Puts that ended before finishing.", counters.puts_abandoned),
        (
            "kvstore_checksum_failures",
            "Blocks whose checksum did not match (refused puts, dropped copies).",
            counters.checksum_failures,
        ),
    ):
        yield CounterMetricFamily(name, documentation, value=value)
    for name, documentation, gauge in (
        ("kvstore_namespaces", "Namespaces holding blocks or puts.", report.num_namespaces),
        ("kvstore_pinned_blocks", "Blocks read-pinned or leased now.", report.num_pinned),
        (
            "kvstore_put_reserved_bytes",
            "DRAM reserved by puts for blocks not yet complete.",
            report.put_reserved_bytes,
        ),
        (
            "kvstore_ssd_writes_pending",
            "SSD writes queued or running (write-back demotions, write-through copies).",
            report.num_ssd_writes,
        ),
        ("kvstore_uptime_seconds", "Seconds since the store started.", report.uptime_s),
    ):
        yield GaugeMetricFamily(name, documentation, value=gauge)
    info = GaugeMetricFamily(
        "kvstore_store_info",
        "Always 1; the labels say the write policy and what a COMMITTED put promises.",
        labels=["write_policy", "durability"],
    )
    durability = report.durability.name.removeprefix("DURABLE_").lower()  # in_memory, on_ssd...
    info.add_metric([report.write_policy, durability], 1)
    yield info


def _tier_families(tiers: tuple[TierReport, ...]) -> Iterator[Metric]:
    labels = ["tier"]
    capacity = GaugeMetricFamily(
        "kvstore_tier_capacity_bytes", "Bytes the tier may hold.", labels=labels
    )
    used = GaugeMetricFamily(
        "kvstore_tier_used_bytes",
        "Bytes the tier holds now (whole pages in DRAM and HBM), reservations included.",
        labels=labels,
    )
    blocks = GaugeMetricFamily(
        "kvstore_tier_blocks", "Indexed blocks with a copy in the tier.", labels=labels
    )
    read_limit = GaugeMetricFamily(
        "kvstore_tier_read_limit_bytes_per_second",
        "The tier's configured read throttle (`[store] read_bytes_per_s`); 0: none.",
        labels=labels,
    )
    degraded = GaugeMetricFamily(
        "kvstore_tier_degraded",
        "1 while the tier is degraded (an SSD that failed writes and is skipped), else 0.",
        labels=labels,
    )
    counters = [
        CounterMetricFamily(name, documentation, labels=labels)
        for name, documentation, _ in _TIER_COUNTERS
    ]
    for tier in tiers:
        label = [tier_label(tier.kind)]
        capacity.add_metric(label, tier.capacity_bytes)
        used.add_metric(label, tier.used_bytes)
        blocks.add_metric(label, tier.num_blocks)
        degraded.add_metric(label, int(tier.degraded))
        read_limit.add_metric(label, tier.read_bytes_per_s)
        for family, (_, _, field) in zip(counters, _TIER_COUNTERS, strict=True):
            family.add_metric(label, getattr(tier.counters, field))
    yield from (capacity, used, blocks, degraded, read_limit, *counters)


def tenant_families(tenants: tuple[TenantReport, ...]) -> Iterator[Metric]:
    """Each tenant's footprint, quotas and lookups: one series per tenant (and tier).

    A tenant appears while it has a namespace or a quota, so the number of series is
    bounded by the store's `max_namespaces` and the quotas configured.
    """
    used = GaugeMetricFamily(
        "kvstore_tenant_used_bytes",
        "The tenant's footprint in the tier, its puts' reservations included.",
        labels=["tenant", "tier"],
    )
    blocks = GaugeMetricFamily(
        "kvstore_tenant_blocks",
        "The tenant's blocks with a copy in the tier.",
        labels=["tenant", "tier"],
    )
    quota = GaugeMetricFamily(
        "kvstore_tenant_quota_bytes",
        "The tenant's quota on the tier (no series: it shares what the quotas leave).",
        labels=["tenant", "tier"],
    )
    quota_evictions = CounterMetricFamily(
        "kvstore_tenant_quota_evictions",
        "The tenant's copies evicted to keep it within its own quota on the tier.",
        labels=["tenant", "tier"],
    )
    pinned = GaugeMetricFamily(
        "kvstore_tenant_pinned_bytes",
        "Block bytes the tenant holds under leases.",
        labels=["tenant"],
    )
    lookup_keys = CounterMetricFamily(
        "kvstore_tenant_lookup_keys", "Keys the tenant's lookups asked for.", labels=["tenant"]
    )
    lookup_hits = CounterMetricFamily(
        "kvstore_tenant_lookup_hits", "Keys the tenant's lookups found.", labels=["tenant"]
    )
    for tenant in tenants:
        for tier in tenant.tiers:
            label = [tenant.tenant, tier_label(tier.kind)]
            used.add_metric(label, tier.used_bytes)
            blocks.add_metric(label, tier.num_blocks)
            quota_evictions.add_metric(label, tier.num_quota_evictions)
            if tier.quota_bytes is not None:
                quota.add_metric(label, tier.quota_bytes)
        pinned.add_metric([tenant.tenant], tenant.pinned_bytes)
        lookup_keys.add_metric([tenant.tenant], tenant.lookup_keys)
        lookup_hits.add_metric([tenant.tenant], tenant.lookup_hits)
    yield from (used, blocks, quota, quota_evictions, pinned, lookup_keys, lookup_hits)
