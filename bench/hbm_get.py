"""An HBM-tier get into a device tensor, and its GB/s: `python -m kvstore.bench.hbm_get`.

Starts a daemon in its own process with an HBM tier on `--device` (cuda by default; cpu
runs the same code on the emulated tier), puts `--total` bytes of blocks, gets them
until the daemon has promoted every one into HBM (lookups must say so), then times
gets of all of them into a tensor on the same device, checks the bytes, and prints the
median GB/s beside a plain copy of the same bytes from pinned host memory onto the
device (the ceiling of the client's last step). bench/gpu_check.sh runs it. Without
CUDA, `--device cuda` exits 2 with a message saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import torch

from kvstore.allocator import tune_allocator
from kvstore.bench.spawn import spawned_server
from kvstore.bench.throughput import layout_for
from kvstore.client import KVClient, KVForm, Namespace, TierKind
from kvstore.units import human_bytes, parse_size

NO_CUDA_EXIT = 2
# Gets that make a block earn HBM (the daemon's hbm_promote_after_seen), and spare ones.
_PROMOTING_GETS = 4


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


async def measure(
    target: str, device: torch.device, total_bytes: int, block_bytes: int, rounds: int
) -> tuple[float, float]:
    """(median GB/s of the HBM-tier get into `device`, of a plain host-to-device copy)."""
    layout = layout_for(block_bytes)
    namespace = Namespace(tenant="bench", model_fingerprint="hbm-get", layout=layout)
    num_blocks = max(1, total_bytes // block_bytes)
    shape = (num_blocks, layout.num_layers, *layout.layer_shape)
    source = torch.randn(shape, dtype=torch.float32).to(layout.dtype.torch_dtype)
    dest = torch.empty(shape, dtype=source.dtype, device=device)
    keys = [f"hbm-b{index}".encode() for index in range(num_blocks)]
    moved = num_blocks * block_bytes
    async with KVClient(target, namespace) as client:
        if (await client.put_blocks(keys, source, form=KVForm.BLOCKS)).num_committed != num_blocks:
            raise RuntimeError("the put did not store every block")
        for _ in range(_PROMOTING_GETS):
            await client.get_into(keys, dest, form=KVForm.BLOCKS)
            match = await client.lookup_keys(keys)
            if match.num_matched == num_blocks and set(match.tiers) == {TierKind.HBM}:
                break
        else:
            raise RuntimeError(
                f"after {_PROMOTING_GETS} gets the blocks sit in {sorted(set(match.tiers))}, "
                "not all in HBM: is the HBM tier smaller than --total?"
            )
        samples = []
        for _ in range(rounds):
            dest.zero_()
            _synchronize(device)
            start = time.perf_counter()
            got = await client.get_into(keys, dest, form=KVForm.BLOCKS)
            _synchronize(device)
            samples.append(moved / (time.perf_counter() - start) / 1e9)
            if got != num_blocks or not torch.equal(dest.cpu(), source):
                raise RuntimeError("the HBM-tier get returned other bytes than were put")
    host = source.pin_memory() if device.type == "cuda" else source
    copies = []
    for _ in range(rounds):
        _synchronize(device)
        start = time.perf_counter()
        dest.copy_(host, non_blocking=True)
        _synchronize(device)
        copies.append(moved / (time.perf_counter() - start) / 1e9)
    return statistics.median(samples), statistics.median(copies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvstore.bench.hbm_get", description=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (emulated HBM)")
    parser.add_argument("--total", default="512MiB", help="bytes of blocks to get")
    parser.add_argument("--block", default="1MiB", help="block size (a multiple of 128KiB)")
    parser.add_argument("--rounds", type=int, default=5, help="timed gets (median)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"hbm_get: no CUDA device (torch {torch.__version__} sees none); "
            "run it where a GPU is, or pass --device cpu for the emulated tier",
            file=sys.stderr,
        )
        return NO_CUDA_EXIT
    total_bytes, block_bytes = parse_size(args.total), parse_size(args.block)
    tune_allocator()
    server_args = [
        "--dram-bytes", str(2 * total_bytes + (256 << 20)),
        "--hbm-bytes", str(total_bytes + (64 << 20)),
        "--hbm-device", args.device,
        "--log-level", "warning",
    ]  # fmt: skip
    with spawned_server(server_args) as target:
        gbps, copy_gbps = asyncio.run(
            measure(target, device, total_bytes, block_bytes, args.rounds)
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (emulated HBM)"
    print(
        f"HBM-tier get into a {device} tensor ({name}), {human_bytes(total_bytes)} of "
        f"{human_bytes(block_bytes)} blocks, median of {args.rounds}: {gbps:.2f} GB/s; "
        f"a plain host-to-device copy of the same bytes: {copy_gbps:.2f} GB/s "
        f"({gbps / copy_gbps:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
