"""What client calls return."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.enums import PutOutcome, TierKind


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """The stored prefix of a token sequence's block chain. A miss is `num_matched == 0`."""

    keys: list[bytes]  # keys of every full block of the query
    num_matched: int
    tiers: tuple[TierKind, ...]
    block_tokens: int

    @property
    def matched_keys(self) -> list[bytes]:
        return self.keys[: self.num_matched]

    @property
    def num_matched_tokens(self) -> int:
        return self.num_matched * self.block_tokens


@dataclass(frozen=True, slots=True)
class PutResult:
    outcomes: tuple[PutOutcome, ...]  # one per block sent
    num_skipped: int  # leading blocks not sent because a lookup found them stored
    bytes_sent: int

    @property
    def num_committed(self) -> int:
        return sum(1 for outcome in self.outcomes if outcome is PutOutcome.COMMITTED)


@dataclass(frozen=True, slots=True)
class LayerArrival:
    """Layer `layer` of every served block, complete and checksum-verified."""

    layer: int
    num_blocks: int
    kv: torch.Tensor  # [num_blocks, 2, block_tokens, num_kv_heads, head_dim] or a view of dest
