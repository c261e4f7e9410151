"""BlockStore: the facade over the index, the tiers and eviction.

Callers hand it namespaces and keys and get plain results back; the data structures
stay inside. It is not thread-safe: the server calls it from one event loop, and SSD
I/O runs on worker threads through kvstore.mover, which reports back on that loop.

Invariants:
- A block is findable while it has a copy in at least one tier.
- A copy leaves a tier only if the block keeps another copy, or the block is a chain
  tail (no children): so a child is never findable without its parent.
- Pinned blocks (a lease, a read or an SSD write in flight) keep every copy.
"""

from __future__ import annotations

import itertools
import operator
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kvstore.config import StoreConfig
from kvstore.enums import TierKind
from kvstore.errors import CapacityExhausted, InvalidRequest
from kvstore.eviction import POLICIES, EvictionQueue
from kvstore.index import BlockEntry, BlockIndex, NamespaceState
from kvstore.keys import validate_keys
from kvstore.layout import Namespace
from kvstore.tiers.base import MemoryTier, TierCounters
from kvstore.tiers.dram import DramTier
from kvstore.tiers.hbm import HbmTier, resolve_device
from kvstore.tiers.ssd import SsdLocation, SsdTier

_FASTEST = operator.attrgetter("fastest")
# Deferred touches settle by themselves past this many, should nobody settle them.
_MAX_UNTOUCHED = 64

__all__ = ["BlockStore", "PrefixMatch", "StoreConfig", "StoreReport", "TierReport"]


class StoreListener(Protocol):
    """What kvstore.mover hears from the store (it owns every SSD read and write)."""

    def committed(self, entry: BlockEntry) -> None: ...

    def ssd_copy_dropped(self, location: SsdLocation) -> None: ...


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """The longest stored prefix of a key chain."""

    num_matched: int
    # Fastest tier of each matched block, run-length encoded: (tier, number of blocks).
    tier_runs: tuple[tuple[TierKind, int], ...]
    block_bytes: int

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


@dataclass(frozen=True, slots=True)
class StoreReport:
    tiers: tuple[TierReport, ...]
    counters: StoreCounters
    num_namespaces: int
    num_pinned: int
    uptime_s: float


@dataclass(slots=True)
class DeleteResult:
    num_deleted: int = 0
    num_busy: int = 0


@dataclass(slots=True)
class _Clock:
    tick: int = 0
    started: float = field(default_factory=time.monotonic)


