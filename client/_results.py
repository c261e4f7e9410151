"""What client calls return."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.enums import Durability, PutOutcome, TierKind


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """The stored prefix of a token sequence's block chain. A miss is `num_matched == 0`."""

    keys: list[bytes]  # keys of every full block of the query
    num_matched: int
    tiers: tuple[TierKind, ...]
    block_tokens: int
    # The server stored `keys[0]` as a chain's first block, not under a parent (False on
    # a miss, and from a server that predates the mark). A cluster client asks this of a
    # tail's parent to place the tail.
    first_is_chain_root: bool = False

    @property
    def matched_keys(self) -> list[bytes]:
        return self.keys[: self.num_matched]

    @property
    def num_matched_tokens(self) -> int:
        return self.num_matched * self.block_tokens


@dataclass(frozen=True, slots=True)
class PutResult:
    outcomes: tuple[PutOutcome, ...]  # one per block sent
    num_skipped: int  # leading blocks not sent because a lookup found them stored
    bytes_sent: int
    # What the COMMITTED blocks survive, at the least, as the server answered; None when
    # nothing was sent or the server predates the field.
    durability: Durability | None = None

    @property
    def num_committed(self) -> int:
        return sum(1 for outcome in self.outcomes if outcome is PutOutcome.COMMITTED)


@dataclass(frozen=True, slots=True)
class LayerArrival:
    """Layer `layer` of every served block, complete and checksum-verified."""

    layer: int
    num_blocks: int
    kv: torch.Tensor  # [num_blocks, 2, block_tokens, num_kv_heads, head_dim] or a view of dest


@dataclass(frozen=True, slots=True)
class TierStats:
    """One tier of the server: its size now, and its counters since the server started."""

    tier: TierKind
    name: str  # "dram", "ssd", "hbm (emulated)", ...
    capacity_bytes: int
    used_bytes: int
    num_blocks: int
    hits: int
    misses: int
    evictions: int
    promotions: int
    demotions: int
    bytes_read: int
    bytes_written: int
    errors: int
    degraded: bool
    # The daemon's read throttle on the tier, bytes/s (summed over a cluster); 0: none.
    read_bytes_per_s: int = 0


@dataclass(frozen=True, slots=True)
class TenantTierStats:
    """One tenant's share of one tier."""

    tier: TierKind
    used_bytes: int  # whole pages, its puts' reservations included
    num_blocks: int
    quota_bytes: int | None  # None: it shares what the tier's quotas leave
    quota_evictions: int  # copies evicted to keep it within its own quota


@dataclass(frozen=True, slots=True)
class TenantStats:
    """One tenant's use of the store and its quotas."""

    tenant: str
    tiers: tuple[TenantTierStats, ...]
    pinned_bytes: int  # block bytes under unexpired leases
    pinned_quota_bytes: int | None


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What `KVClient.stats()` returns: the server's tiers and counters.

    Counters run from the server's start, so the difference of two readings is what
    happened between them.
    """

    tiers: tuple[TierStats, ...]
    num_namespaces: int
    lookups: int
    lookup_keys: int
    lookup_hits: int
    blocks_put: int
    blocks_got: int
    bytes_put: int
    bytes_got: int
    puts_abandoned: int
    checksum_failures: int
    num_pinned: int
    uptime_ms: int
    process_cpu_us: int  # CPU the server process has used, user and system, all threads
    data_plane_port: int  # 0: the server has no data plane
    data_plane_connections: int  # open now
    data_plane_transfers: int  # puts and gets it has carried
    # The daemon process now: resident memory and open file descriptors (0: not known,
    # e.g. no /proc); and how late its event loop woke over the last 10 s, which delays
    # every request it serves: the longest lag and the 99th percentile.
    rss_bytes: int
    open_fds: int
    loop_lag_max_us: int
    loop_lag_p99_us: int
    write_policy: str = ""  # "write-back" or "write-through"; "" from an older server
    # What a COMMITTED put gets when the SSD takes its blocks; None from an older server.
    durability: Durability | None = None
    put_reserved_bytes: int = 0  # DRAM held by puts in flight for blocks not yet committed
    ssd_writes_pending: int = 0  # SSD writes queued or in progress
    tenants: tuple[TenantStats, ...] = ()  # each tenant with blocks, puts or a quota
    # The caller's tenant where the server authenticates and the caller is no admin:
    # then only the tiers' sizes, the policy and the caller's own `tenants` entry are
    # filled, and every store-wide count is 0. "": the whole store.
    tenant_scope: str = ""
    # Of loop_lag_max_us, how long the daemon's loop thread waited for a core (at most
    # all of it: the machine, not the loop); 0 where the kernel does not say, or from an
    # older server.
    loop_lag_max_runqueue_us: int = 0
    # Tenants the server left out of `tenants` to keep the reply within its message
    # limit (`tenants` then holds the first ones by name).
    tenants_omitted: int = 0

    def tier(self, kind: TierKind) -> TierStats:
        """The stats of tier `kind`; KeyError if the server has no such tier."""
        for tier in self.tiers:
            if tier.tier is kind:
                return tier
        raise KeyError(f"the server has no {kind.name} tier")
