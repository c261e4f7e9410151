"""WatchBlocks' fan-out: the store's block events (kvstore.events) to each watcher's queue.

The hub is the store's listener while anyone watches (and only then, so a store nobody
watches pays nothing per block). It hands each event to the watchers of its namespace
at once, on the store's loop, and never waits: a watcher's queue holds at most
`limits.watch_queue_events` live events. A watcher that falls further behind loses
them all: its queue is emptied, it stops queuing, and the next time it takes events it
gets a GAP and a fresh snapshot instead. So a slow watcher costs the puts nothing but
the hand-off, and its memory is bounded.

Sequence numbers count every event a watcher was due, the dropped ones too: a watcher
sees a jump exactly where events were lost. A snapshot is taken in the same step as a
watcher starts (or resyncs) to queue live events, so no change falls between the two.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager

from kvstore.enums import TierKind
from kvstore.errors import CapacityExhausted
from kvstore.events import BlockEvent, BlockEventKind
from kvstore.layout import Namespace
from kvstore.server.config import Limits
from kvstore.store import BlockStore

_SNAPSHOT_END = BlockEvent(BlockEventKind.SNAPSHOT_END)
_GAP = BlockEvent(BlockEventKind.GAP)


class Watcher:
    """One WatchBlocks stream's queue: a snapshot first, then live events, bounded."""

    def __init__(self, store: BlockStore, namespace: Namespace, max_queued_events: int) -> None:
        self.namespace = namespace
        self._store = store
        self._max_queued = max_queued_events
        self._events: deque[BlockEvent] = deque()
        self._num_snapshot_queued = 0  # snapshot events at the head of _events: unbounded
        self._next_sequence = 1  # the number the next event due gets
        self._lost = False  # events were dropped: the next take resyncs
        self.num_gaps = 0
        self._ready = asyncio.Event()
        self._queue_snapshot()

    def _queue_snapshot(self, *, after_gap: bool = False) -> None:
        events = self._store.snapshot(self.namespace)
        if after_gap:
            events.insert(0, _GAP)
        events.append(_SNAPSHOT_END)
        self._events.extend(events)
        self._num_snapshot_queued = len(self._events)
        self._next_sequence += len(events)
        self._ready.set()

    def push(self, event: BlockEvent) -> None:
        """Queue a live event, or drop it (and every event queued) past the bound."""
        self._next_sequence += 1
        if self._lost:
            return
        if len(self._events) - self._num_snapshot_queued >= self._max_queued:
            self._events.clear()
            self._num_snapshot_queued = 0
            self._lost = True
            self.num_gaps += 1
        else:
            self._events.append(event)
        self._ready.set()

    async def take(self, max_events: int) -> tuple[int, list[BlockEvent]]:
        """(sequence number of the first, up to `max_events` events), once there are any."""
        while not self._events and not self._lost:
            self._ready.clear()
            await self._ready.wait()
        if self._lost:
            self._lost = False
            self._queue_snapshot(after_gap=True)
        events = self._events
        first_sequence = self._next_sequence - len(events)
        count = min(max_events, len(events))
        batch = [events.popleft() for _ in range(count)]
        self._num_snapshot_queued = max(0, self._num_snapshot_queued - count)
        return first_sequence, batch


class WatchHub:
    """The store's listener while watchers exist; admits them within the limits."""

    def __init__(self, store: BlockStore, limits: Limits) -> None:
        self._store = store
        self._limits = limits
        self._by_namespace: dict[Namespace, list[Watcher]] = {}
        self._num_by_tenant: Counter[str] = Counter()
        self._num_watchers = 0

    @property
    def num_watchers(self) -> int:
        return self._num_watchers

    @contextmanager
    def watch(self, namespace: Namespace) -> Iterator[Watcher]:
        """A watcher of `namespace` for the `with` block; CapacityExhausted past the
        limits (counted per namespace tenant)."""
        limits = self._limits
        tenant = namespace.tenant
        if self._num_watchers >= limits.max_watchers:
            raise CapacityExhausted(
                f"the server has {self._num_watchers} WatchBlocks streams open, its limit "
                f"(limits.max_watchers); close a watcher or raise the limit"
            )
        if self._num_by_tenant[tenant] >= limits.max_watchers_per_tenant:
            raise CapacityExhausted(
                f"tenant {tenant!r} has {self._num_by_tenant[tenant]} WatchBlocks streams "
                f"open, the per-tenant limit (limits.max_watchers_per_tenant); share one "
                f"watch per namespace among routers, or raise the limit"
            )
        watcher = Watcher(self._store, namespace, limits.watch_queue_events)
        self._by_namespace.setdefault(namespace, []).append(watcher)
        self._num_by_tenant[tenant] += 1
        self._num_watchers += 1
        self._store.listener = self
        try:
            yield watcher
        finally:
            watchers = self._by_namespace[namespace]
            watchers.remove(watcher)
            if not watchers:
                del self._by_namespace[namespace]
            self._num_by_tenant[tenant] -= 1
            if not self._num_by_tenant[tenant]:
                del self._num_by_tenant[tenant]
            self._num_watchers -= 1
            if not self._num_watchers:
                self._store.listener = None

    def block_changed(
        self,
        namespace: Namespace,
        kind: BlockEventKind,
        key: bytes,
        parent_key: bytes,
        tier: TierKind | None,
    ) -> None:
        watchers = self._by_namespace.get(namespace)
        if watchers is None:
            return
        event = BlockEvent(kind, key, parent_key, tier)
        for watcher in watchers:
            watcher.push(event)
