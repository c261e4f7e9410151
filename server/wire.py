"""Decoding and validation of wire messages into core values, and core values back.

Everything a request carries is checked here or in the core before it touches the
store: missing and unknown fields, enum values, key lengths, layouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.errors import InvalidRequest
from kvstore.store import PrefixMatch, StoreReport
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.enums import tier_to_wire


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """Stands in for a request whose bytes did not parse."""

    message_type: str
    error: str

    def rejection(self) -> InvalidRequest:
        return InvalidRequest(f"malformed {self.message_type}: {self.error}")


def keys_from_wire(keys: Sequence[bytes], max_keys: int, *, allow_empty: bool) -> list[bytes]:
    """The request's keys as a list; the core validates each key (kvstore.keys)."""
    if not keys and not allow_empty:
        raise InvalidRequest("keys is empty; name at least one block key")
    if len(keys) > max_keys:
        raise InvalidRequest(
            f"{len(keys)} keys in one request; the server's limit is {max_keys} (split the request)"
        )
    return list(keys[:])  # slicing a repeated field is the fastest way to a list


def prefix_match_to_wire(match: PrefixMatch) -> pb.LookupPrefixResponse:
    return pb.LookupPrefixResponse(
        num_matched=match.num_matched,
        tier_runs=[
            pb.TierRun(tier=tier_to_wire(kind), num_blocks=count) for kind, count in match.tier_runs
        ],
        block_bytes=match.block_bytes,
    )


def report_to_wire(report: StoreReport, process_cpu_s: float) -> pb.StatsResponse:
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
    )
