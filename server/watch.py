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
watcher starts (or resyncs) to queue live events, so no change falls between the two;
its events are built as they are sent (`Watcher`).
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager

from kvstore.enums import TierKind
from kvstore.errors import CapacityExhausted
from kvstore.events import BlockEvent, BlockEventKind
from kvstore.index import BlockEntry
from kvstore.layout import Namespace
from kvstore.server.config import Limits
from kvstore.store import BlockStore, snapshot_event

_SNAPSHOT_END = BlockEvent(BlockEventKind.SNAPSHOT_END)
_GAP = BlockEvent(BlockEventKind.GAP)


class Watcher:
    """One WatchBlocks stream's queue: a snapshot first, then live events, bounded.

    A snapshot is taken as references to the namespace's entries, in one step with the
    start of live queuing, and each turns into its SNAPSHOT event only as it is taken
    (`take`, a message at a time): a namespace of a million blocks does not hold the
    loop for the half second that building every event at once would take. An entry
    that changed meanwhile is sent as it is then; the live events queued behind the
    snapshot (TIER_CHANGED, REMOVED) end in the same view either way.
    """

    def __init__(self, store: BlockStore, namespace: Namespace, max_queued_events: int) -> None:
        self.namespace = namespace
        self._store = store
        self._max_queued = max_queued_events
        # The snapshot not yet taken: GAP (on a resync), the entries from
        # `_snapshot_next` on, then SNAPSHOT_END. Not bounded by the queue's limit.
        self._snapshot_head: list[BlockEvent] = []
        self._snapshot: list[BlockEntry] = []
        self._snapshot_next = 0
        self._snapshot_end_due = False
        self._events: deque[BlockEvent] = deque()  # live events, bounded
        self._next_sequence = 1  # the number the next event due gets
        self._lost = False  # events were dropped: the next take resyncs
        self.num_gaps = 0
        self._ready = asyncio.Event()
        self._queue_snapshot()

    def _queue_snapshot(self, *, after_gap: bool = False) -> None:
        self._snapshot = self._store.snapshot_entries(self.namespace)
        self._snapshot_next = 0
        self._snapshot_head = [_GAP] if after_gap else []
        self._snapshot_end_due = True
        self._next_sequence += self._num_snapshot_due()
        self._ready.set()

    def _num_snapshot_due(self) -> int:
        return (
            len(self._snapshot_head)
            + len(self._snapshot)
            - self._snapshot_next
            + self._snapshot_end_due
        )

    def _drop_snapshot(self) -> None:
        self._snapshot_head, self._snapshot, self._snapshot_next = [], [], 0
        self._snapshot_end_due = False

    def push(self, event: BlockEvent) -> None:
        """Queue a live event, or drop it (and every event queued) past the bound."""
        self._next_sequence += 1
        if self._lost:
            return
        if len(self._events) >= self._max_queued:
            self._events.clear()
            self._drop_snapshot()
            self._lost = True
            self.num_gaps += 1
        else:
            self._events.append(event)
        self._ready.set()

    async def take(self, max_events: int) -> tuple[int, list[BlockEvent]]:
        """(sequence number of the first, up to `max_events` events), once there are any."""
        while not self._events and not self._num_snapshot_due() and not self._lost:
            self._ready.clear()
            await self._ready.wait()
        if self._lost:
            self._lost = False
            self._queue_snapshot(after_gap=True)
        first_sequence = self._next_sequence - self._num_snapshot_due() - len(self._events)
        batch = self._take_snapshot(max_events)
        events = self._events
        batch.extend(events.popleft() for _ in range(min(max_events - len(batch), len(events))))
        return first_sequence, batch

    def _take_snapshot(self, max_events: int) -> list[BlockEvent]:
        batch = self._snapshot_head[:max_events]
        del self._snapshot_head[: len(batch)]
        stop = min(len(self._snapshot), self._snapshot_next + max_events - len(batch))
        batch.extend(map(snapshot_event, self._snapshot[self._snapshot_next : stop]))
        self._snapshot_next = stop
        if stop == len(self._snapshot):
            self._snapshot, self._snapshot_next = [], 0  # let the entries go
            if self._snapshot_end_due and len(batch) < max_events:
                batch.append(_SNAPSHOT_END)
                self._snapshot_end_due = False
        return batch


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
    def watch(self, namespace: Namespace, caller_tenant: str | None = None) -> Iterator[Watcher]:
        """A watcher of `namespace` for the `with` block; CapacityExhausted past the
        limits. Counted against the caller's tenant (an admin watching another tenant
        uses up its own share, not theirs), or the namespace's without authentication."""
        limits = self._limits
        tenant = namespace.tenant if caller_tenant is None else caller_tenant
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
