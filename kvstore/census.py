"""BlockCensus: the counts Stats reports, kept as blocks change instead of counted per report.

A report then costs O(tiers), not O(blocks): with a million blocks, counting them on the
event loop at every Stats call would stall every lookup behind it. Quotas read the same
counts on every allocation, so they too cost O(1) per change.

What it counts, over the indexed entries (those between `BlockIndex.insert` and
`BlockIndex.remove`, which set and clear `entry.path`):
- per tier, the entries with a copy there;
- the entries pinned now: read pins (counted as they start and end) plus leases not yet
  expired. A lease ends by the clock, with no call to say so: leased entries sit in a
  heap by expiry, pruned lazily whenever the count is read or a lease changes;
- per tenant (TenantUsage): per tier its copies and their footprint plus the room it has
  reserved there (a put's DRAM, an SSD write's file), and the block bytes it holds
  under unexpired leases; and, per tier, the footprint of the tenants without a quota
  on that tier (the shared space).
A tenant's usage exists while one of its namespaces does, or while it has a quota.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvstore.enums import TierKind

if TYPE_CHECKING:
    from kvstore.config import TenantQuota
    from kvstore.index import BlockEntry

__all__ = ["SHARED", "BlockCensus", "CopyBytes", "TenantUsage"]

# The heap keeps one item per lease extension; past this many stale items per live
# lease (plus a floor) it is rebuilt from the live ones, so it stays O(leased entries).
_HEAP_SLACK = 2
_HEAP_FLOOR = 64

# The eviction group of tenants without a quota on a tier (tenant names are non-empty).
SHARED = ""

# A copy's footprint in its tier: (tier, handle, block bytes) -> bytes.
CopyBytes = Callable[[TierKind, object, int], int]


def _block_bytes(kind: TierKind, handle: object, block_bytes: int) -> int:
    return block_bytes


@dataclass(slots=True, eq=False)
class TenantUsage:
    """One tenant's share of the store, kept exact by BlockCensus."""

    tenant: str
    quota: TenantQuota | None = None
    # The tiers on which the tenant has a quota: its own eviction group there.
    quoted: frozenset[TierKind] = frozenset()
    stored_bytes: dict[TierKind, int] = field(default_factory=lambda: dict.fromkeys(TierKind, 0))
    reserved_bytes: dict[TierKind, int] = field(default_factory=lambda: dict.fromkeys(TierKind, 0))
    num_blocks: dict[TierKind, int] = field(default_factory=lambda: dict.fromkeys(TierKind, 0))
    leased_bytes: int = 0
    # Copies evicted (not moved down) to keep the tenant within its own quota, per tier.
    num_quota_evictions: dict[TierKind, int] = field(
        default_factory=lambda: dict.fromkeys(TierKind, 0)
    )
    num_namespaces: int = 0
    # Keys its lookups asked for and found (counted by BlockStore.lookup); they restart
    # at 0 if the tenant leaves the store (no namespace, no quota) and comes back.
    lookup_keys: int = 0
    lookup_hits: int = 0

    def used_bytes(self, kind: TierKind) -> int:
        """Footprint in `kind`'s tier: its copies plus the room it has reserved there."""
        return self.stored_bytes[kind] + self.reserved_bytes[kind]

    def group(self, kind: TierKind) -> str:
        """The eviction group of its blocks in `kind`: itself if quoted there, else SHARED."""
        return self.tenant if kind in self.quoted else SHARED

    def is_idle(self) -> bool:
        return not (
            any(self.stored_bytes.values())
            or any(self.reserved_bytes.values())
            or any(self.num_blocks.values())
            or self.leased_bytes
        )


