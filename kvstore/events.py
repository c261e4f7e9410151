"""Block events: what the store tells a listener as blocks come, go and change tier.

The seam between the core and whoever watches it (kvstore.server.watch fans events out
to WatchBlocks streams). BlockPool calls its `listener`, when it has one, at the one
place each change happens: a commit or a recovered block (STORED), a block's last copy
leaving (REMOVED), and a change of the fastest tier holding a block (TIER_CHANGED), so a
listener that applies the events in order holds exactly what lookups find.

Calls are synchronous, on the store's thread, in the order of the changes; a listener
must return at once (queue, never wait) and must not call back into the store.
The kinds' values equal kvstore.v1's BlockEventKind numbers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from kvstore.enums import TierKind
from kvstore.layout import Namespace

__all__ = ["BlockEvent", "BlockEventKind", "BlockListener"]


class BlockEventKind(enum.IntEnum):
    SNAPSHOT = 1  # stored when the watch began (or at a resync): key, parent, tier
    SNAPSHOT_END = 2  # the snapshot is complete; live events follow
    STORED = 3  # visible to lookups from now on: key, parent, tier
    REMOVED = 4  # gone from every tier: key
    TIER_CHANGED = 5  # the fastest tier holding the block changed: key, tier
    GAP = 6  # events were dropped: forget the view, a fresh snapshot follows


@dataclass(frozen=True, slots=True)
class BlockEvent:
    """One event of a namespace's blocks. `parent_key` is empty for a chain root (and
    for every kind but SNAPSHOT and STORED); `tier` is None where the kind has none."""

    kind: BlockEventKind
    key: bytes = b""
    parent_key: bytes = b""
    tier: TierKind | None = None


class BlockListener(Protocol):
    """Told of every change to what lookups find (see the module docstring)."""

    def block_changed(
        self,
        namespace: Namespace,
        kind: BlockEventKind,
        key: bytes,
        parent_key: bytes,
        tier: TierKind | None,
    ) -> None:
        """STORED (parent_key, tier), REMOVED, or TIER_CHANGED (tier) for `key`."""
