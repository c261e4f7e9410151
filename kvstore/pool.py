"""BlockPool: the one owner of the store's memory.

It holds the tiers, the block index, one eviction queue per tier, the leases, the SSD
reservations and the tick clock, and it alone allocates, frees, drops copies and
re-ranks blocks. BlockStore (the facade) and TierMover (the I/O scheduler) call its
methods; neither edits a tier or a queue itself. No gRPC, no policy of when to move
data: that is the mover's.

Invariants:
- A block is findable while it has a copy in at least one tier.
- A copy leaves a tier only if the block keeps another copy, or the block is a chain
  tail (no children): so a child is never findable without its parent.
- Pinned blocks (a lease, a read or an SSD write in flight) keep every copy.
- A tier's queues hold exactly the indexed entries that could leave that tier now or by
  a move down (`evictable_from`); whoever changes that calls `refresh`. Allocations
  take only the droppable ones; the mover moves the rest down.

Quotas: each tier has one queue per eviction group: one per tenant with a quota on the
tier, and SHARED for all the others. A group owns its limit of the tier (its quota, or
for SHARED the capacity the quotas leave). An allocation evicts only from its own group,
and only what takes the group past its limit; room the tier lacks beyond that comes only
from groups above their own limits, never from a group within its limit
(`eviction_needs`). So no tenant evicts a block of a tenant with a quota.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.census import SHARED, BlockCensus, TenantUsage
from kvstore.checksum import ChecksumKind
from kvstore.config import StoreConfig
from kvstore.enums import Durability, TierKind
from kvstore.errors import CapacityExhausted
from kvstore.events import BlockEventKind, BlockListener
from kvstore.eviction import POLICIES, EvictionQueue
from kvstore.index import BlockEntry, BlockIndex, NamespaceState
from kvstore.layout import Namespace
from kvstore.tiers.base import MemoryTier, Tier, TierCounters
from kvstore.tiers.blockfile import BlockFileHeader, CorruptBlockFile
from kvstore.tiers.dram import DramTier
from kvstore.tiers.hbm import HbmTier, resolve_device
from kvstore.tiers.ssd import SsdLocation, SsdTier
from kvstore.units import human_bytes

# Deferred touches settle by themselves past this many, should nobody settle them.
_MAX_UNTOUCHED = 64
_ALL = 1 << 62  # a step budget no subtree reaches

__all__ = ["BlockPool", "Victims"]


logger = logging.getLogger("kvstore")


@dataclass(slots=True)
class _Clock:
    tick: int = 0
    started: float = field(default_factory=time.monotonic)


class Victims:
    """One tier's eviction candidates in policy order, for one pass (`BlockPool.victims`).

    `take` skips entries that cannot leave the tier now (re-ranking them where they
    belong); an entry the caller cannot move after all goes back through `keep` and
    is re-queued when the pass ends, so a pass never sees the same entry twice.
    """

    def __init__(self, pool: BlockPool, kind: TierKind, group: str) -> None:
        self._pool = pool
        self._kind = kind
        self._queue = pool._queues[kind][group]
        self.kept: list[BlockEntry] = []

    def take(self) -> BlockEntry | None:
        """The next entry that may leave the tier, out of its queue; None when none is left."""
        while (victim := self._queue.pop()) is not None:
            if self._pool.evictable_from(victim, self._kind, time.monotonic()):
                return victim
            self._pool.refresh(victim)
        return None

    def keep(self, entry: BlockEntry) -> None:
        """Put a taken entry back in the queue once the pass ends."""
        self.kept.append(entry)


class SubtreeDelete:
    """Deleting `roots` and every block chained below them, each block once (keys of one
    chain share their subtrees), a bounded number of blocks per `step`: between steps
    the caller may let other work run, so a deep subtree never holds the loop. Pinned
    blocks and their ancestors stay (`num_busy`). The work is proportional to the
    subtrees, not the namespace.

    Between steps the store may change: a block evicted meanwhile is skipped, and one
    that gained a child meanwhile stays (a removal only ever takes a chain tail).
    """

    def __init__(self, pool: BlockPool, roots: list[BlockEntry]) -> None:
        self._pool = pool
        # The shallowest root is walked first and its whole subtree before the next root
        # (a stack): a root inside another's subtree is then seen there, and subtrees of
        # a tree are nested or disjoint, so `_found` stays in pre-order.
        self._pending = sorted(roots, key=lambda root: root.depth, reverse=True)
        self._seen: set[int] = set()
        # Pre-order: each block before its descendants; removed from the end, so every
        # block comes after its children.
        self._found: list[BlockEntry] = []
        self.num_deleted = 0
        self.num_busy = 0

    def step(self, now: float, max_blocks: int) -> bool:
        """Walk or delete up to `max_blocks` blocks; True once the whole delete is done."""
        budget = max_blocks
        pending, seen, found = self._pending, self._seen, self._found
        while pending and budget > 0:
            entry = pending.pop()
            if id(entry) in seen:
                continue
            seen.add(id(entry))
            found.append(entry)
            if entry.children:
                pending.extend(entry.children)
            budget -= 1
        if pending:
            return False
        while found and budget > 0:
            entry = found.pop()
            budget -= 1
            if not entry.is_indexed():
                continue  # evicted meanwhile
            if entry.is_pinned(now) or entry.num_children:
                self.num_busy += 1
                continue
            self._pool.remove(entry)
            self.num_deleted += 1
        return not found


class BlockPool:
    def __init__(self, config: StoreConfig) -> None:
        self._config = config
        self._index = BlockIndex(BlockCensus(self._copy_bytes))
        for tenant, quota in config.quotas.items():
            self._index.census.set_quota(tenant, quota)
        self._dram = DramTier(config.dram_bytes, config.page_bytes, pin_memory=config.pin_memory)
        self._hbm: HbmTier | None = None
        if config.hbm_bytes:
            device = resolve_device(config.hbm_device)
            self._hbm = HbmTier(config.hbm_bytes, config.page_bytes, device)
        self._ssd: SsdTier | None = None
        if config.ssd_dir is not None:
            self._ssd = SsdTier(
                Path(config.ssd_dir),
                config.ssd_bytes,
                fsync=config.ssd_fsync,
                io_threads=config.ssd_io_threads,
                compression=config.ssd_compression,
                compress_min_saving=config.ssd_compress_min_saving,
            )
        # Fastest first: TierKind orders that way, and reports list tiers in this order.
        self._memory: dict[TierKind, MemoryTier] = {TierKind.DRAM: self._dram}
        if self._hbm is not None:
            self._memory = {TierKind.HBM: self._hbm, **self._memory}
        self._tiers: dict[TierKind, Tier] = dict(self._memory)
        if self._ssd is not None:
            self._tiers[TierKind.SSD] = self._ssd
        self.tier_kinds: tuple[TierKind, ...] = tuple(self._tiers)
        self._priority = POLICIES[config.eviction_policy]
        # Per tier, the limit of each eviction group: quoted tenants' quotas, and SHARED's
        # what they leave of the tier.
        self._limits: dict[TierKind, dict[str, int]] = {}
        for kind in self.tier_kinds:
            quoted = {
                tenant: nbytes
                for tenant, quota in config.quotas.items()
                if (nbytes := quota.tier_bytes(kind)) is not None
            }
            capacity = self._tiers[kind].capacity_bytes
            self._limits[kind] = {SHARED: max(0, capacity - sum(quoted.values())), **quoted}
        self._queues = {
            kind: {group: EvictionQueue(self._priority) for group in self._limits[kind]}
            for kind in self.tier_kinds
        }
        self._clock = _Clock()
        # num_seen feeds the SSD admission filter and HBM promotion; nothing else reads it.
        self.counts_sightings = config.ssd_admit_after_seen > 1 or self._hbm is not None
        # Leased entries sit outside the queues until an eviction pass finds them expired.
        self._leased: set[BlockEntry] = set()
        # Deferred touches: (chain, its newest tick), oldest first.
        self._untouched: list[tuple[list[BlockEntry], int]] = []
        # DRAM held by puts for blocks that have not committed yet.
        self.put_reserved_bytes = 0
        # SSD writes claimed or in flight, each with the event set once it has ended;
        # `_ssd_writers` are those whose write_to_ssd call is running.
        self._ssd_writes: dict[BlockEntry, asyncio.Event] = {}
        self._ssd_writers: set[BlockEntry] = set()
        # Told of every change to what lookups find (kvstore.events); None: nobody asks.
        self.listener: BlockListener | None = None

    # -- tiers (read-only views) --------------------------------------------------------

    @property
    def dram(self) -> DramTier:
        return self._dram

    @property
    def hbm(self) -> HbmTier | None:
        return self._hbm

    @property
    def ssd(self) -> SsdTier | None:
        return self._ssd

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._clock.started

    def tier(self, kind: TierKind) -> Tier:
        return self._tiers[kind]

    def memory_tier(self, kind: TierKind) -> MemoryTier:
        """The HBM or DRAM tier; KeyError for SSD or a tier the store lacks."""
        return self._memory[kind]

    def counters_of(self, kind: TierKind) -> TierCounters:
        return self._tiers[kind].counters

    def _copy_bytes(self, kind: TierKind, handle: object, block_bytes: int) -> int:
        """A copy's footprint in its tier, as the tier counts its `used_bytes`."""
        if isinstance(handle, SsdLocation):
            return handle.nbytes
        return self._memory[kind].footprint_bytes(block_bytes)

    # -- tenants --------------------------------------------------------------------------

    def tenant_usage(self, tenant: str) -> TenantUsage | None:
        """The tenant's usage, while it has a namespace or a quota."""
        return self._index.census.tenant(tenant)

    def tenant_usages(self) -> list[TenantUsage]:
        """Every tenant with a namespace or a quota, by name (leases counted as of now)."""
        return self._index.census.tenants(time.monotonic())

    def tenant_usage_now(self, tenant: str) -> TenantUsage | None:
        """One tenant's usage (leases counted as of now); None if it has none."""
        return self._index.census.tenant_now(tenant, time.monotonic())

    def leased_bytes(self, usage: TenantUsage, now: float) -> int:
        return self._index.census.leased_bytes(usage, now)

    def group_limit_bytes(self, kind: TierKind, group: str) -> int:
        """What the eviction group owns of `kind`'s tier."""
        return self._limits[kind][group]

    def groups(self, kind: TierKind) -> list[tuple[str, int, int]]:
        """(group, used bytes, limit bytes) of each eviction group of `kind`'s tier."""
        return [
            (group, self.group_used_bytes(kind, group), limit)
            for group, limit in self._limits[kind].items()
        ]

    def group_used_bytes(self, kind: TierKind, group: str) -> int:
        census = self._index.census
        if group == SHARED:
            return census.shared_bytes(kind)
        usage = census.tenant(group)
        assert usage is not None, "a quoted tenant's usage lives as long as the store"
        return usage.used_bytes(kind)

    def _free_bytes(self, kind: TierKind) -> int:
        if kind is TierKind.SSD:
            ssd = self._ssd
            assert ssd is not None
            return ssd.capacity_bytes - ssd.used_bytes - ssd.reserved_bytes
        return self._memory[kind].free_bytes

    def _footprint(self, kind: TierKind, nbytes: int) -> int:
        return nbytes if kind is TierKind.SSD else self._memory[kind].footprint_bytes(nbytes)

    def eviction_needs(
        self, kind: TierKind, nbytes: int, usage: TenantUsage | None
    ) -> tuple[list[tuple[str, int]], int]:
        """What must leave `kind`'s tier before the tenant (None: one without a quota)
        may take `nbytes` there: (group, bytes) to free per eviction group, and the bytes
        nothing may be evicted for (the tier short of room with every group within its
        limit: only pins and puts in flight hold it). No needs and 0: it fits now.

        The tenant's own group frees what takes the group past its limit; any room the
        tier still lacks comes from groups above their limits, up to their excess, and
        then, for SHARED only, from SHARED (with no quotas, that is the one global LRU).
        A quoted tenant within its quota never evicts its own blocks for room the tier
        lacks.
        """
        footprint = self._footprint(kind, nbytes)
        group = usage.group(kind) if usage is not None else SHARED
        others: list[tuple[str, int]] = []
        own = max(0, self.group_used_bytes(kind, group) + footprint - self._limits[kind][group])
        short = footprint - self._free_bytes(kind) - own
        for other, limit in self._limits[kind].items():
            if short <= 0:
                break
            excess = self.group_used_bytes(kind, other) - limit
            if other != group and excess > 0:
                others.append((other, min(excess, short)))
                short -= min(excess, short)
        if short > 0 and group == SHARED:
            own, short = own + short, 0
        needs = [(group, own), *others] if own else others
        return needs, max(short, 0)

    def fits(self, kind: TierKind, nbytes: int, usage: TenantUsage | None) -> bool:
        """Whether the tenant may take `nbytes` of `kind`'s tier without evicting."""
        needs, short = self.eviction_needs(kind, nbytes, usage)
        return not needs and not short

    # -- the index ----------------------------------------------------------------------

    def find_namespace(self, namespace: Namespace) -> NamespaceState | None:
        return self._index.find_namespace(namespace)

    def namespace_state(self, namespace: Namespace) -> NamespaceState:
        """The namespace's state, created if new (recovery: no limit applies)."""
        return self._index.namespace(namespace)

    def open_namespace(self, namespace: Namespace) -> NamespaceState:
        """The namespace's state for a put, held until `close_namespace`.

        Raises CapacityExhausted rather than create one past `max_namespaces`.
        """
        state = self._index.find_namespace(namespace)
        if state is None:
            limit = self._config.max_namespaces
            if self._index.num_namespaces >= limit:
                raise CapacityExhausted(
                    f"the store holds {limit} namespaces, its limit (store.max_namespaces); a "
                    f"namespace is freed when its last block is evicted or deleted"
                )
            state = self._index.namespace(namespace)
        state.num_puts += 1
        return state

    def close_namespace(self, state: NamespaceState) -> None:
        state.num_puts -= 1
        self._free_if_empty(state)

    def _free_if_empty(self, state: NamespaceState) -> None:
        if not state.blocks and not state.num_puts:
            self._index.drop_namespace(state)

    def find_prefix(self, namespace: Namespace, keys: list[bytes]) -> list[BlockEntry]:
        return self._index.present_prefix(self._index.find_namespace(namespace), keys)

    def entries(self) -> list[BlockEntry]:
        return self._index.entries()

    @property
    def num_namespaces(self) -> int:
        return self._index.num_namespaces

    @property
    def max_namespaces(self) -> int:
        return self._config.max_namespaces

    def commit(self, entry: BlockEntry) -> None:
        """Index a complete, verified block as the most recently used."""
        self._index.insert(entry)
        self._clock.tick += 1
        entry.last_access = self._clock.tick
        if entry.parent is not None:
            self.refresh(entry.parent)
        self.refresh(entry)
        if self.listener is not None:
            self._tell_stored(entry)

    def restore(self, entry: BlockEntry) -> None:
        """Index a block recovered from its SSD file (its only copy) at start-up."""
        assert self._ssd is not None
        location = entry.copies[TierKind.SSD]
        assert isinstance(location, SsdLocation)
        self._index.insert(entry)
        self._ssd.adopt(location)
        if entry.parent is not None:
            self.refresh(entry.parent)
        self.refresh(entry)
        if self.listener is not None:  # recovery may run while the store serves
            self._tell_stored(entry)

    def adopt_ssd_copy(self, entry: BlockEntry, location: SsdLocation) -> None:
        """Give an indexed block the SSD file recovery found for it (same bytes)."""
        assert self._ssd is not None
        self._ssd.adopt(location)
        entry.add_copy(TierKind.SSD, location)
        self.refresh(entry)

    def _tell_stored(self, entry: BlockEntry) -> None:
        assert self.listener is not None
        parent_key = entry.parent.key if entry.parent is not None else b""
        self.listener.block_changed(
            entry.namespace.namespace, BlockEventKind.STORED, entry.key, parent_key, entry.fastest
        )

    def _tell_if_moved(self, entry: BlockEntry, fastest_before: TierKind) -> None:
        """TIER_CHANGED, if the fastest tier holding the (still indexed) block changed."""
        if self.listener is not None and entry.fastest is not fastest_before:
            self.listener.block_changed(
                entry.namespace.namespace,
                BlockEventKind.TIER_CHANGED,
                entry.key,
                b"",
                entry.fastest,
            )

    # -- touches ------------------------------------------------------------------------

    def touch(self, chain: list[BlockEntry]) -> None:
        """Mark a chain used (and seen once more, where a policy counts sightings).

        The head gets the newest tick, so under LRU its tail goes first.
        """
        self._clock.tick += len(chain)
        self._apply_touch(chain, self._clock.tick)

    def touch_later(self, chain: list[BlockEntry]) -> None:
        """`touch`, ranked now but applied at the next `settle_touches`."""
        if not chain:
            return
        # The ticks are taken now, so the chain ranks where an immediate touch puts it.
        self._clock.tick += len(chain)
        self._untouched.append((chain, self._clock.tick))
        if len(self._untouched) >= _MAX_UNTOUCHED:
            self.settle_touches()

    def settle_touches(self) -> None:
        """Apply the deferred touches; every eviction pass runs this before it chooses."""
        untouched, self._untouched = self._untouched, []
        for chain, newest_tick in untouched:
            self._apply_touch(chain, newest_tick)

    def _apply_touch(self, chain: list[BlockEntry], newest_tick: int) -> None:
        # A 1,000-block lookup spends most of its server time in per-block Python:
        # the loops stay bare.
        tick = newest_tick - len(chain)
        for entry in reversed(chain):
            tick += 1
            entry.last_access = tick
        if self.counts_sightings:
            for entry in chain:
                entry.num_seen += 1
        # Only chain tails and blocks with spare copies sit in queues: re-rank just those.
        # A chain is one namespace's, so one tenant's: one queue per tier.
        if not chain:
            return
        usage = chain[0].namespace.usage
        now = time.monotonic()
        for kind, queues in self._queues.items():
            queues[usage.tenant if kind in usage.quoted else SHARED].touch_many(chain, now)

    # -- eviction -----------------------------------------------------------------------

    @contextmanager
    def victims(self, kind: TierKind, group: str = SHARED) -> Iterator[Victims]:
        """The one eviction loop's source: the victims of one eviction group in `kind`
        (a quoted tenant's name, or SHARED: every tenant without a quota there), ranked
        by every use so far.

        Entries the caller `keep`s are re-queued on exit, whatever the exit.
        """
        self.settle_touches()
        victims = Victims(self, kind, group)
        try:
            yield victims
        finally:
            for entry in victims.kept:
                self.refresh(entry)

    def evictable_from(self, entry: BlockEntry, kind: TierKind, now: float) -> bool:
        """Whether the entry belongs in the tier's queue: it could leave, now or by a move
        down (a demotion to SSD; out of HBM, a copy into free DRAM, kvstore.mover)."""
        if kind not in entry.copies or entry.is_pinned(now):
            return False
        if kind is TierKind.SSD and _has_child_on_ssd(entry):
            # SSD tail-first: a restart rebuilds chains from the block files and drops a
            # file whose parent has none, so a parent's file must outlive its children's.
            return False
        if kind is TierKind.HBM:
            return True  # droppable, or an HBM-only block that may move into DRAM
        return self.droppable(entry) or (kind is TierKind.DRAM and self.demotable(entry))

    def droppable(self, entry: BlockEntry) -> bool:
        """A copy can go at once: another copy remains, or the block is a chain tail."""
        return len(entry.copies) > 1 or entry.num_children == 0

    def demotable(self, entry: BlockEntry) -> bool:
        """Write-back may move the block's only copy from DRAM to SSD."""
        return (
            self._ssd is not None
            and self._config.write_policy == "write-back"
            and self.admitted(entry)
        )

    def admitted(self, entry: BlockEntry) -> bool:
        """The block has been seen often enough to earn SSD."""
        return entry.num_seen >= self._config.ssd_admit_after_seen

    def refresh(self, entry: BlockEntry) -> None:
        """Put the entry in exactly the queues of the tiers it could now leave."""
        now = time.monotonic()
        indexed = entry.is_indexed()
        usage = entry.namespace.usage
        for kind, queues in self._queues.items():
            queue = queues[usage.tenant if kind in usage.quoted else SHARED]
            if indexed and self.evictable_from(entry, kind, now):
                queue.add(entry, now)
            else:
                queue.discard(entry)
        if indexed and entry.read_pins == 0 and entry.lease_expiry > now:
            self._leased.add(entry)
        else:
            self._leased.discard(entry)

    # -- space --------------------------------------------------------------------------

    def allocate(self, kind: TierKind, nbytes: int, usage: TenantUsage | None = None) -> object:
        """A handle in a memory tier for `nbytes`, for the tenant of `usage` (None: one
        without a quota), evicting as `eviction_needs` says until it fits.

        The victims are chosen before any is dropped: an allocation that cannot fit
        raises CapacityExhausted with every stored block left in place.
        """
        tier = self._memory[kind]
        if nbytes > tier.capacity_bytes:
            # Evicting could never make room: leave every stored block alone.
            raise CapacityExhausted(
                f"a block of {nbytes} B is larger than the whole {kind.name} tier "
                f"({tier.capacity_bytes} B); give the tier more memory or use smaller blocks"
            )
        needs, short = self.eviction_needs(kind, nbytes, usage)
        if needs or short:
            self.release_expired_leases()
            needs, short = self.eviction_needs(kind, nbytes, usage)
        plans: list[tuple[str, list[BlockEntry]]] = []
        failure: str | None = None
        for group, needed_bytes in needs:
            planned, evictable_bytes = self._plan_eviction(kind, group, needed_bytes)
            if planned is None:
                failure = self._group_full_message(kind, group, nbytes, evictable_bytes)
                break
            plans.append((group, planned))
        if failure is None and short:
            failure = self._full_message(kind, tier, nbytes)
        if failure is not None:
            for _, planned in plans:  # back in their queues, nothing dropped
                for victim in planned:
                    self.refresh(victim)
            raise CapacityExhausted(failure)
        census = self._index.census
        for group, planned in plans:
            quoted = census.tenant(group) if group != SHARED else None
            for victim in planned:  # children before their parents: each is a tail when dropped
                self.drop_copy(victim, kind)
                if quoted is not None:
                    quoted.num_quota_evictions[kind] += 1
        handle = tier.allocate(nbytes)
        assert handle is not None, "the planned victims freed too little"
        return handle

    def _plan_eviction(
        self, kind: TierKind, group: str, needed_bytes: int
    ) -> tuple[list[BlockEntry] | None, int]:
        """The copies of `group` in `kind` whose drop frees `needed_bytes`, in the order
        dropping them one at a time would take them, and the bytes they free; None, and
        nothing taken, when all of them would not (with the bytes all of them would
        free). A parent whose children are all planned becomes a tail, so it competes
        with the queue from then on, ranked by the same policy.

        Victims that could only leave by a demotion (an SSD write) wait for kvstore.mover.
        """
        tier = self._memory[kind]
        now = time.monotonic()
        planned: list[BlockEntry] = []
        planned_children: dict[BlockEntry, int] = {}
        freed_up: list[tuple[tuple[object, ...], int, BlockEntry]] = []  # a heap
        freed_bytes = 0
        with self.victims(kind, group) as victims:
            queued = victims.take()
            while freed_bytes < needed_bytes:
                if freed_up and (queued is None or freed_up[0][0] < self._rank(queued, now)):
                    victim = heapq.heappop(freed_up)[2]
                elif queued is not None:
                    victim, queued = queued, victims.take()
                    if not self.droppable(victim):
                        victims.keep(victim)
                        continue
                else:
                    break
                planned.append(victim)
                freed_bytes += tier.footprint_bytes(victim.layout.block_bytes)
                parent = victim.parent
                if parent is None or kind not in parent.copies or parent.is_pinned(now):
                    continue
                if len(victim.copies) > 1:
                    continue  # the child stays indexed (another tier keeps it): still a child
                planned_children[parent] = planned_children.get(parent, 0) + 1
                if len(parent.copies) == 1 and parent.num_children == planned_children[parent]:
                    heapq.heappush(freed_up, (self._rank(parent, now), id(parent), parent))
            if queued is not None:
                victims.keep(queued)
            if freed_bytes < needed_bytes:
                for victim in planned:
                    victims.keep(victim)
                return None, freed_bytes
        return planned, freed_bytes

    def _rank(self, entry: BlockEntry, now: float) -> tuple[object, ...]:
        return self._priority(entry, now)

    def _full_message(self, kind: TierKind, tier: MemoryTier, nbytes: int) -> str:
        # The caller may be one tenant among several: the message says nothing of what
        # the others use or pin; the daemon's log (debug) and an admin's Stats do.
        logger.debug(
            "%s tier full: %d B needed, %d B free of %d B, %d blocks pinned",
            kind.name,
            nbytes,
            tier.capacity_bytes - tier.used_bytes,
            tier.capacity_bytes,
            self.num_pinned(time.monotonic()),
        )
        return (
            f"{kind.name} tier is full: a block needs {nbytes} B of its {tier.capacity_bytes} B "
            f"and nothing can be evicted now (blocks pinned by leases or reads, or held by puts "
            f"in flight); unpin blocks, wait for reads to finish, or give the tier more memory"
        )

    def _group_full_message(
        self, kind: TierKind, group: str, nbytes: int, evictable_bytes: int
    ) -> str:
        limit = self._limits[kind][group]
        used = self.group_used_bytes(kind, group)
        tier_key = f"{kind.name.lower()}_bytes"
        if group == SHARED:
            if len(self._limits[kind]) == 1:  # no quotas on this tier: the old, whole-tier case
                return self._full_message(kind, self._memory[kind], nbytes)
            logger.debug(
                "%s shared space full: %d B used, %d B evictable", kind.name, used, evictable_bytes
            )
            return (
                f"tenants without a {kind.name} quota share {human_bytes(limit)} of the "
                f"{kind.name} tier, and not enough of it can be evicted now: a block needs "
                f"{human_bytes(nbytes)}; unpin blocks, wait for reads and puts to finish, or "
                f"give the tenant a quota (quotas.TENANT.{tier_key})"
            )
        return (
            f"tenant {group!r} is at its {kind.name} quota ({human_bytes(limit)}, "
            f"{human_bytes(used)} used, {human_bytes(evictable_bytes)} evictable): a block "
            f"needs {human_bytes(nbytes)}; unpin its blocks, wait for its reads and puts to "
            f"finish, or raise quotas.{group}.{tier_key}"
        )

    def free(self, kind: TierKind, handle: object) -> None:
        """Give back space that never became a copy (a put's block that did not commit)."""
        self._tiers[kind].free(handle)

    def reserve_for_put(self, nbytes: int, usage: TenantUsage) -> object:
        """DRAM for a block a put of the tenant has started sending; counted in
        `put_reserved_bytes`, and as the tenant's, until `end_put_reservation`."""
        handle = self.allocate(TierKind.DRAM, nbytes, usage)
        footprint = self._dram.footprint_bytes(nbytes)
        self.put_reserved_bytes += footprint
        self._index.census.reserve(usage, TierKind.DRAM, footprint)
        return handle

    def end_put_reservation(self, nbytes: int, handle: object | None, usage: TenantUsage) -> None:
        """The block committed (its handle became a copy: pass None) or was dropped (its
        handle is freed)."""
        footprint = self._dram.footprint_bytes(nbytes)
        self.put_reserved_bytes -= footprint
        self._index.census.unreserve(usage, TierKind.DRAM, footprint)
        if handle is not None:
            self._dram.free(handle)

    def add_copy(
        self, entry: BlockEntry, kind: TierKind, handle: object, *, promoted: bool = True
    ) -> None:
        """Give an indexed block a copy in a memory tier it was promoted into (or, not
        `promoted`, demoted into from a faster one). A block that has one there already
        (two reads promoted it at once) keeps it, and the new copy is freed: a second
        copy would be memory no count knows of."""
        if kind in entry.copies:
            self._tiers[kind].free(handle)
            return
        fastest_before = entry.fastest
        entry.add_copy(kind, handle)
        if promoted:
            self._tiers[kind].counters.promotions += 1
        self.refresh(entry)
        self._tell_if_moved(entry, fastest_before)

    def drop_copy(self, entry: BlockEntry, kind: TierKind, *, demoted: bool = False) -> None:
        """Free the entry's copy in one tier; the last copy takes the block out of the index."""
        fastest_before = entry.fastest
        handle = entry.take_copy(kind)
        tier = self._tiers[kind]
        if demoted:
            tier.counters.demotions += 1
        else:
            tier.counters.evictions += 1
        tier.free(handle)
        if entry.copies:
            self.refresh(entry)
            self._tell_if_moved(entry, fastest_before)
        else:
            self._unindex(entry)
        parent = entry.parent
        if kind is TierKind.SSD and parent is not None and parent.is_indexed():
            self.refresh(parent)  # its SSD copy may leave now (SSD tail-first)

    def _unindex(self, entry: BlockEntry) -> None:
        usage = entry.namespace.usage
        for kind, queues in self._queues.items():
            queues[usage.group(kind)].discard(entry)
        self._leased.discard(entry)
        new_tail = self._index.remove(entry)
        if new_tail is not None:
            self.refresh(new_tail)
        self._free_if_empty(entry.namespace)
        if self.listener is not None:
            self.listener.block_changed(
                entry.namespace.namespace, BlockEventKind.REMOVED, entry.key, b"", None
            )

    def remove(self, entry: BlockEntry) -> None:
        """Take a chain tail out of the store, freeing every copy."""
        had_file = TierKind.SSD in entry.copies
        for kind in list(entry.copies):
            self._tiers[kind].free(entry.take_copy(kind))
        self._unindex(entry)
        parent = entry.parent
        if had_file and parent is not None and parent.is_indexed():
            self.refresh(parent)  # its SSD copy may leave now (SSD tail-first)

    def delete_subtree(self, roots: list[BlockEntry], now: float) -> tuple[int, int]:
        """Delete `roots` and every block chained below them, at once (`SubtreeDelete`);
        returns (blocks deleted, blocks left busy)."""
        deletion = SubtreeDelete(self, roots)
        while not deletion.step(now, _ALL):
            pass
        return deletion.num_deleted, deletion.num_busy

    # -- pins and leases ----------------------------------------------------------------

    def acquire_read(self, entries: list[BlockEntry]) -> None:
        census = self._index.census
        for entry in entries:
            entry.read_pins += 1
            if entry.read_pins == 1:
                census.read_pinned(entry)
                self.refresh(entry)

    def release_read(self, entries: list[BlockEntry]) -> None:
        census = self._index.census
        now = time.monotonic()
        for entry in entries:
            entry.read_pins -= 1
            if entry.read_pins == 0:
                census.read_unpinned(entry, now)
                self.refresh(entry)

    def extend_lease(self, entry: BlockEntry, expiry: float) -> None:
        """Keep the block resident until monotonic time `expiry`, at least."""
        entry.lease_expiry = max(entry.lease_expiry, expiry)
        self._index.census.lease_changed(entry, time.monotonic())
        self.refresh(entry)

    def end_lease(self, entry: BlockEntry, now: float) -> None:
        # Keep a non-zero past expiry: the session policy remembers the lease.
        entry.lease_expiry = min(entry.lease_expiry, now)
        self._index.census.lease_changed(entry, now)
        self.refresh(entry)

    def num_pinned(self, now: float) -> int:
        """Indexed blocks pinned at monotonic time `now` (a read or a lease); O(1) amortized."""
        return self._index.census.num_pinned(now)

    def num_blocks(self, kind: TierKind) -> int:
        """Indexed blocks with a copy in `kind`'s tier; O(1)."""
        return self._index.census.num_blocks(kind)

    def release_expired_leases(self) -> None:
        now = time.monotonic()
        for entry in [entry for entry in self._leased if entry.lease_expiry <= now]:
            self.refresh(entry)

    # -- SSD ----------------------------------------------------------------------------

    @property
    def num_ssd_writes(self) -> int:
        """SSD writes claimed or in flight (their blocks are pinned until they end)."""
        return len(self._ssd_writes)

    def reserve_ssd(
        self, nbytes: int, usage: TenantUsage | None = None, keep: BlockEntry | None = None
    ) -> bool:
        """Reserve `nbytes` on SSD for the tenant (None: one without a quota), dropping
        SSD copies as `eviction_needs` says, coldest first, but never `keep`'s (the parent
        of the block the room is for: until that block has its file, the parent's is a
        chain tail's, and a parent's file must outlive its children's); False if that
        cannot be done. A reservation counts as the tenant's until `end_ssd_reservation`."""
        ssd = self._ssd
        if ssd is None or nbytes > ssd.capacity_bytes:
            return False
        needs, short = self.eviction_needs(TierKind.SSD, nbytes, usage)
        if needs:
            self.release_expired_leases()  # leases that ended may queue victims again
        if short:
            return False
        census = self._index.census
        for group, needed_bytes in needs:
            quoted = census.tenant(group) if group != SHARED else None
            with self.victims(TierKind.SSD, group) as victims:
                # Chosen first, dropped only once they are enough: a reservation that
                # cannot be made evicts nothing for it. Except along a chain: SSD goes
                # tail first, so a block becomes a victim only once the file below it is
                # gone; when only that holds the rest back, the chosen go now.
                chosen: list[BlockEntry] = []
                while needed_bytes > 0:
                    victim = victims.take()
                    if victim is None:
                        if not any(_parent_on_ssd(entry) for entry in chosen):
                            for unused in chosen:
                                victims.keep(unused)
                            return False
                        self._drop_ssd_victims(chosen, quoted)
                        chosen = []
                        continue
                    if victim is keep:
                        victims.keep(victim)
                        continue
                    location = victim.copies[TierKind.SSD]
                    assert isinstance(location, SsdLocation)
                    needed_bytes -= location.nbytes
                    chosen.append(victim)
                self._drop_ssd_victims(chosen, quoted)
        if not ssd.reserve(nbytes):
            return False
        if usage is not None:
            census.reserve(usage, TierKind.SSD, nbytes)
        return True

    def _drop_ssd_victims(self, victims: list[BlockEntry], quoted: TenantUsage | None) -> None:
        for victim in victims:
            self.drop_copy(victim, TierKind.SSD)
            if quoted is not None:
                quoted.num_quota_evictions[TierKind.SSD] += 1

    def trim_ssd(self) -> int:
        """Drop the coldest SSD copies (chain tails first) until the tier is within its
        capacity, as after a restart with a smaller `ssd_bytes`; returns the bytes dropped."""
        ssd = self._ssd
        if ssd is None:
            return 0
        before = ssd.used_bytes
        self.reserve_ssd(0)
        return before - ssd.used_bytes

    def end_ssd_reservation(self, nbytes: int, usage: TenantUsage | None) -> None:
        """An SSD reservation was committed or released by the tier."""
        if usage is not None:
            self._index.census.unreserve(usage, TierKind.SSD, nbytes)

    def claim_ssd_write(self, entry: BlockEntry) -> bool:
        """Mark an in-memory block as being written to SSD, at once.

        From here until `write_to_ssd` ends, the block is pinned (no eviction can take
        its memory copy) and `wait_durable` waits for it: write-through claims at commit,
        so no gap is left before the write's task starts. False when the block cannot be
        written (no SSD, a degraded tier, already on SSD, gone); True if already claimed.
        """
        if entry in self._ssd_writes:
            return True
        ssd = self._ssd
        if (
            ssd is None
            or TierKind.SSD in entry.copies
            or not entry.is_indexed()
            or not _in_memory(entry)
            or not ssd.accepts_writes()
        ):
            return False
        self._ssd_writes[entry] = asyncio.Event()
        self.acquire_read([entry])
        return True

    async def write_to_ssd(self, entry: BlockEntry) -> bool:
        """Give an in-memory block its SSD copy; True once it has one.

        A write already in flight is awaited, not repeated; a claimed block is written
        by the first call after its claim. False when the block could not be written: no
        SSD room, the tier degraded, the block gone, or the write failed. Either way the
        entry ends up in the queues it belongs to (a victim popped off a queue must go
        back on it).
        """
        if TierKind.SSD in entry.copies:
            return True
        ended = self._ssd_writes.get(entry)
        if ended is not None and entry in self._ssd_writers:
            await ended.wait()
            return TierKind.SSD in entry.copies
        if ended is None:
            if not self.claim_ssd_write(entry):
                self.refresh(entry)
                return False
            ended = self._ssd_writes[entry]
        self._ssd_writers.add(entry)
        try:
            return await self._write_claimed(entry)
        finally:
            self._ssd_writers.discard(entry)
            del self._ssd_writes[entry]
            self.release_read([entry])  # re-queues the entry where it now belongs
            ended.set()

    async def _write_claimed(self, entry: BlockEntry) -> bool:
        ssd = self._ssd
        if ssd is None or not entry.is_indexed() or not _in_memory(entry):
            return False
        source = TierKind.DRAM if TierKind.DRAM in entry.copies else TierKind.HBM
        header = BlockFileHeader(
            namespace=entry.namespace.namespace,
            key=entry.key,
            parent_key=entry.parent.key if entry.parent is not None else b"",
            checksum_kind=ChecksumKind(entry.checksum_kind_value),
            layer_checksums=tuple(entry.layer_checksums),
            chain_root=entry.chain_root,
        )
        block_bytes = entry.layout.block_bytes
        payload = self._memory[source].read(entry.copies[source], 0, block_bytes)
        # Encoded before the reservation, so the tier accounts the file's real size.
        header, stored = await ssd.encode(header, payload)
        if not entry.is_indexed():
            return False
        location = ssd.location_for(header.namespace, entry.key, ssd.file_bytes(header))
        usage = entry.namespace.usage
        if not self.reserve_ssd(location.nbytes, usage, keep=entry.parent):
            return False
        try:
            await ssd.write(location, header, stored)
        except OSError as error:
            ssd.record_error(error, "writing a block")
            ssd.release(location)
            self.end_ssd_reservation(location.nbytes, usage)
            return False
        except BaseException:
            ssd.release(location)
            self.end_ssd_reservation(location.nbytes, usage)
            raise
        ssd.counters.bytes_written += block_bytes
        self.end_ssd_reservation(location.nbytes, usage)
        if not entry.is_indexed():
            ssd.release(location)
            ssd.discard_file(location)
            return False
        ssd.commit(location)
        # No event: the memory copy, read-pinned until now, stays the fastest.
        entry.add_copy(TierKind.SSD, location)
        return True

    async def read_from_ssd(
        self, entry: BlockEntry, first_layer: asyncio.Future[memoryview] | None = None
    ) -> bytearray:
        """The verified payload of the block's SSD copy; raises CorruptBlockFile or OSError.

        With `first_layer`, the block's layer 0, verified, is set there (a view of the
        payload) as soon as it is read, while the rest of the file is still being read.
        """
        ssd = self._ssd
        location = entry.copies.get(TierKind.SSD)
        if ssd is None or not isinstance(location, SsdLocation):
            raise CorruptBlockFile("no SSD copy")
        loop = asyncio.get_running_loop()

        def on_first_layer(header: BlockFileHeader, layer: memoryview) -> None:  # I/O thread
            if header.key != entry.key or list(header.layer_checksums) != entry.layer_checksums:
                raise CorruptBlockFile(f"{location.path} holds a different block")
            if first_layer is not None:
                loop.call_soon_threadsafe(_resolve, first_layer, layer)

        _, payload = await ssd.read(
            location, on_first_layer, entry.layout.layer_bytes, entry.namespace.namespace
        )
        ssd.counters.bytes_read += len(payload)
        return payload

    def drop_unreadable(
        self, entry: BlockEntry, error: BaseException, unserved: list[BlockEntry]
    ) -> None:
        """Drop an SSD copy that failed its read; `unserved` are the blocks of the same
        read that will no longer be served (their pins no longer hold them)."""
        assert self._ssd is not None
        self._ssd.record_error(error, "reading a block")
        if TierKind.SSD not in entry.copies:
            return
        if len(entry.copies) > 1:
            self.drop_copy(entry, TierKind.SSD)
            return
        # The only copy is unusable: the block goes, and every block chained below it.
        # Reads of it, this one included, cannot use it, so their pins do not hold it;
        # nor do this read's pins on the blocks it will no longer serve.
        # The pins come off and back through the census, which counts read-pinned blocks.
        census = self._index.census
        now = time.monotonic()
        for other in unserved:
            other.read_pins -= 1
            if other.read_pins == 0:
                census.read_unpinned(other, now)
        pins, entry.read_pins = entry.read_pins, 0
        if pins:
            census.read_unpinned(entry, now)
        try:
            self.delete_subtree([entry], now)
        finally:
            entry.read_pins = pins
            if pins:
                census.read_pinned(entry)
            for other in unserved:
                other.read_pins += 1
                if other.read_pins == 1:
                    census.read_pinned(other)

    async def wait_durable(self, entries: list[BlockEntry]) -> Durability:
        """Wait until each committed block is as durable as the write policy makes it,
        and say what all of them are: the one home of "a block is acknowledged only once
        it is durable". The put path awaits it before answering COMMITTED.

        Write-back: durable in memory, which commit ensures. Write-through: each block's
        SSD write (claimed at commit) must end; a block the SSD could not take (no room,
        degraded, not admitted) leaves the whole put durable in memory only.
        """
        durability = self.policy_durability
        if durability is Durability.DURABLE_IN_MEMORY:
            return durability
        for entry in entries:
            ended = self._ssd_writes.get(entry)
            if ended is not None:
                await ended.wait()
        # A block file whose parent has none is dropped at restart: the chain above each
        # block must be on SSD too (the write-through writes put it there first).
        if not all(TierKind.SSD in entry.copies for entry in _with_ancestors(entries)):
            return Durability.DURABLE_IN_MEMORY
        return durability

    @property
    def policy_durability(self) -> Durability:
        """What the write policy makes a committed block, when the SSD takes it."""
        if self._ssd is None or self._config.write_policy != "write-through":
            return Durability.DURABLE_IN_MEMORY
        if self._config.ssd_fsync:
            return Durability.DURABLE_ON_SSD_FSYNCED
        return Durability.DURABLE_ON_SSD

    def close(self) -> None:
        """Stop the SSD tier's I/O threads once the I/O in flight is done."""
        if self._ssd is not None:
            self._ssd.close()


def _has_child_on_ssd(entry: BlockEntry) -> bool:
    return any(TierKind.SSD in child.copies for child in entry.children or ())


def _with_ancestors(entries: list[BlockEntry]) -> list[BlockEntry]:
    """The entries and every block above them, each once."""
    seen: set[int] = set()
    found: list[BlockEntry] = []
    for entry in entries:
        node: BlockEntry | None = entry
        while node is not None and id(node) not in seen:
            seen.add(id(node))
            found.append(node)
            node = node.parent
    return found


def _in_memory(entry: BlockEntry) -> bool:
    return TierKind.DRAM in entry.copies or TierKind.HBM in entry.copies


def _resolve(future: asyncio.Future[memoryview], layer: memoryview) -> None:
    if not future.done():  # a cancelled read drops its first layer
        future.set_result(layer)


def _parent_on_ssd(entry: BlockEntry) -> bool:
    return entry.parent is not None and TierKind.SSD in entry.parent.copies
