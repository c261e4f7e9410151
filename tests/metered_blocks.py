"""Blocks big enough to be bandwidth samples, and a clock a test moves by hand: for the
cost model's meter and the read throttle."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvstore.layout import KVLayout


def big_layout(make_layout: Callable[..., KVLayout]) -> KVLayout:
    """128 KiB a block: every get is above the bandwidth meter's 64 KiB floor."""
    return make_layout(num_layers=4, num_kv_heads=4, head_dim=64)


def tokens_for(num_blocks: int, block_tokens: int, seed: int = 1) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (num_blocks * block_tokens,), generator=generator).tolist()


class FakeClock:
    """A monotonic clock that moves only when a test sets `now`."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
