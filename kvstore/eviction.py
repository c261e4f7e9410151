"""Eviction policies as priority functions, and the queue that orders victims.

A policy is `priority(entry, now) -> tuple`; the smallest tuple is evicted first.
The queue holds only entries that could be evicted when they were pushed: chain
tails (no children) that were not pinned. Whoever changes that (a child leaves,
a pin is released) pushes the entry again. Entries touched after their push carry a
new token, so their stale heap items are skipped on pop.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

from kvstore.index import BlockEntry

Priority = Callable[[BlockEntry, float], tuple[Any, ...]]


def lru_priority(entry: BlockEntry, now: float) -> tuple[Any, ...]:
    """Least recently used first."""
    return (entry.last_access,)


def lfu_priority(entry: BlockEntry, now: float) -> tuple[Any, ...]:
    """Fewest hits first; ties go to the least recently used."""
    return (entry.num_hits, entry.last_access)


def session_priority(entry: BlockEntry, now: float) -> tuple[Any, ...]:
    """Blocks an agent session ever leased go last, so sessions stay resident between turns.

    Live leases are never evicted by any policy; this one also protects chains whose
    lease lapsed while the agent was busy with a long tool call.
    """
    return (entry.lease_expiry > 0.0, entry.last_access)


POLICIES: dict[str, Priority] = {
    "lru": lru_priority,
    "lfu": lfu_priority,
    "session": session_priority,
}


class EvictionQueue:
    def __init__(self, priority: Priority) -> None:
        self._priority = priority
        self._heap: list[tuple[tuple[Any, ...], int, BlockEntry]] = []
        self._tokens = itertools.count()
        self._num_live = 0

    def __len__(self) -> int:
        return self._num_live

    def push(self, entry: BlockEntry, now: float) -> None:
        if entry.queue_token is None:
            self._num_live += 1
        token = next(self._tokens)
        entry.queue_token = token
        heapq.heappush(self._heap, (self._priority(entry, now), token, entry))
        if len(self._heap) > 4 * self._num_live + 1024:
            self._compact()

    def discard(self, entry: BlockEntry) -> None:
        if entry.queue_token is not None:
            entry.queue_token = None
            self._num_live -= 1

    def pop(self) -> BlockEntry | None:
        """The lowest-priority live entry, taken out of the queue; None when empty."""
        while self._heap:
            _, token, entry = heapq.heappop(self._heap)
            if entry.queue_token == token:
                entry.queue_token = None
                self._num_live -= 1
                return entry
        return None

    def _compact(self) -> None:
        self._heap = [item for item in self._heap if item[2].queue_token == item[1]]
        heapq.heapify(self._heap)
