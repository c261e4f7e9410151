"""Blocks whose bytes follow from their keys.

Whatever a server serves, even a restarted one that lost all its memory, can then be
checked against a recomputation: no record of what was sent needs to survive.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import torch

from kvstore.client import KVClient, KVForm
from kvstore.layout import KVLayout


def keyed_payload(key: bytes, nbytes: int) -> bytes:
    """The `nbytes` of the block stored under `key`."""
    seed = hashlib.sha256(key).digest()
    return (seed * (nbytes // len(seed) + 1))[:nbytes]


def keyed_tensor(layout: KVLayout, keys: list[bytes]) -> torch.Tensor:
    """The blocks of `keys`, in the BLOCKS form of `layout`."""
    raw = bytearray(b"".join(keyed_payload(key, layout.block_bytes) for key in keys))
    flat = torch.frombuffer(raw, dtype=torch.uint8)
    return flat.view(layout.dtype.torch_dtype).reshape(
        len(keys), layout.num_layers, *layout.layer_shape
    )


async def served_blocks(client: KVClient, keys: list[bytes]) -> list[bytes]:
    """The prefix of `keys` the server serves, one bytes object per block."""
    layout = client.namespace.layout
    shape = (len(keys), layout.num_layers, *layout.layer_shape)
    dest = torch.zeros(shape, dtype=layout.dtype.torch_dtype)
    served = await client.get_into(keys, dest, form=KVForm.BLOCKS)
    return [dest[index].view(torch.uint8).numpy().tobytes() for index in range(served)]


async def until_recovered(client: KVClient, timeout_s: float = 60.0) -> None:
    """Until the daemon has indexed its whole SSD directory. A large directory goes on
    being indexed after the daemon serves (kvstore.recovery), and until then the blocks
    not yet indexed are misses: a check for losses must not start before."""
    deadline = time.monotonic() + timeout_s
    while True:
        names = [tier.name for tier in (await client.stats()).tiers]
        if not any("recovering" in name for name in names):
            return
        assert time.monotonic() < deadline, f"still recovering after {timeout_s:g} s: {names}"
        await asyncio.sleep(0.05)
