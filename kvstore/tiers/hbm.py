"""The HBM tier: hot blocks in accelerator memory, as one torch CUDA tensor arena.

Without a GPU the same code runs on torch's CPU device and reports itself as
"hbm (emulated)" everywhere it is named.
"""

from __future__ import annotations

import torch

from kvstore.arena import PageArena
from kvstore.enums import TierKind
from kvstore.tiers.base import ArenaTier


def resolve_device(choice: str) -> torch.device:
    """'auto' → cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("hbm_device is cuda but torch sees no CUDA device")
    return device


class HbmTier(ArenaTier):
    kind = TierKind.HBM

    def __init__(self, capacity_bytes: int, page_bytes: int, device: torch.device) -> None:
        super().__init__(PageArena(capacity_bytes, page_bytes, device=device, tensor_copies=True))
        self.emulated = device.type != "cuda"
        self.name = "hbm (emulated)" if self.emulated else f"hbm ({device})"
