"""Eviction policies as priority functions, and the queue that orders victims.

A policy is `priority(entry, now) -> tuple`; the smallest tuple goes first. Each tier
has its own queue. A queue holds the entries that could give up their copy in that
tier when they were added; whoever changes that (a pin, a new child, a copy made
elsewhere) adds or discards the entry again. Touching an entry re-queues it with a
fresh priority; its stale heap items are skipped on pop.
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
        self._tokens: dict[BlockEntry, int] = {}
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, entry: BlockEntry) -> bool:
        return entry in self._tokens

    def add(self, entry: BlockEntry, now: float) -> None:
        """Queue the entry unless it is queued already."""
        if entry not in self._tokens:
            self._push(entry, now)

    def touch(self, entry: BlockEntry, now: float) -> None:
        """Re-rank a queued entry after its priority changed; others are left out."""
        if entry in self._tokens:
            self._push(entry, now)

    def touch_many(self, entries: list[BlockEntry], now: float) -> None:
        """`touch` for each of `entries`, most of which are usually not queued."""
        for entry in list(filter(self._tokens.__contains__, entries)):
            self._push(entry, now)

    def discard(self, entry: BlockEntry) -> None:
        self._tokens.pop(entry, None)

    def pop(self) -> BlockEntry | None:
        """The entry that goes first, taken out of the queue; None when empty."""
        while self._heap:
            _, token, entry = heapq.heappop(self._heap)
            if self._tokens.get(entry) == token:
                del self._tokens[entry]
                return entry
        return None

    def _push(self, entry: BlockEntry, now: float) -> None:
        token = next(self._counter)
        self._tokens[entry] = token
        heapq.heappush(self._heap, (self._priority(entry, now), token, entry))
        if len(self._heap) > 4 * len(self._tokens) + 1024:
            self._heap = [item for item in self._heap if self._tokens.get(item[2]) == item[1]]
            heapq.heapify(self._heap)