class BlockStore:
    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.index = BlockIndex()
        self.counters = StoreCounters()
        self.dram = DramTier(config.dram_bytes, config.page_bytes, pin_memory=config.pin_memory)
        self.hbm: HbmTier | None = None
        if config.hbm_bytes:
            device = resolve_device(config.hbm_device)
            self.hbm = HbmTier(config.hbm_bytes, config.page_bytes, device)
        self.ssd: SsdTier | None = None
        if config.ssd_dir is not None:
            self.ssd = SsdTier(Path(config.ssd_dir), config.ssd_bytes, fsync=config.ssd_fsync)
        priority = POLICIES[config.eviction_policy]
        self.queues = {kind: EvictionQueue(priority) for kind in self.tier_kinds}
        self._clock = _Clock()
        # num_seen feeds the SSD admission filter and HBM promotion; nothing else reads it.
        self._counts_sightings = config.ssd_admit_after_seen > 1 or self.hbm is not None
        # Leased entries sit outside the queues until an eviction pass finds them expired.
        self._leased: set[BlockEntry] = set()
        # Deferred touches: (chain, its newest tick), oldest first.
        self._untouched: list[tuple[list[BlockEntry], int]] = []
        self.listener: StoreListener | None = None

    @property
    def has_ssd(self) -> bool:
        """Whether the store has an SSD tier."""
        return self.ssd is not None

    @property
    def tier_kinds(self) -> list[TierKind]:
        kinds = [TierKind.DRAM]
        if self.hbm is not None:
            kinds.insert(0, TierKind.HBM)
        if self.ssd is not None:
            kinds.append(TierKind.SSD)
        return kinds

    def memory_tier(self, kind: TierKind) -> MemoryTier:
        if kind is TierKind.HBM and self.hbm is not None:
            return self.hbm
        if kind is TierKind.DRAM:
            return self.dram
        raise KeyError(kind)

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
        found = self.find_prefix(namespace, keys)
        # Found keys were valid when they were put: only the rest need checking.
        validate_keys(keys, start=len(found))
        self.counters.lookups += 1
        self.counters.lookup_keys += len(keys)
        self.counters.lookup_hits += len(found)
        tier_runs = self.tier_runs(found)
        self.record_hits(tier_runs, len(found), missed=len(found) < len(keys))
        if defer_touch and not self._counts_sightings:
            self._touch_later(found)
        else:
            self.touch(found)
        return PrefixMatch(
            num_matched=len(found),
            tier_runs=tier_runs,
            block_bytes=namespace.layout.block_bytes,
        )

    def find_prefix(self, namespace: Namespace, keys: list[bytes]) -> list[BlockEntry]:
        return self.index.present_prefix(self.index.find_namespace(namespace), keys)

    def tier_of(self, entry: BlockEntry) -> TierKind:
        """The fastest tier holding the block."""
        return entry.fastest

    def tiers_of(self, entries: list[BlockEntry]) -> list[TierKind]:
        return list(map(_FASTEST, entries))

    def tier_runs(self, entries: list[BlockEntry]) -> tuple[tuple[TierKind, int], ...]:
        """(tier, count) for each run of consecutive entries whose fastest copy is there."""
        if not entries:
            return ()
        if len(self.tier_kinds) == 1:
            return ((self.tier_kinds[0], len(entries)),)
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
        for kind in self.tier_kinds:
            counters = self.counters_of(kind)
            hits = served.get(kind, 0)
            counters.hits += hits
            slower -= hits
            counters.misses += slower

    def touch(self, chain: list[BlockEntry]) -> None:
        """Mark a chain used (and seen once more, where a policy counts sightings).

        The head gets the newest tick, so under LRU its tail goes first.
        """
        self._clock.tick += len(chain)
        self._apply_touch(chain, self._clock.tick)

    def _touch_later(self, chain: list[BlockEntry]) -> None:
        if not chain:
            return
        # The ticks are taken now, so the chain ranks where an immediate touch puts it.
        self._clock.tick += len(chain)
        self._untouched.append((chain, self._clock.tick))
        if len(self._untouched) >= _MAX_UNTOUCHED:
            self.settle_touches()

    def settle_touches(self) -> None:
        """Apply the touches `lookup(defer_touch=True)` left; victims are chosen after."""
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
        if self._counts_sightings:
            for entry in chain:
                entry.num_seen += 1
        # Only chain tails and blocks with spare copies sit in queues: re-rank just those.
        now = time.monotonic()
        for queue in self.queues.values():
            queue.touch_many(chain, now)

    def victim_queue(self, kind: TierKind) -> EvictionQueue:
        """The tier's eviction queue, ranked by every use so far: take victims from here."""
        self.settle_touches()
        return self.queues[kind]

    def counters_of(self, kind: TierKind) -> TierCounters:
        if kind is TierKind.SSD:
            assert self.ssd is not None
            return self.ssd.counters
        return self.memory_tier(kind).counters

    # -- space -------------------------------------------------------------------

    def allocate_dram(self, nbytes: int) -> object:
        return self.allocate(TierKind.DRAM, nbytes)

    def allocate(self, kind: TierKind, nbytes: int) -> object:
        """A handle in a memory tier for `nbytes`, evicting from that tier until one fits."""
        tier = self.memory_tier(kind)
        if nbytes > tier.capacity_bytes:
            # Evicting could never make room: leave every stored block alone.
            raise CapacityExhausted(
                f"a block of {nbytes} B is larger than the whole {kind.name} tier "
                f"({tier.capacity_bytes} B); give the tier more memory or use smaller blocks"
            )
        handle = tier.allocate(nbytes)
        if handle is not None:
            return handle
        self.release_expired_leases()
        # Victims that could only leave by a demotion (an SSD write) wait for kvstore.mover.
        kept: list[BlockEntry] = []
        try:
            while handle is None:
                victim = self.victim_queue(kind).pop()
                if victim is None:
                    raise CapacityExhausted(self._full_message(kind, tier, nbytes))
                if not self.evictable_from(victim, kind, time.monotonic()):
                    self.refresh(victim)
                elif self.droppable(victim):
                    self.drop_copy(victim, kind)
                    handle = tier.allocate(nbytes)
                else:
                    kept.append(victim)
        finally:
            for entry in kept:
                self.refresh(entry)
        return handle

    def _full_message(self, kind: TierKind, tier: MemoryTier, nbytes: int) -> str:
        now = time.monotonic()
        pinned = sum(1 for entry in self.index.entries() if entry.is_pinned(now))
        free = tier.capacity_bytes - tier.used_bytes
        return (
            f"{kind.name} tier is full: a block needs {nbytes} B, {free} B are free of "
            f"{tier.capacity_bytes} B and nothing can be evicted ({pinned} blocks "
            f"pinned by leases or reads; the rest is held by puts in flight); unpin blocks, wait "
            f"for reads to finish, or give the tier more memory"
        )

    def evictable_from(self, entry: BlockEntry, kind: TierKind, now: float) -> bool:
        """Whether the entry belongs in the tier's queue: it could leave, now or by demotion."""
        if kind not in entry.copies or entry.is_pinned(now):
            return False
        return self.droppable(entry) or (kind is TierKind.DRAM and self.demotable(entry))

    def droppable(self, entry: BlockEntry) -> bool:
        """A copy can go at once: another copy remains, or the block is a chain tail."""
        return len(entry.copies) > 1 or entry.num_children == 0

    def demotable(self, entry: BlockEntry) -> bool:
        """Write-back may move the block's only copy from DRAM to SSD."""
        return (
            self.ssd is not None
            and self.config.write_policy == "write-back"
            and entry.num_seen >= self.config.ssd_admit_after_seen
        )

    def refresh(self, entry: BlockEntry) -> None:
        """Put the entry in exactly the queues of the tiers it could now leave."""
        now = time.monotonic()
        indexed = entry.is_indexed()
        for kind, queue in self.queues.items():
            if indexed and self.evictable_from(entry, kind, now):
                queue.add(entry, now)
            else:
                queue.discard(entry)
        if indexed and entry.read_pins == 0 and entry.lease_expiry > now:
            self._leased.add(entry)
        else:
            self._leased.discard(entry)

    def release_expired_leases(self) -> None:
        now = time.monotonic()
        for entry in [entry for entry in self._leased if entry.lease_expiry <= now]:
            self.refresh(entry)

    def drop_copy(self, entry: BlockEntry, kind: TierKind, *, demoted: bool = False) -> None:
        """Free the entry's copy in one tier; the last copy takes the block out of the index."""
        handle = entry.take_copy(kind)
        counters = self.counters_of(kind)
        if demoted:
            counters.demotions += 1
        else:
            counters.evictions += 1
        self._free(kind, handle)
        if entry.copies:
            self.refresh(entry)
        else:
            self._unindex(entry)

    def _free(self, kind: TierKind, handle: object) -> None:
        if kind is TierKind.SSD:
            assert self.ssd is not None
            assert isinstance(handle, SsdLocation)
            self.ssd.used -= handle.nbytes
            if self.listener is not None:
                self.listener.ssd_copy_dropped(handle)
            else:
                handle.path.unlink(missing_ok=True)
            return
        self.memory_tier(kind).free(handle)

    def _unindex(self, entry: BlockEntry) -> None:
        for queue in self.queues.values():
            queue.discard(entry)
        self._leased.discard(entry)
        new_tail = self.index.remove(entry)
        if new_tail is not None:
            self.refresh(new_tail)

    def remove(self, entry: BlockEntry) -> None:
        """Take a chain tail out of the store, freeing every copy."""
        for kind in list(entry.copies):
            self._free(kind, entry.take_copy(kind))
        self._unindex(entry)

    # -- commits ---------------------------------------------------------------------

    def commit(self, entry: BlockEntry) -> None:
        """Make a complete, verified block findable."""
        self.index.insert(entry)
        self.counters.blocks_put += 1
        self.counters.bytes_put += entry.namespace.namespace.layout.block_bytes
        self._clock.tick += 1
        entry.last_access = self._clock.tick
        if entry.parent is not None:
            self.refresh(entry.parent)
        self.refresh(entry)
        if self.listener is not None:
            self.listener.committed(entry)

    def namespace_state(self, namespace: Namespace) -> NamespaceState:
        return self.index.namespace(namespace)

    # -- pins ----------------------------------------------------------------------

    def acquire_read(self, entries: list[BlockEntry]) -> None:
        for entry in entries:
            entry.read_pins += 1
            if entry.read_pins == 1:
                self.refresh(entry)

    def release_read(self, entries: list[BlockEntry]) -> None:
        for entry in entries:
            entry.read_pins -= 1
            if entry.read_pins == 0:
                self.refresh(entry)

    def pin(self, namespace: Namespace, keys: list[bytes], ttl_s: float) -> tuple[int, float]:
        """Lease the present blocks among `keys`; returns (count, wall-clock expiry)."""
        if ttl_s <= 0:
            raise InvalidRequest(f"ttl must be > 0, got {ttl_s}")
        ttl_s = min(ttl_s, self.config.max_lease_s)
        validate_keys(keys)
        state = self.index.find_namespace(namespace)
        now = time.monotonic()
        num_pinned = 0
        for key in keys:
            entry = state.blocks.get(key) if state is not None else None
            if entry is None:
                continue
            entry.lease_expiry = max(entry.lease_expiry, now + ttl_s)
            self.refresh(entry)
            num_pinned += 1
        return num_pinned, time.time() + ttl_s

    def unpin(self, namespace: Namespace, keys: list[bytes]) -> int:
        validate_keys(keys)
        state = self.index.find_namespace(namespace)
        now = time.monotonic()
        num_unpinned = 0
        for key in keys:
            entry = state.blocks.get(key) if state is not None else None
            if entry is None or entry.lease_expiry <= now:
                continue
            # Keep a non-zero past expiry: the session policy remembers the lease.
            entry.lease_expiry = min(entry.lease_expiry, now)
            self.refresh(entry)
            num_unpinned += 1
        return num_unpinned

    # -- deletes ---------------------------------------------------------------------

    def delete(self, namespace: Namespace, keys: list[bytes]) -> DeleteResult:
        """Delete each key's block and every block chained below it; pinned ones stay."""
        validate_keys(keys)
        result = DeleteResult()
        state = self.index.find_namespace(namespace)
        if state is None:
            return result
        roots = [root for key in keys if (root := state.blocks.get(key)) is not None]
        if roots:
            self.delete_subtree(state, roots, time.monotonic(), result)
        return result

    def delete_subtree(
        self,
        state: NamespaceState,
        roots: BlockEntry | list[BlockEntry],
        now: float,
        result: DeleteResult,
    ) -> None:
        """Delete `roots` and every block chained below them, each block once (keys of
        one chain share their subtrees), in one pass over the namespace."""
        root_ids = {id(root) for root in (roots if isinstance(roots, list) else [roots])}
        subtree = _descendants(state.blocks.values(), root_ids)
        # Deepest first, so every removal takes a chain tail.
        subtree.sort(key=lambda entry: entry.depth, reverse=True)
        for entry in subtree:
            if entry.is_pinned(now) or entry.num_children:
                result.num_busy += 1
                continue
            self.remove(entry)
            result.num_deleted += 1

    # -- reporting -------------------------------------------------------------------

    def report(self) -> StoreReport:
        now = time.monotonic()
        entries = self.index.entries()
        reports = []
        for kind in self.tier_kinds:
            if kind is TierKind.SSD:
                assert self.ssd is not None
                tier_name, capacity, used = (
                    self.ssd.name,
                    self.ssd.capacity_bytes,
                    self.ssd.used_bytes,
                )
                degraded = self.ssd.degraded
            else:
                tier = self.memory_tier(kind)
                tier_name, capacity, used = tier.name, tier.capacity_bytes, tier.used_bytes
                degraded = False
            reports.append(
                TierReport(
                    kind=kind,
                    name=tier_name,
                    capacity_bytes=capacity,
                    used_bytes=used,
                    num_blocks=sum(1 for entry in entries if kind in entry.copies),
                    counters=self.counters_of(kind),
                    degraded=degraded,
                )
            )
        return StoreReport(
            tiers=tuple(reports),
            counters=self.counters,
            num_namespaces=self.index.num_namespaces,
            num_pinned=sum(1 for entry in entries if entry.is_pinned(now)),
            uptime_s=now - self._clock.started,
        )


def _descendants(entries: Iterable[BlockEntry], root_ids: set[int]) -> list[BlockEntry]:
    """The entries that are, or descend from, an entry whose id() is in `root_ids`.

    Each ancestor's verdict is remembered, so the pass costs O(entries), not
    O(entries x chain depth).
    """
    verdicts: dict[int, bool] = {}
    found: list[BlockEntry] = []
    for entry in entries:
        path: list[BlockEntry] = []
        node: BlockEntry | None = entry
        while node is not None and id(node) not in verdicts:
            if id(node) in root_ids:
                verdicts[id(node)] = True
                break
            path.append(node)
            node = node.parent
        verdict = node is not None and verdicts[id(node)]
        for visited in path:
            verdicts[id(visited)] = verdict
        if verdict:
            found.append(entry)
    return found