class BlockCensus:
    """Counts of indexed blocks per tier and of pinned blocks, for `BlockStore.report`.

    Callers tell it every change to an indexed entry's copies, read pins and lease; it
    ignores entries that are not indexed, so a call need not check.
    """

    def __init__(self, copy_bytes: CopyBytes = _block_bytes) -> None:
        self._copy_bytes = copy_bytes
        self._num_blocks: dict[TierKind, int] = dict.fromkeys(TierKind, 0)
        self._num_read_pinned = 0
        # Indexed entries whose lease had not expired when last pruned, read-pinned or not.
        # Invariant: each has a heap item whose expiry is its current lease_expiry.
        self._leased: set[BlockEntry] = set()
        # Of those, the ones with a read pin (counted once, as read-pinned, in num_pinned).
        self._num_leased_read_pinned = 0
        self._tenants: dict[str, TenantUsage] = {}
        # Footprint per tier of the tenants without a quota on it.
        self._shared_bytes: dict[TierKind, int] = dict.fromkeys(TierKind, 0)
        # (expiry, tie-break, entry); items of leases since extended or ended are stale.
        self._expiries: list[tuple[float, int, BlockEntry]] = []
        self._tie_breaks = itertools.count()

    def num_blocks(self, kind: TierKind) -> int:
        """Indexed blocks with a copy in `kind`'s tier."""
        return self._num_blocks[kind]

    def num_pinned(self, now: float) -> int:
        """Indexed blocks pinned at monotonic time `now`: read pins or unexpired leases."""
        self._prune(now)
        return self._num_read_pinned + len(self._leased) - self._num_leased_read_pinned

    # -- tenants --------------------------------------------------------------------------

    def set_quota(self, tenant: str, quota: TenantQuota) -> None:
        """Give `tenant` its quota (at start-up, before any of its blocks is indexed)."""
        usage = self._tenants.setdefault(tenant, TenantUsage(tenant))
        assert usage.is_idle(), "quotas are set before blocks are indexed"
        usage.quota = quota
        usage.quoted = frozenset(kind for kind in TierKind if quota.tier_bytes(kind) is not None)

    def open_tenant(self, tenant: str) -> TenantUsage:
        """The tenant's usage, for a namespace of it just created (see `close_tenant`)."""
        usage = self._tenants.get(tenant)
        if usage is None:
            usage = self._tenants[tenant] = TenantUsage(tenant)
        usage.num_namespaces += 1
        return usage

    def close_tenant(self, usage: TenantUsage) -> None:
        """A namespace of the tenant was freed; its usage goes with its last one, unless
        it has a quota."""
        usage.num_namespaces -= 1
        if usage.num_namespaces == 0 and usage.quota is None:
            assert usage.is_idle(), f"tenant {usage.tenant!r} has no namespace but holds bytes"
            del self._tenants[usage.tenant]

    def tenant(self, tenant: str) -> TenantUsage | None:
        return self._tenants.get(tenant)

    def tenant_now(self, tenant: str, now: float) -> TenantUsage | None:
        """`tenant`'s usage with leases pruned at `now`, as `tenants` gives it."""
        self._prune(now)
        return self._tenants.get(tenant)

    def tenants(self, now: float) -> list[TenantUsage]:
        """Every tenant with a namespace or a quota, by name; leases pruned at `now`."""
        self._prune(now)
        return [self._tenants[name] for name in sorted(self._tenants)]

    def shared_bytes(self, kind: TierKind) -> int:
        """Footprint in `kind`'s tier of the tenants without a quota there."""
        return self._shared_bytes[kind]

    def leased_bytes(self, usage: TenantUsage, now: float) -> int:
        """Block bytes of the tenant's blocks under leases unexpired at `now`."""
        self._prune(now)
        return usage.leased_bytes

    def reserve(self, usage: TenantUsage, kind: TierKind, nbytes: int) -> None:
        """The tenant reserved `nbytes` of `kind`'s tier for a copy not indexed yet."""
        usage.reserved_bytes[kind] += nbytes
        if kind not in usage.quoted:
            self._shared_bytes[kind] += nbytes

    def unreserve(self, usage: TenantUsage, kind: TierKind, nbytes: int) -> None:
        self.reserve(usage, kind, -nbytes)

    def _count_copy(self, entry: BlockEntry, kind: TierKind, handle: object, sign: int) -> None:
        usage = entry.namespace.usage
        nbytes = sign * self._copy_bytes(kind, handle, entry.namespace.namespace.layout.block_bytes)
        self._num_blocks[kind] += sign
        usage.num_blocks[kind] += sign
        usage.stored_bytes[kind] += nbytes
        if kind not in usage.quoted:
            self._shared_bytes[kind] += nbytes

    # -- the index ------------------------------------------------------------------------

    def entered(self, entry: BlockEntry) -> None:
        """`entry` was just indexed."""
        for kind, handle in entry.copies.items():
            self._count_copy(entry, kind, handle, 1)
        if entry.read_pins:
            self._num_read_pinned += 1
        # Any lease it has counts until a prune finds it expired.
        self._track_lease(entry, now=0.0)

    def left(self, entry: BlockEntry) -> None:
        """`entry` was just taken out of the index."""
        for kind, handle in entry.copies.items():
            self._count_copy(entry, kind, handle, -1)
        if entry.read_pins:
            self._num_read_pinned -= 1
        if entry in self._leased:
            self._untrack_lease(entry)

    # -- copies ---------------------------------------------------------------------------

    def copy_added(self, entry: BlockEntry, kind: TierKind, handle: object) -> None:
        """`entry` gained a copy in `kind` (call only when it had none there)."""
        if entry.path is not None:
            self._count_copy(entry, kind, handle, 1)

    def copy_taken(self, entry: BlockEntry, kind: TierKind, handle: object) -> None:
        """`entry` lost its copy `handle` in `kind`."""
        if entry.path is not None:
            self._count_copy(entry, kind, handle, -1)

    # -- pins and leases --------------------------------------------------------------------

    def read_pinned(self, entry: BlockEntry) -> None:
        """`entry.read_pins` just went from 0 to 1."""
        if entry.path is not None:
            self._num_read_pinned += 1
            if entry in self._leased:
                self._num_leased_read_pinned += 1  # counted once, as read-pinned

    def read_unpinned(self, entry: BlockEntry, now: float) -> None:
        """`entry.read_pins` just went from 1 to 0."""
        if entry.path is not None:
            self._num_read_pinned -= 1
            if entry in self._leased:
                self._num_leased_read_pinned -= 1

    def lease_changed(self, entry: BlockEntry, now: float) -> None:
        """`entry.lease_expiry` was just set."""
        if entry.path is None:
            return
        if entry.lease_expiry <= now:
            if entry in self._leased:
                self._untrack_lease(entry)
        else:
            self._track_lease(entry, now)
        self._prune(now)

    def _untrack_lease(self, entry: BlockEntry) -> None:
        self._leased.remove(entry)
        if entry.read_pins:
            self._num_leased_read_pinned -= 1
        entry.namespace.usage.leased_bytes -= entry.namespace.namespace.layout.block_bytes

    def _track_lease(self, entry: BlockEntry, now: float) -> None:
        """Count the entry's lease if unexpired at `now` (a new item for its expiry)."""
        expiry = entry.lease_expiry
        if expiry <= now:
            return
        if entry not in self._leased:
            self._leased.add(entry)
            if entry.read_pins:
                self._num_leased_read_pinned += 1
            entry.namespace.usage.leased_bytes += entry.namespace.namespace.layout.block_bytes
        heapq.heappush(self._expiries, (expiry, next(self._tie_breaks), entry))
        if len(self._expiries) > _HEAP_SLACK * len(self._leased) + _HEAP_FLOOR:
            self._expiries = [
                (leased.lease_expiry, next(self._tie_breaks), leased) for leased in self._leased
            ]
            heapq.heapify(self._expiries)

    def _prune(self, now: float) -> None:
        """Forget the leases that expired by `now`; amortized O(log n) per lease."""
        expiries, leased = self._expiries, self._leased
        while expiries and expiries[0][0] <= now:
            entry = heapq.heappop(expiries)[2]
            # A stale item: the entry's current lease has its own, later item.
            if entry.lease_expiry <= now and entry in leased:
                self._untrack_lease(entry)
