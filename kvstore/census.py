"""BlockCensus: the counts Stats reports, kept as blocks change instead of counted per report.

A report then costs O(tiers), not O(blocks): with a million blocks, counting them on the
event loop at every Stats call would stall every lookup behind it.

What it counts, over the indexed entries (those between `BlockIndex.insert` and
`BlockIndex.remove`, which set and clear `entry.path`):
- per tier, the entries with a copy there;
- the entries pinned now: read pins (counted as they start and end) plus leases not yet
  expired. A lease ends by the clock, with no call to say so: leased entries sit in a
  heap by expiry, pruned lazily whenever the count is read or a lease changes.
"""

from __future__ import annotations

import heapq
import itertools
from typing import TYPE_CHECKING

from kvstore.enums import TierKind

if TYPE_CHECKING:
    from kvstore.index import BlockEntry

__all__ = ["BlockCensus"]

# The heap keeps one item per lease extension; past this many stale items per live
# lease (plus a floor) it is rebuilt from the live ones, so it stays O(leased entries).
_HEAP_SLACK = 2
_HEAP_FLOOR = 64


class BlockCensus:
    """Counts of indexed blocks per tier and of pinned blocks, for `BlockStore.report`.

    Callers tell it every change to an indexed entry's copies, read pins and lease; it
    ignores entries that are not indexed, so a call need not check.
    """

    def __init__(self) -> None:
        self._num_blocks: dict[TierKind, int] = dict.fromkeys(TierKind, 0)
        self._num_read_pinned = 0
        # Indexed entries with no read pin whose lease had not expired when last pruned.
        # Invariant: each has a heap item whose expiry is its current lease_expiry.
        self._leased: set[BlockEntry] = set()
        # (expiry, tie-break, entry); items of leases since extended or ended are stale.
        self._expiries: list[tuple[float, int, BlockEntry]] = []
        self._tie_breaks = itertools.count()

    def num_blocks(self, kind: TierKind) -> int:
        """Indexed blocks with a copy in `kind`'s tier."""
        return self._num_blocks[kind]

    def num_pinned(self, now: float) -> int:
        """Indexed blocks pinned at monotonic time `now`: read pins or unexpired leases."""
        self._prune(now)
        return self._num_read_pinned + len(self._leased)

    # -- the index ------------------------------------------------------------------------

    def entered(self, entry: BlockEntry) -> None:
        """`entry` was just indexed."""
        for kind in entry.copies:
            self._num_blocks[kind] += 1
        if entry.read_pins:
            self._num_read_pinned += 1
        else:
            # Any lease it has counts until a prune finds it expired.
            self._track_lease(entry, now=0.0)

    def left(self, entry: BlockEntry) -> None:
        """`entry` was just taken out of the index."""
        for kind in entry.copies:
            self._num_blocks[kind] -= 1
        if entry.read_pins:
            self._num_read_pinned -= 1
        self._leased.discard(entry)

    # -- copies ---------------------------------------------------------------------------

    def copy_added(self, entry: BlockEntry, kind: TierKind) -> None:
        """`entry` gained a copy in `kind` (call only when it had none there)."""
        if entry.path is not None:
            self._num_blocks[kind] += 1

    def copy_taken(self, entry: BlockEntry, kind: TierKind) -> None:
        """`entry` lost its copy in `kind`."""
        if entry.path is not None:
            self._num_blocks[kind] -= 1

    # -- pins and leases --------------------------------------------------------------------

    def read_pinned(self, entry: BlockEntry) -> None:
        """`entry.read_pins` just went from 0 to 1."""
        if entry.path is not None:
            self._num_read_pinned += 1
            self._leased.discard(entry)  # counted once, as read-pinned

    def read_unpinned(self, entry: BlockEntry, now: float) -> None:
        """`entry.read_pins` just went from 1 to 0."""
        if entry.path is not None:
            self._num_read_pinned -= 1
            self._track_lease(entry, now)

    def lease_changed(self, entry: BlockEntry, now: float) -> None:
        """`entry.lease_expiry` was just set."""
        if entry.path is None or entry.read_pins:
            return
        self._leased.discard(entry)
        self._track_lease(entry, now)
        self._prune(now)

    def _track_lease(self, entry: BlockEntry, now: float) -> None:
        expiry = entry.lease_expiry
        if expiry <= now:
            return
        self._leased.add(entry)
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
            if entry.lease_expiry <= now:
                leased.discard(entry)
