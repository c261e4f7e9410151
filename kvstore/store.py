"""BlockStore: the facade callers use: lookups, pins, deletes, commits and reports.

Callers hand it namespaces and keys and get plain results back; the data structures
stay inside its BlockPool (kvstore.pool), which owns the tiers, the index and eviction.
It is not thread-safe: the server calls it from one event loop, and SSD I/O runs on the
SSD tier's threads, scheduled by kvstore.mover, which settles it back on that loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import operator
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from kvstore.config import StoreConfig
from kvstore.enums import Durability, TierKind
from kvstore.errors import CapacityExhausted, InvalidRequest
from kvstore.events import BlockEvent, BlockEventKind, BlockListener
from kvstore.index import BlockEntry, NamespaceState
from kvstore.keys import validate_keys
from kvstore.layout import Namespace
from kvstore.pool import BlockPool, SubtreeDelete
from kvstore.tiers.base import TierCounters
from kvstore.tiers.dram import DramTier
from kvstore.units import human_bytes

_FASTEST = operator.attrgetter("fastest")
# Blocks a Delete walks or removes per step of the event loop (about a millisecond).
DELETE_STEP_BLOCKS = 2048

__all__ = [
    "BlockStore",
    "DeleteResult",
    "PrefixMatch",
    "StoreConfig",
    "StoreCounters",
    "StoreReport",
    "TenantReport",
    "TenantTierReport",
    "TierReport",
]


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """The longest stored prefix of a key chain."""

    num_matched: int
    # Fastest tier of each matched block, run-length encoded: (tier, number of blocks).
    tier_runs: tuple[tuple[TierKind, int], ...]
    block_bytes: int
    # The first matched block was put as a chain's first block (BlockEntry.chain_root).
    first_is_chain_root: bool = False

    @property
    def tiers(self) -> tuple[TierKind, ...]:
        """One tier per matched block."""
        runs = self.tier_runs
        return tuple(itertools.chain.from_iterable(itertools.repeat(*run) for run in runs))


@dataclass(slots=True)
class StoreCounters:
    lookups: int = 0
    lookup_keys: int = 0
    lookup_hits: int = 0
    blocks_put: int = 0
    blocks_got: int = 0
    bytes_put: int = 0
    bytes_got: int = 0
    puts_abandoned: int = 0
    checksum_failures: int = 0


@dataclass(frozen=True, slots=True)
class TierReport:
    kind: TierKind
    name: str
    capacity_bytes: int
    used_bytes: int
    num_blocks: int
    counters: TierCounters
    degraded: bool = False
    read_bytes_per_s: int = 0  # the configured read throttle; 0: none


@dataclass(frozen=True, slots=True)
class TenantTierReport:
    kind: TierKind
    used_bytes: int  # footprint, reservations included
    num_blocks: int
    quota_bytes: int | None  # None: the tenant shares what the quotas leave
    num_quota_evictions: int


@dataclass(frozen=True, slots=True)
class TenantReport:
    tenant: str
    tiers: tuple[TenantTierReport, ...]
    pinned_bytes: int  # block bytes under unexpired leases
    pinned_quota_bytes: int | None
    lookup_keys: int = 0  # keys its lookups asked for
    lookup_hits: int = 0  # of those, the keys found


@dataclass(frozen=True, slots=True)
class StoreReport:
    tiers: tuple[TierReport, ...]
    counters: StoreCounters
    num_namespaces: int
    num_pinned: int
    uptime_s: float
    write_policy: str
    # What a COMMITTED put gets when the SSD takes its blocks (kvstore.pool.wait_durable).
    durability: Durability
    put_reserved_bytes: int
    num_ssd_writes: int
    # Each tenant with a namespace or a quota, by name.
    tenants: tuple[TenantReport, ...] = ()


@dataclass(slots=True)
class DeleteResult:
    num_deleted: int = 0
    num_busy: int = 0


class BlockStore:
    def __init__(self, config: StoreConfig) -> None:
        self._config = config
        self._pool = BlockPool(config)
        self._counters = StoreCounters()

    @property
    def config(self) -> StoreConfig:
        return self._config

    @property
    def pool(self) -> BlockPool:
        """The memory owner: for kvstore.mover, the put and read sessions, and recovery."""
        return self._pool

    @property
    def counters(self) -> StoreCounters:
        """The store-wide counters (sessions count their blocks into them)."""
        return self._counters

    @property
    def dram(self) -> DramTier:
        """The DRAM tier, read-only: tests reach a block's bytes through it."""
        return self._pool.dram

    @property
    def has_ssd(self) -> bool:
        """Whether the store has an SSD tier."""
        return self._pool.ssd is not None

    @property
    def tier_kinds(self) -> tuple[TierKind, ...]:
        return self._pool.tier_kinds

    # -- lookups -----------------------------------------------------------------

    def lookup(
        self, namespace: Namespace, keys: list[bytes], *, defer_touch: bool = False
    ) -> PrefixMatch:
        """The longest stored prefix of `keys`; the matched chain counts as used.

        With `defer_touch`, marking it used waits for `settle_touches` (the server runs
        that right after the reply has gone out), keeping per-block work off the
        lookup's latency. The order of use is fixed here either way. Stores that count
        sightings (SSD admission, HBM promotion) touch at once: those read them early.
        """
        pool = self._pool
        found = pool.find_prefix(namespace, keys)
        # Found keys were valid when they were put: only the rest need checking.
        validate_keys(keys, start=len(found))
        counters = self._counters
        counters.lookups += 1
        counters.lookup_keys += len(keys)
        counters.lookup_hits += len(found)
        usage = found[0].namespace.usage if found else pool.tenant_usage(namespace.tenant)
        if usage is not None:  # None: the tenant has nothing here, so nothing to report
            usage.lookup_keys += len(keys)
            usage.lookup_hits += len(found)
        tier_runs = self.tier_runs(found)
        self.record_hits(tier_runs, len(found), missed=len(found) < len(keys))
        if defer_touch and not pool.counts_sightings:
            pool.touch_later(found)
        else:
            pool.touch(found)
        return PrefixMatch(
            num_matched=len(found),
            tier_runs=tier_runs,
            block_bytes=namespace.layout.block_bytes,
            first_is_chain_root=bool(found) and found[0].chain_root,
        )

    def snapshot(self, namespace: Namespace) -> list[BlockEvent]:
        """A SNAPSHOT event per block the namespace holds now, every parent before its
        children; O(blocks of the namespace)."""
        return [snapshot_event(entry) for entry in self.snapshot_entries(namespace)]

    def snapshot_entries(self, namespace: Namespace) -> list[BlockEntry]:
        """The namespace's blocks now, every parent before its children (a child is
        indexed only after its parent, and a parent with children never leaves). A copy
        of references, about 60x cheaper than building the events: a watcher turns
        them into events (`snapshot_event`) as it sends them."""
        state = self._pool.find_namespace(namespace)
        return [] if state is None else list(state.blocks.values())

    @property
    def listener(self) -> BlockListener | None:
        """Told of every change to what lookups find (kvstore.events); None: nobody."""
        return self._pool.listener

    @listener.setter
    def listener(self, listener: BlockListener | None) -> None:
        self._pool.listener = listener

    def find_prefix(self, namespace: Namespace, keys: list[bytes]) -> list[BlockEntry]:
        """The entries of the longest stored prefix of `keys`; nothing counts as used."""
        return self._pool.find_prefix(namespace, keys)

    def tiers_of(self, entries: list[BlockEntry]) -> list[TierKind]:
        """The fastest tier holding each block."""
        return list(map(_FASTEST, entries))

    def tier_runs(self, entries: list[BlockEntry]) -> tuple[tuple[TierKind, int], ...]:
        """(tier, count) for each run of consecutive entries whose fastest copy is there."""
        if not entries:
            return ()
        kinds = self._pool.tier_kinds
        if len(kinds) == 1:
            return ((kinds[0], len(entries)),)
        runs = itertools.groupby(map(_FASTEST, entries))
        return tuple((kind, len(list(run))) for kind, run in runs)

    def record_hits(
        self, tiers: Iterable[tuple[TierKind, int]], num_found: int, *, missed: bool
    ) -> None:
        """Each block counts a hit in the tier that holds it fastest and a miss in faster ones.

        `tiers` counts the found blocks per tier, in any number of (tier, count) pairs.
        """
        served: Counter[TierKind] = Counter()
        for kind, count in tiers:
            served[kind] += count
        slower = num_found + int(missed)
        pool = self._pool
        for kind in pool.tier_kinds:
            counters = pool.counters_of(kind)
            hits = served.get(kind, 0)
            counters.hits += hits
            slower -= hits
            counters.misses += slower

    def settle_touches(self) -> None:
        """Apply the touches `lookup(defer_touch=True)` left; victims are chosen after."""
        self._pool.settle_touches()

    # -- commits ---------------------------------------------------------------------

    def commit(self, entry: BlockEntry) -> None:
        """Make a complete, verified block findable."""
        self._pool.commit(entry)
        self._counters.blocks_put += 1
        self._counters.bytes_put += entry.layout.block_bytes

    async def wait_durable(self, committed: list[BlockEntry]) -> Durability:
        """Wait until committed blocks are as durable as the write policy makes them;
        returns what they all are (kvstore.pool.BlockPool.wait_durable)."""
        return await self._pool.wait_durable(committed)

    # -- pins ----------------------------------------------------------------------

    def pin(self, namespace: Namespace, keys: list[bytes], ttl_s: float) -> tuple[int, float]:
        """Lease the present blocks among `keys`; returns (count, wall-clock time at which
        the first of their leases ends: this pin's, or a longer one held already).

        The lease is cut to the tenant's `max_lease_s` quota, else the store's. A pin
        that would take the tenant's leased bytes past its `pinned_bytes` quota raises
        CapacityExhausted and pins nothing.
        """
        if ttl_s <= 0:
            raise InvalidRequest(f"ttl must be > 0, got {ttl_s}")
        quota = self._config.quotas.get(namespace.tenant)
        ttl_s = min(ttl_s, self._config.max_lease_s)
        if quota is not None and quota.max_lease_s is not None:
            ttl_s = min(ttl_s, quota.max_lease_s)
        validate_keys(keys)
        pool = self._pool
        state = pool.find_namespace(namespace)
        now = time.monotonic()
        # Each block once, however often the request names it: the count is of blocks.
        entries = list(
            dict.fromkeys(
                entry for key in keys if (entry := state.blocks.get(key) if state else None)
            )
        )
        if quota is not None and quota.pinned_bytes is not None and state is not None:
            self._check_pinned_quota(namespace.tenant, quota.pinned_bytes, state, entries, now)
        for entry in entries:
            pool.extend_lease(entry, now + ttl_s)
        # A lease is only ever extended: an earlier, longer pin may hold a block past this
        # one. The reply names when the first of the pinned blocks' leases ends.
        first_end = min((entry.lease_expiry for entry in entries), default=now + ttl_s)
        return len(entries), time.time() + (first_end - now)

    def _check_pinned_quota(
        self,
        tenant: str,
        limit_bytes: int,
        state: NamespaceState,
        entries: list[BlockEntry],
        now: float,
    ) -> None:
        """Raise CapacityExhausted if leasing `entries` takes the tenant past its quota."""
        new_bytes = sum(
            entry.layout.block_bytes for entry in set(entries) if entry.lease_expiry <= now
        )
        leased_bytes = self._pool.leased_bytes(state.usage, now)
        if new_bytes and leased_bytes + new_bytes > limit_bytes:
            raise CapacityExhausted(
                f"tenant {tenant!r} is at its pinned_bytes quota ({human_bytes(limit_bytes)}, "
                f"{human_bytes(leased_bytes)} leased): this pin would lease "
                f"{human_bytes(new_bytes)} more, so nothing was pinned; unpin blocks, let "
                f"leases expire, or raise quotas.{tenant}.pinned_bytes"
            )

    def unpin(self, namespace: Namespace, keys: list[bytes]) -> int:
        validate_keys(keys)
        pool = self._pool
        state = pool.find_namespace(namespace)
        now = time.monotonic()
        num_unpinned = 0
        for key in keys:
            entry = state.blocks.get(key) if state is not None else None
            if entry is None or entry.lease_expiry <= now:
                continue
            pool.end_lease(entry, now)
            num_unpinned += 1
        return num_unpinned

    # -- deletes ---------------------------------------------------------------------

    def delete(self, namespace: Namespace, keys: list[bytes]) -> DeleteResult:
        """Delete each key's block and every block chained below it; pinned ones stay."""
        deletion = self._start_delete(namespace, keys)
        if deletion is not None:
            while not deletion.step(time.monotonic(), 1 << 62):
                pass
        return _delete_result(deletion)

    async def delete_stepwise(self, namespace: Namespace, keys: list[bytes]) -> DeleteResult:
        """`delete`, `DELETE_STEP_BLOCKS` blocks per step of the event loop: a deep
        subtree (or one a pinned block keeps) never holds the loop for long."""
        deletion = self._start_delete(namespace, keys)
        if deletion is not None:
            while True:
                if deletion.step(time.monotonic(), DELETE_STEP_BLOCKS):
                    break
                await asyncio.sleep(0)  # let other requests in between steps
        return _delete_result(deletion)

    def _start_delete(self, namespace: Namespace, keys: list[bytes]) -> SubtreeDelete | None:
        validate_keys(keys)
        state = self._pool.find_namespace(namespace)
        if state is None:
            return None
        roots = [root for key in keys if (root := state.blocks.get(key)) is not None]
        return SubtreeDelete(self._pool, roots) if roots else None

    async def settle_deletes(self) -> None:
        """Wait until the files of blocks deleted so far are gone from the SSD directory
        (fsynced with `fsync`): a restart after this cannot bring them back."""
        ssd = self._pool.ssd
        if ssd is not None:
            await ssd.settle_removals()

    # -- reporting -------------------------------------------------------------------

    def report(self, tenants: Iterable[str] | None = None) -> StoreReport:
        """Sizes, counts and counters of the store and each tier, whatever the number of
        blocks (the counts are kept as blocks change: kvstore.census); the usage of the
        named `tenants` only, or of every tenant (None: O(tenants))."""
        pool = self._pool
        reports = []
        for kind in pool.tier_kinds:
            tier = pool.tier(kind)
            reports.append(
                TierReport(
                    kind=kind,
                    name=tier.name,
                    capacity_bytes=tier.capacity_bytes,
                    used_bytes=tier.used_bytes,
                    num_blocks=pool.num_blocks(kind),
                    counters=tier.counters,
                    degraded=tier.degraded,
                    read_bytes_per_s=self._config.read_rate(kind),
                )
            )
        return StoreReport(
            tiers=tuple(reports),
            counters=self._counters,
            num_namespaces=pool.num_namespaces,
            num_pinned=pool.num_pinned(time.monotonic()),
            uptime_s=pool.uptime_s,
            write_policy=self._config.write_policy,
            durability=pool.policy_durability,
            put_reserved_bytes=pool.put_reserved_bytes,
            num_ssd_writes=pool.num_ssd_writes,
            tenants=self.tenant_reports(tenants),
        )

    def tenant_names(self) -> list[str]:
        """Every tenant with a namespace or a quota, by name."""
        return [usage.tenant for usage in self._pool.tenant_usages()]

    def largest_tenants(self, count: int) -> list[str]:
        """The `count` tenants using the most bytes over all tiers, by name."""
        pool = self._pool
        kinds = pool.tier_kinds
        largest = heapq.nlargest(
            count,
            pool.tenant_usages(),
            key=lambda usage: sum(usage.used_bytes(kind) for kind in kinds),
        )
        return sorted(usage.tenant for usage in largest)

    def tenant_reports(self, tenants: Iterable[str] | None = None) -> tuple[TenantReport, ...]:
        """The usage and quotas of the named tenants that have any (None: every tenant;
        O(tenants))."""
        pool = self._pool
        if tenants is None:
            usages = pool.tenant_usages()
        else:
            usages = [usage for name in tenants if (usage := pool.tenant_usage_now(name))]
        return tuple(
            TenantReport(
                tenant=usage.tenant,
                tiers=tuple(
                    TenantTierReport(
                        kind=kind,
                        used_bytes=usage.used_bytes(kind),
                        num_blocks=usage.num_blocks[kind],
                        quota_bytes=usage.quota.tier_bytes(kind) if usage.quota else None,
                        num_quota_evictions=usage.num_quota_evictions[kind],
                    )
                    for kind in pool.tier_kinds
                ),
                pinned_bytes=usage.leased_bytes,
                pinned_quota_bytes=usage.quota.pinned_bytes if usage.quota else None,
                lookup_keys=usage.lookup_keys,
                lookup_hits=usage.lookup_hits,
            )
            for usage in usages
        )


def snapshot_event(entry: BlockEntry) -> BlockEvent:
    """The SNAPSHOT event of an entry, as it is now: its fastest tier now, or the last
    one it had if it has left since (the REMOVED event that followed then says so)."""
    parent_key = entry.parent.key if entry.parent is not None else b""
    return BlockEvent(BlockEventKind.SNAPSHOT, entry.key, parent_key, entry.fastest)


def _delete_result(deletion: SubtreeDelete | None) -> DeleteResult:
    result = DeleteResult()
    if deletion is not None:
        result.num_deleted, result.num_busy = deletion.num_deleted, deletion.num_busy
    return result
