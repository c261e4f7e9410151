"""The server's replies into the client's result types (kvstore.client._results).

A reply that names an enum number this client does not know raises ProtocolError.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain, repeat

from kvstore.client._errors import ProtocolError, protocol_error
from kvstore.client._results import (
    PrefixMatch,
    PutResult,
    StoreStats,
    TenantStats,
    TenantTierStats,
    TierStats,
)
from kvstore.enums import TierKind
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.enums import durability_from_wire, outcome_from_wire, tier_from_wire
from kvstore.wire.errors import WireError


def prefix_match(
    reply: pb.LookupPrefixResponse, keys: list[bytes], block_tokens: int
) -> PrefixMatch:
    # Checked before anything is sized from them: a reply is the server's word.
    if reply.num_matched > len(keys):
        raise protocol_error(
            WireError(f"{reply.num_matched} blocks matched of the {len(keys)} keys looked up")
        )
    if sum(run.num_blocks for run in reply.tier_runs) > reply.num_matched:
        raise protocol_error(WireError("tier runs cover more blocks than matched"))
    try:
        tiers = _expand_tier_runs(reply.tier_runs)
    except WireError as error:
        raise protocol_error(error) from error
    return PrefixMatch(
        keys=keys,
        num_matched=reply.num_matched,
        tiers=tiers,
        block_tokens=block_tokens,
        first_is_chain_root=reply.num_matched > 0 and reply.first_is_chain_root,
    )


def put_result(
    reply: pb.PutBlocksResponse, num_skipped: int, bytes_sent: int, num_sent: int
) -> PutResult:
    """The result of a put that sent `num_sent` blocks: one outcome each, or ProtocolError."""
    if len(reply.outcomes) != num_sent:
        raise ProtocolError(
            f"the server answered a put of {num_sent} blocks with {len(reply.outcomes)} outcomes"
        )
    try:
        outcomes = tuple(outcome_from_wire(number) for number in reply.outcomes)
        durability = durability_from_wire(reply.durability)
    except WireError as error:
        raise protocol_error(error) from error
    return PutResult(
        outcomes=outcomes, num_skipped=num_skipped, bytes_sent=bytes_sent, durability=durability
    )


def store_stats(reply: pb.StatsResponse) -> StoreStats:
    try:
        tiers = tuple(_tier_stats(tier) for tier in reply.tiers)
        tenants = tuple(_tenant_stats(entry) for entry in reply.tenants)
        durability = durability_from_wire(reply.durability)
    except WireError as error:
        raise protocol_error(error) from error
    return StoreStats(
        tiers=tiers,
        num_namespaces=reply.num_namespaces,
        lookups=reply.lookups,
        lookup_keys=reply.lookup_keys,
        lookup_hits=reply.lookup_hits,
        blocks_put=reply.blocks_put,
        blocks_got=reply.blocks_got,
        bytes_put=reply.bytes_put,
        bytes_got=reply.bytes_got,
        puts_abandoned=reply.puts_abandoned,
        checksum_failures=reply.checksum_failures,
        num_pinned=reply.num_pinned,
        uptime_ms=reply.uptime_ms,
        process_cpu_us=reply.process_cpu_us,
        data_plane_port=reply.data_plane_port,
        data_plane_connections=reply.data_plane_connections,
        data_plane_transfers=reply.data_plane_transfers,
        write_policy=reply.write_policy,
        durability=durability,
        put_reserved_bytes=reply.put_reserved_bytes,
        ssd_writes_pending=reply.ssd_writes_pending,
        rss_bytes=reply.rss_bytes,
        open_fds=reply.open_fds,
        loop_lag_max_us=reply.loop_lag_max_us,
        loop_lag_p99_us=reply.loop_lag_p99_us,
        loop_lag_max_runqueue_us=reply.loop_lag_max_runqueue_us,
        tenants_omitted=reply.tenants_omitted,
        tenants=tenants,
        tenant_scope=reply.tenant_scope,
    )


def _tenant_stats(entry: pb.TenantStats) -> TenantStats:
    return TenantStats(
        tenant=entry.tenant,
        tiers=tuple(
            TenantTierStats(
                tier=tier_from_wire(tier.tier),
                used_bytes=tier.used_bytes,
                num_blocks=tier.num_blocks,
                quota_bytes=tier.quota_bytes if tier.has_quota else None,
                quota_evictions=tier.quota_evictions,
            )
            for tier in entry.tiers
        ),
        pinned_bytes=entry.pinned_bytes,
        pinned_quota_bytes=entry.pinned_quota_bytes if entry.has_pinned_quota else None,
    )


def _tier_stats(tier: pb.TierStats) -> TierStats:
    return TierStats(
        tier=tier_from_wire(tier.tier),
        name=tier.name,
        capacity_bytes=tier.capacity_bytes,
        used_bytes=tier.used_bytes,
        num_blocks=tier.num_blocks,
        hits=tier.hits,
        misses=tier.misses,
        evictions=tier.evictions,
        promotions=tier.promotions,
        demotions=tier.demotions,
        bytes_read=tier.bytes_read,
        bytes_written=tier.bytes_written,
        errors=tier.errors,
        degraded=tier.degraded,
        read_bytes_per_s=tier.read_bytes_per_s,
    )


def _expand_tier_runs(runs: Iterable[pb.TierRun]) -> tuple[TierKind, ...]:
    return tuple(
        chain.from_iterable(repeat(tier_from_wire(run.tier), run.num_blocks) for run in runs)
    )
