"""A bare memcpy of the bytes a throughput round moves: the machine's own limit for
moving them once, measured in the same run as the stores it bounds.

The source is the round's tensor and the destination a tensor of the same size, touched
beforehand, so no page fault is timed. Each block is one memcpy (a slice assignment
between flat byte views, on this one thread), as a same-host store that copies every
byte once at best would do.
"""

from __future__ import annotations

import time

import torch

from kvstore.bench.cost import CpuCost, Phase


def measure_memcpy(source: torch.Tensor, block_bytes: int) -> Phase:
    """Copy `source` into a fresh, touched tensor, `block_bytes` at a time."""
    flat = source.contiguous().view(torch.uint8).reshape(-1)
    dest = torch.zeros_like(flat)  # zeros: every page touched before the clock starts
    src_view = flat.numpy().data
    dest_view = dest.numpy().data
    total = len(src_view)
    cpu_before = time.process_time()
    start = time.perf_counter()
    for offset in range(0, total, block_bytes):
        end = min(total, offset + block_bytes)
        dest_view[offset:end] = src_view[offset:end]
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_before
    if not torch.equal(dest[-block_bytes:], flat[-block_bytes:]):
        raise RuntimeError("memcpy copied the wrong bytes")
    gigabytes = total / 1e9
    return Phase(gbps=gigabytes / elapsed, cpu=CpuCost(cpu / gigabytes, 0.0))
