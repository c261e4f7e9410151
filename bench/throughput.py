"""`kvstore-bench throughput`: put and get GB/s through the client, against plain grpcio.

The kvstore server and the ceiling server each run in their own process; the client
moves torch tensors. Each block size is measured over `rounds` rounds of
`total_bytes` and the median is reported, next to the ceiling measured in the same run:
plain grpcio streaming raw-bytes messages of `chunk` size (its fastest mode here) and
of whole-block size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.table import Table

from kvstore.allocator import tune_allocator
from kvstore.bench.ceiling import measure_ceiling
from kvstore.bench.spawn import spawned_ceiling_server, spawned_server
from kvstore.client import ClientOptions, DType, KVClient, KVForm, KVLayout, Namespace
from kvstore.units import human_bytes, parse_size

# Llama-3-8B's KV geometry: 32 layers x 8 KV heads x 128 dims in bf16 = 128 KiB per token.
LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128
BYTES_PER_TOKEN = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2


@dataclass(frozen=True)
class ThroughputRow:
    block_bytes: int
    put_gbps: float
    get_gbps: float
    ceiling_put_gbps: float  # raw grpcio, chunk-sized messages
    ceiling_get_gbps: float
    whole_put_gbps: float  # raw grpcio, one message per block
    whole_get_gbps: float

    @property
    def put_ratio(self) -> float:
        return self.put_gbps / self.ceiling_put_gbps

    @property
    def get_ratio(self) -> float:
        return self.get_gbps / self.ceiling_get_gbps


def layout_for(block_bytes: int) -> KVLayout:
    if block_bytes % BYTES_PER_TOKEN:
        raise ValueError(f"block size must be a multiple of {human_bytes(BYTES_PER_TOKEN)}")
    return KVLayout(
        num_layers=LAYERS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        dtype=DType.BFLOAT16,
        block_tokens=block_bytes // BYTES_PER_TOKEN,
    )


async def measure_kvstore(
    target: str, block_bytes: int, total_bytes: int, rounds: int, chunk_bytes: int
) -> tuple[float, float]:
    """Median (put GB/s, get GB/s) of moving `total_bytes` of `block_bytes` blocks."""
    layout = layout_for(block_bytes)
    num_blocks = max(1, total_bytes // block_bytes)
    namespace = Namespace(
        tenant="bench", model_fingerprint=f"throughput-{block_bytes}", layout=layout
    )
    shape = (num_blocks, layout.num_layers, *layout.layer_shape)
    source = torch.randn(shape, dtype=torch.float32).to(torch.bfloat16)
    dest = torch.empty_like(source)
    options = ClientOptions(chunk_bytes=chunk_bytes)
    puts, gets = [], []
    async with KVClient(target, namespace, options=options) as client:
        for round_index in range(rounds + 1):
            keys = [f"r{round_index}-b{i}".encode() for i in range(num_blocks)]
            start = time.perf_counter()
            result = await client.put_blocks(keys, source, form=KVForm.BLOCKS)
            put_s = time.perf_counter() - start
            if result.num_committed != num_blocks:
                raise RuntimeError(f"put stored {result.num_committed} of {num_blocks} blocks")
            start = time.perf_counter()
            got = await client.get_into(keys, dest, form=KVForm.BLOCKS)
            get_s = time.perf_counter() - start
            if got != num_blocks or not torch.equal(dest[-1], source[-1]):
                raise RuntimeError("get returned the wrong blocks")
            await client.delete(keys[:1])
            if round_index:  # the first round warms up both processes
                puts.append(num_blocks * block_bytes / put_s / 1e9)
                gets.append(num_blocks * block_bytes / get_s / 1e9)
    return statistics.median(puts), statistics.median(gets)


async def _ceiling(target: str, total: int, message: int, rounds: int) -> tuple[float, float]:
    await measure_ceiling(target, min(total, 64 << 20), message)  # warm-up
    samples = [await measure_ceiling(target, total, message) for _ in range(rounds)]
    return (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples))


def run_sweep(
    block_sizes: list[int], total_bytes: int, rounds: int, chunk_bytes: int
) -> list[ThroughputRow]:
    rows = []
    dram = max(2 * total_bytes + (256 << 20), 1 << 30)
    with (
        spawned_server(
            ["--dram-bytes", str(dram), "--page-bytes", "1MiB", "--log-level", "warning"]
        ) as target,
        spawned_ceiling_server() as ceiling_target,
    ):
        for block_bytes in block_sizes:
            put, get = asyncio.run(
                measure_kvstore(target, block_bytes, total_bytes, rounds, chunk_bytes)
            )
            cput, cget = asyncio.run(_ceiling(ceiling_target, total_bytes, chunk_bytes, rounds))
            wput, wget = asyncio.run(_ceiling(ceiling_target, total_bytes, block_bytes, rounds))
            rows.append(ThroughputRow(block_bytes, put, get, cput, cget, wput, wget))
    return rows


def add_throughput_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--block-sizes",
        default="1MiB,32MiB",
        help="comma-separated block sizes (multiples of 128KiB)",
    )
    parser.add_argument("--total", default="512MiB", help="bytes moved per round and size")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (median)")
    parser.add_argument("--chunk", default="1MiB", help="stream message payload size")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_throughput(args: argparse.Namespace) -> int:
    tune_allocator()  # this process runs both clients: kvstore's and the ceiling's
    block_sizes = [parse_size(part) for part in args.block_sizes.split(",")]
    rows = run_sweep(block_sizes, parse_size(args.total), args.rounds, parse_size(args.chunk))
    if args.json:
        print(
            json.dumps(
                [
                    asdict(row) | {"put_ratio": row.put_ratio, "get_ratio": row.get_ratio}
                    for row in rows
                ],
                indent=2,
            )
        )
        return 0
    table = Table(title="kvstore put/get vs plain grpcio (same run, loopback, separate processes)")
    for column in (
        "block",
        "put GB/s",
        "get GB/s",
        "grpcio put",
        "grpcio get",
        "put ratio",
        "get ratio",
        "grpcio whole-block put",
        "whole-block get",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            human_bytes(row.block_bytes),
            f"{row.put_gbps:.2f}",
            f"{row.get_gbps:.2f}",
            f"{row.ceiling_put_gbps:.2f}",
            f"{row.ceiling_get_gbps:.2f}",
            f"{row.put_ratio:.2f}x",
            f"{row.get_ratio:.2f}x",
            f"{row.whole_put_gbps:.2f}",
            f"{row.whole_get_gbps:.2f}",
        )
    Console().print(table)
    return 0
