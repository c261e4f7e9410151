"""BlockStore: the facade over the index, the tiers and eviction.

Callers hand it namespaces and keys and get plain results back; the data structures
stay inside. It is not thread-safe: the server calls it from one event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvstore.errors import CapacityExhausted, InvalidRequest
from kvstore.eviction import POLICIES, EvictionQueue
from kvstore.index import BlockEntry, BlockIndex, NamespaceState
from kvstore.keys import validate_key
from kvstore.layout import Namespace
from kvstore.tiers.base import TierCounters, TierKind
from kvstore.tiers.dram import DramTier

MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    dram_bytes: int = 1024 * MiB
    page_bytes: int = 64 * 1024
    eviction_policy: str = "lru"
    max_lease_s: float = 3600.0
    pin_memory: bool = False

    def __post_init__(self) -> None:
        if self.eviction_policy not in POLICIES:
            raise InvalidRequest(
                f"unknown eviction policy {self.eviction_policy!r}; choose from {sorted(POLICIES)}"
            )
        if self.max_lease_s <= 0:
            raise InvalidRequest(f"max_lease_s must be > 0, got {self.max_lease_s}")


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """The longest stored prefix of a key chain."""

    num_matched: int
    tiers: tuple[TierKind, ...]
    block_bytes: int


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
        self.dram = DramTier(config.dram_bytes, config.page_bytes, pin_memory=config.pin_memory)
        self.counters = StoreCounters()
        self._queue = EvictionQueue(POLICIES[config.eviction_policy])
        self._clock = _Clock()
        # Leased tails leave the queue while their lease runs; they come back when
        # an eviction pass finds the lease expired.
        self._leased_tails: set[BlockEntry] = set()

    # -- lookups -----------------------------------------------------------------

    def lookup(self, namespace: Namespace, keys: list[bytes]) -> PrefixMatch:
        for key in keys:
            validate_key(key)
        found = self.index.present_prefix(self.index.find_namespace(namespace), keys)
        self.counters.lookups += 1
        self.counters.lookup_keys += len(keys)
        self.counters.lookup_hits += len(found)
        self.touch(found)
        return PrefixMatch(
            num_matched=len(found),
            tiers=tuple(self.tier_of(entry) for entry in found),
            block_bytes=namespace.layout.block_bytes,
        )

    def find_prefix(self, namespace: Namespace, keys: list[bytes]) -> list[BlockEntry]:
        return self.index.present_prefix(self.index.find_namespace(namespace), keys)

    def tier_of(self, entry: BlockEntry) -> TierKind:
        return min(entry.copies, key=lambda kind: kind.value)

    def touch(self, chain: list[BlockEntry]) -> None:
        """Mark a chain used. The head gets the newest tick, so under LRU its tail goes first."""
        now = time.monotonic()
        for entry in reversed(chain):
            self._clock.tick += 1
            entry.last_access = self._clock.tick
            if entry.queue_token is not None:
                self._queue.push(entry, now)

    # -- space -------------------------------------------------------------------

    def allocate_dram(self, nbytes: int) -> object:
        """A DRAM handle for `nbytes`, evicting chain tails until one fits."""
        if nbytes > self.dram.capacity_bytes:
            # Evicting could never make room: fail before harming any stored block.
            raise CapacityExhausted(
                f"a block of this layout is {nbytes} B, larger than the whole DRAM tier "
                f"({self.dram.capacity_bytes} B); use fewer tokens per block or more memory"
            )
        handle = self.dram.allocate(nbytes)
        if handle is not None:
            return handle
        self._release_expired_leases()
        while handle is None:
            victim = self._queue.pop()
            if victim is None:
                raise CapacityExhausted(self._full_message(nbytes))
            if not self._evictable(victim, time.monotonic()):
                self._park(victim)
                continue
            self._evict(victim)
            handle = self.dram.allocate(nbytes)
        return handle

    def _full_message(self, nbytes: int) -> str:
        now = time.monotonic()
        pinned = sum(1 for entry in self.index.entries() if entry.is_pinned(now))
        in_flight = self.dram.used_bytes - sum(
            self.dram.arena.pages_for(entry.namespace.namespace.layout.block_bytes)
            * self.dram.arena.page_bytes
            for entry in self.index.entries()
            if TierKind.DRAM in entry.copies
        )
        return (
            f"DRAM tier is full: a block needs {nbytes} B, {self.dram.arena.free_bytes} B are "
            f"free of {self.dram.capacity_bytes} B and nothing can be evicted "
            f"({pinned} blocks pinned by leases or reads, {in_flight} B held by puts in "
            f"flight); unpin blocks, wait for reads to finish, or give the tier more memory"
        )

    def _evictable(self, entry: BlockEntry, now: float) -> bool:
        return entry.num_children == 0 and not entry.is_pinned(now)

    def _park(self, entry: BlockEntry) -> None:
        # A pinned tail: leases come back by expiry (checked per eviction pass),
        # read pins by release_read (which pushes the entry again).
        if entry.lease_expiry > time.monotonic():
            self._leased_tails.add(entry)

    def _release_expired_leases(self) -> None:
        now = time.monotonic()
        expired = [entry for entry in self._leased_tails if entry.lease_expiry <= now]
        for entry in expired:
            self._leased_tails.discard(entry)
            self._enqueue_if_evictable(entry, now)

    def _enqueue_if_evictable(self, entry: BlockEntry, now: float) -> None:
        if entry.namespace.blocks.get(entry.key) is not entry:
            return
        if self._evictable(entry, now):
            self._queue.push(entry, now)
        elif entry.num_children == 0 and entry.lease_expiry > now:
            self._leased_tails.add(entry)

    def _evict(self, entry: BlockEntry) -> None:
        self.dram.counters.evictions += 1
        self._remove(entry)

    def _remove(self, entry: BlockEntry) -> None:
        self._queue.discard(entry)
        self._leased_tails.discard(entry)
        for kind, handle in entry.copies.items():
            if kind is TierKind.DRAM:
                self.dram.free(handle)
        entry.copies.clear()
        new_tail = self.index.remove(entry)
        if new_tail is not None:
            self._enqueue_if_evictable(new_tail, time.monotonic())

    # -- commits (called by PutSession) -------------------------------------------

    def commit(self, entry: BlockEntry) -> None:
        self.index.insert(entry)
        self.counters.blocks_put += 1
        self.counters.bytes_put += entry.namespace.namespace.layout.block_bytes
        self._clock.tick += 1
        entry.last_access = self._clock.tick
        if entry.parent is not None:
            # The parent is no longer a chain tail, so no longer a candidate.
            self._queue.discard(entry.parent)
            self._leased_tails.discard(entry.parent)
        self._enqueue_if_evictable(entry, time.monotonic())

    def namespace_state(self, namespace: Namespace) -> NamespaceState:
        return self.index.namespace(namespace)

    # -- pins ----------------------------------------------------------------------

    def acquire_read(self, entries: list[BlockEntry]) -> None:
        for entry in entries:
            entry.read_pins += 1

    def release_read(self, entries: list[BlockEntry]) -> None:
        now = time.monotonic()
        for entry in entries:
            entry.read_pins -= 1
            if entry.read_pins == 0 and entry.queue_token is None:
                self._enqueue_if_evictable(entry, now)

    def pin(self, namespace: Namespace, keys: list[bytes], ttl_s: float) -> tuple[int, float]:
        """Lease the present blocks among `keys`; returns (count, wall-clock expiry)."""
        if ttl_s <= 0:
            raise InvalidRequest(f"ttl must be > 0, got {ttl_s}")
        ttl_s = min(ttl_s, self.config.max_lease_s)
        for key in keys:
            validate_key(key)
        state = self.index.find_namespace(namespace)
        now = time.monotonic()
        num_pinned = 0
        for key in keys:
            entry = state.blocks.get(key) if state is not None else None
            if entry is None:
                continue
            entry.lease_expiry = max(entry.lease_expiry, now + ttl_s)
            self._queue.discard(entry)
            if entry.num_children == 0:
                self._leased_tails.add(entry)
            num_pinned += 1
        return num_pinned, time.time() + ttl_s

    def unpin(self, namespace: Namespace, keys: list[bytes]) -> int:
        for key in keys:
            validate_key(key)
        state = self.index.find_namespace(namespace)
        now = time.monotonic()
        num_unpinned = 0
        for key in keys:
            entry = state.blocks.get(key) if state is not None else None
            if entry is None or entry.lease_expiry <= now:
                continue
            # Keep a non-zero past expiry: the session policy remembers the lease.
            entry.lease_expiry = min(entry.lease_expiry, now)
            self._leased_tails.discard(entry)
            if entry.queue_token is None:
                self._enqueue_if_evictable(entry, now)
            num_unpinned += 1
        return num_unpinned

    # -- deletes ---------------------------------------------------------------------

    def delete(self, namespace: Namespace, keys: list[bytes]) -> DeleteResult:
        """Delete each key's block and every block chained below it; pinned ones stay."""
        for key in keys:
            validate_key(key)
        result = DeleteResult()
        state = self.index.find_namespace(namespace)
        if state is None:
            return result
        now = time.monotonic()
        for key in keys:
            root = state.blocks.get(key)
            if root is not None:
                self._delete_subtree(state, root, now, result)
        return result

    def _delete_subtree(
        self, state: NamespaceState, root: BlockEntry, now: float, result: DeleteResult
    ) -> None:
        subtree = [entry for entry in state.blocks.values() if _descends_from(entry, root)]
        # Deepest first, so every removal takes a chain tail.
        subtree.sort(key=lambda entry: entry.depth, reverse=True)
        for entry in subtree:
            if entry.is_pinned(now) or entry.num_children:
                result.num_busy += 1
                continue
            self._remove(entry)
            result.num_deleted += 1

    # -- reporting -------------------------------------------------------------------

    def report(self) -> StoreReport:
        now = time.monotonic()
        entries = self.index.entries()
        dram = TierReport(
            kind=TierKind.DRAM,
            name=self.dram.name,
            capacity_bytes=self.dram.capacity_bytes,
            used_bytes=self.dram.used_bytes,
            num_blocks=sum(1 for entry in entries if TierKind.DRAM in entry.copies),
            counters=self.dram.counters,
        )
        return StoreReport(
            tiers=(dram,),
            counters=self.counters,
            num_namespaces=self.index.num_namespaces,
            num_pinned=sum(1 for entry in entries if entry.is_pinned(now)),
            uptime_s=now - self._clock.started,
        )


def _descends_from(entry: BlockEntry | None, root: BlockEntry) -> bool:
    while entry is not None:
        if entry is root:
            return True
        entry = entry.parent
    return False
