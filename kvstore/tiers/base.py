"""The tier protocol and the counters every tier reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, cast

from kvstore.arena import PageArena
from kvstore.enums import TierKind


@dataclass(slots=True)
class TierCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    promotions: int = 0
    demotions: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0


class Tier(Protocol):
    """What kvstore.pool needs of every tier: its size, its counters, and freeing a copy.

    A handle is whatever the tier needs to find a block's bytes again (pages in memory,
    a file on SSD); the pool keeps it on the block's entry and hands it back unchanged.
    """

    kind: TierKind
    name: str
    counters: TierCounters

    @property
    def capacity_bytes(self) -> int: ...

    @property
    def used_bytes(self) -> int: ...

    @property
    def degraded(self) -> bool:
        """Whether the tier has stopped taking new blocks for now."""
        ...

    def free(self, handle: object) -> None:
        """Give back a copy's space; the copy's bytes are gone after."""
        ...


class MemoryTier(Tier, Protocol):
    """A tier addressed in memory: reads and writes are synchronous copies."""

    def allocate(self, nbytes: int) -> object | None:
        """A handle for `nbytes`, or None when the tier is full."""
        ...

    @property
    def free_bytes(self) -> int: ...

    def footprint_bytes(self, nbytes: int) -> int:
        """The bytes an allocation of `nbytes` takes from the tier, and its free gives back."""
        ...

    def write(self, handle: object, offset: int, data: bytes | memoryview) -> None: ...

    def read(self, handle: object, offset: int, nbytes: int) -> list[memoryview]: ...


class ArenaTier:
    """A memory tier over a PageArena; its handles are page lists. DRAM and HBM are this."""

    kind: TierKind
    name: str

    def __init__(self, arena: PageArena) -> None:
        self.arena = arena
        self.counters = TierCounters()

    @property
    def capacity_bytes(self) -> int:
        return self.arena.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.arena.used_bytes

    @property
    def degraded(self) -> bool:
        return False

    def allocate(self, nbytes: int) -> object | None:
        return self.arena.allocate(nbytes)

    @property
    def free_bytes(self) -> int:
        return self.arena.free_bytes

    def footprint_bytes(self, nbytes: int) -> int:
        """The bytes an allocation of `nbytes` takes (and its free gives back): whole pages."""
        return self.arena.pages_for(nbytes) * self.arena.page_bytes

    def free(self, handle: object) -> None:
        self.arena.free(cast(list[int], handle))

    def write(self, handle: object, offset: int, data: bytes | memoryview) -> None:
        self.arena.write(cast(list[int], handle), offset, data)
        self.counters.bytes_written += len(data)

    def write_landed(
        self, handle: object, offset: int, data: bytes | memoryview
    ) -> list[memoryview]:
        """`write`, then where the bytes landed (PageArena.read; not counted as a read): a
        caller that checks them there checks what is stored, not a source that may change
        meanwhile (a client's shared buffer)."""
        self.write(handle, offset, data)
        return self.arena.read(cast(list[int], handle), offset, len(data))

    def write_slices(
        self, handles: list[object], offset: int, data: memoryview, nbytes: int
    ) -> list[memoryview]:
        """Slice i (`nbytes` long) of `data` into `handles[i]` at `offset`; see PageArena.
        Returns where the bytes landed (PageArena.read_slices; not counted as a read), so
        the caller can check them there while they are in the cache."""
        blocks = cast(list[list[int]], handles)
        self.arena.write_slices(blocks, offset, data, nbytes)
        self.counters.bytes_written += len(data)
        return self.arena.read_slices(blocks, offset, nbytes)

    def landing_slices(
        self, handles: list[object], offset: int, nbytes: int
    ) -> list[memoryview] | None:
        """Where `write_slices` would put each slice, as writable views, for bytes
        received in place (counted as written); None where it cannot (PageArena)."""
        views = self.arena.landing_slices(cast(list[list[int]], handles), offset, nbytes)
        if views is not None:
            self.counters.bytes_written += nbytes * len(handles)
        return views

    def read(self, handle: object, offset: int, nbytes: int) -> list[memoryview]:
        self.counters.bytes_read += nbytes
        return self.arena.read(cast(list[int], handle), offset, nbytes)

    def read_slices(self, handles: list[object], offset: int, nbytes: int) -> list[memoryview]:
        """`read` of each handle, concatenated; see PageArena.read_slices."""
        self.counters.bytes_read += nbytes * len(handles)
        return self.arena.read_slices(cast(list[list[int]], handles), offset, nbytes)
