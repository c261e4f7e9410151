"""The DRAM tier: blocks in one preallocated page arena (pinned when CUDA is present)."""

from __future__ import annotations

from kvstore.arena import PageArena
from kvstore.enums import TierKind
from kvstore.tiers.base import ArenaTier


class DramTier(ArenaTier):
    kind = TierKind.DRAM
    name = "dram"

    def __init__(self, capacity_bytes: int, page_bytes: int, *, pin_memory: bool = False) -> None:
        super().__init__(PageArena(capacity_bytes, page_bytes, pin_memory=pin_memory))
