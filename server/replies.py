"""Reply building: core results into kvstore.v1 reply messages.

The block-carrying GetBlocksResponse is built by kvstore.server.transfer, in parts
that point into the arena; these are the small replies.
"""

from __future__ import annotations

from kvstore.enums import Durability, PutOutcome
from kvstore.events import BlockEvent
from kvstore.server.procstat import ProcessHealth
from kvstore.store import PrefixMatch, StoreReport, TenantReport
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.enums import durability_to_wire, outcome_to_wire, tier_to_wire


def prefix_match_to_wire(match: PrefixMatch) -> pb.LookupPrefixResponse:
    return pb.LookupPrefixResponse(
        num_matched=match.num_matched,
        tier_runs=[
            pb.TierRun(tier=tier_to_wire(kind), num_blocks=count) for kind, count in match.tier_runs
        ],
        block_bytes=match.block_bytes,
        first_is_chain_root=match.first_is_chain_root,
    )


def watch_reply(first_sequence: int, events: list[BlockEvent]) -> pb.WatchBlocksResponse:
    reply = pb.WatchBlocksResponse(first_sequence=first_sequence)
    add = reply.events.add
    for event in events:
        tier = event.tier
        add(
            kind=event.kind.value,  # equal numbers (kvstore.events)
            key=event.key,
            parent_key=event.parent_key,
            tier=tier_to_wire(tier) if tier is not None else pb.TIER_UNSPECIFIED,
        )
    return reply


def put_reply(outcomes: list[PutOutcome], durability: Durability) -> pb.PutBlocksResponse:
    return pb.PutBlocksResponse(
        outcomes=[outcome_to_wire(outcome) for outcome in outcomes],
        num_committed=sum(1 for outcome in outcomes if outcome is PutOutcome.COMMITTED),
        durability=durability_to_wire(durability),
    )


def scoped_to_tenant(full: pb.StatsResponse, tenant: str) -> pb.StatsResponse:
    """What a tenant's Stats may show (see StatsResponse.tenant_scope in the proto)."""
    return pb.StatsResponse(
        tiers=[
            pb.TierStats(
                tier=tier.tier,
                name=tier.name,
                capacity_bytes=tier.capacity_bytes,
                degraded=tier.degraded,
                read_bytes_per_s=tier.read_bytes_per_s,
            )
            for tier in full.tiers
        ],
        tenants=[entry for entry in full.tenants if entry.tenant == tenant],
        uptime_ms=full.uptime_ms,
        write_policy=full.write_policy,
        durability=full.durability,
        data_plane_port=full.data_plane_port,
        tenant_scope=tenant,
    )


def report_to_wire(
    report: StoreReport, process_cpu_s: float, health: ProcessHealth
) -> pb.StatsResponse:
    counters = report.counters
    return pb.StatsResponse(
        tiers=[
            pb.TierStats(
                tier=tier_to_wire(tier.kind),
                name=tier.name,
                capacity_bytes=tier.capacity_bytes,
                used_bytes=tier.used_bytes,
                num_blocks=tier.num_blocks,
                hits=tier.counters.hits,
                misses=tier.counters.misses,
                evictions=tier.counters.evictions,
                promotions=tier.counters.promotions,
                demotions=tier.counters.demotions,
                bytes_read=tier.counters.bytes_read,
                bytes_written=tier.counters.bytes_written,
                errors=tier.counters.errors,
                degraded=tier.degraded,
                read_bytes_per_s=tier.read_bytes_per_s,
            )
            for tier in report.tiers
        ],
        num_namespaces=report.num_namespaces,
        lookups=counters.lookups,
        lookup_keys=counters.lookup_keys,
        lookup_hits=counters.lookup_hits,
        blocks_put=counters.blocks_put,
        blocks_got=counters.blocks_got,
        bytes_put=counters.bytes_put,
        bytes_got=counters.bytes_got,
        puts_abandoned=counters.puts_abandoned,
        checksum_failures=counters.checksum_failures,
        num_pinned=report.num_pinned,
        uptime_ms=int(report.uptime_s * 1000),
        process_cpu_us=int(process_cpu_s * 1e6),
        write_policy=report.write_policy,
        durability=durability_to_wire(report.durability),
        put_reserved_bytes=report.put_reserved_bytes,
        ssd_writes_pending=report.num_ssd_writes,
        rss_bytes=health.rss_bytes,
        open_fds=health.open_fds,
        loop_lag_max_us=int(health.loop_lag.max_s * 1e6),
        loop_lag_p99_us=int(health.loop_lag.p99_s * 1e6),
        loop_lag_max_runqueue_us=int(health.loop_lag.max_runqueue_s * 1e6),
        tenants=[tenant_to_wire(tenant) for tenant in report.tenants],
    )


def tenant_to_wire(tenant: TenantReport) -> pb.TenantStats:
    return pb.TenantStats(
        tenant=tenant.tenant,
        tiers=[
            pb.TenantTierStats(
                tier=tier_to_wire(tier.kind),
                used_bytes=tier.used_bytes,
                num_blocks=tier.num_blocks,
                has_quota=tier.quota_bytes is not None,
                quota_bytes=tier.quota_bytes or 0,
                quota_evictions=tier.num_quota_evictions,
            )
            for tier in tenant.tiers
        ],
        pinned_bytes=tenant.pinned_bytes,
        has_pinned_quota=tenant.pinned_quota_bytes is not None,
        pinned_quota_bytes=tenant.pinned_quota_bytes or 0,
    )
