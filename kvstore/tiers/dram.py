"""The DRAM tier: blocks in one preallocated page arena."""

from __future__ import annotations

from typing import cast

from kvstore.arena import PageArena
from kvstore.tiers.base import TierCounters, TierKind


class DramTier:
    kind = TierKind.DRAM
    name = "dram"

    def __init__(self, capacity_bytes: int, page_bytes: int, *, pin_memory: bool = False) -> None:
        self.arena = PageArena(capacity_bytes, page_bytes, pin_memory=pin_memory)
        self.counters = TierCounters()

    @property
    def capacity_bytes(self) -> int:
        return self.arena.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.arena.used_bytes

    def allocate(self, nbytes: int) -> object | None:
        return self.arena.allocate(nbytes)

    def free(self, handle: object) -> None:
        self.arena.free(cast(list[int], handle))

    def write(self, handle: object, offset: int, data: bytes | memoryview) -> None:
        self.arena.write(cast(list[int], handle), offset, data)
        self.counters.bytes_written += len(data)

    def read(self, handle: object, offset: int, nbytes: int) -> list[memoryview]:
        self.counters.bytes_read += nbytes
        return self.arena.read(cast(list[int], handle), offset, nbytes)
