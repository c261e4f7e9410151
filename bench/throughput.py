"""`kvstore-bench throughput`: put and get GB/s through the client, against plain grpcio.

The kvstore server and the ceiling server each run in their own process; the client
moves torch tensors. For each block size, kvstore and the ceiling take turns for
`rounds` rounds of `total_bytes` each: plain grpcio streaming raw-bytes messages of
`chunk` size (its fastest mode here) and of whole-block size. Medians are reported,
and each ratio is the median of the per-round ratios.

A third line, "grpcio + copies", is plain grpcio doing only the per-byte work kvstore's
design requires on top (kvstore.bench.ceiling: a copy into or out of a preallocated
arena on the server, a copy between the message and the caller's tensor on the client,
and one checksum pass where the bytes are verified). It is the most a store built this
way can reach through Python gRPC: the ratio against it is what is left to engineering.
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
    put_ratio: float  # median over rounds of kvstore / chunked grpcio in the same round
    get_ratio: float
    copies_put_gbps: float  # chunked grpcio plus kvstore's copies and checksums
    copies_get_gbps: float
    copies_put_ratio: float  # median over rounds of kvstore / grpcio + copies
    copies_get_ratio: float


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


class KVStoreRounds:
    """Put then get `total_bytes` of `block_bytes` blocks, one round at a time, split
    over `streams` concurrent puts and gets on the client's one channel."""

    def __init__(
        self, client: KVClient, layout: KVLayout, total_bytes: int, streams: int = 1
    ) -> None:
        self._client = client
        self._num_blocks = max(1, total_bytes // layout.block_bytes)
        self._block_bytes = layout.block_bytes
        shape = (self._num_blocks, layout.num_layers, *layout.layer_shape)
        self._source = torch.randn(shape, dtype=torch.float32).to(torch.bfloat16)
        self._dest = torch.empty_like(self._source)
        self._round = 0
        step = -(-self._num_blocks // max(1, streams))
        self._shares = [
            slice(first, min(self._num_blocks, first + step))
            for first in range(0, self._num_blocks, step)
        ]

    async def run(self) -> tuple[float, float]:
        """(put GB/s, get GB/s) of one round, checked against what was sent."""
        num_blocks, client, shares = self._num_blocks, self._client, self._shares
        keys = [f"r{self._round}-b{i}".encode() for i in range(num_blocks)]
        self._round += 1
        start = time.perf_counter()
        results = await asyncio.gather(
            *(client.put_blocks(keys[s], self._source[s], form=KVForm.BLOCKS) for s in shares)
        )
        put_s = time.perf_counter() - start
        committed = sum(result.num_committed for result in results)
        if committed != num_blocks:
            raise RuntimeError(f"put stored {committed} of {num_blocks} blocks")
        start = time.perf_counter()
        got = await asyncio.gather(
            *(client.get_into(keys[s], self._dest[s], form=KVForm.BLOCKS) for s in shares)
        )
        get_s = time.perf_counter() - start
        if sum(got) != num_blocks or not torch.equal(self._dest[-1], self._source[-1]):
            raise RuntimeError("get returned the wrong blocks")
        await client.delete(keys)
        moved = num_blocks * self._block_bytes
        return moved / put_s / 1e9, moved / get_s / 1e9


def _namespace(layout: KVLayout) -> Namespace:
    return Namespace(
        tenant="bench", model_fingerprint=f"throughput-{layout.block_bytes}", layout=layout
    )


async def measure_size(
    target: str,
    ceiling_target: str,
    block_bytes: int,
    total_bytes: int,
    rounds: int,
    chunk_bytes: int,
    streams: int = 1,
) -> ThroughputRow:
    """kvstore and plain grpcio take turns, round by round; medians of each and of the
    per-round ratios, so a change in the shared machine's speed lands on both sides."""
    layout = layout_for(block_bytes)
    options = ClientOptions(chunk_bytes=chunk_bytes)
    async with KVClient(target, _namespace(layout), options=options) as client:
        kvstore = KVStoreRounds(client, layout, total_bytes, streams)
        await kvstore.run()  # warms up both processes
        await measure_ceiling(ceiling_target, min(total_bytes, 64 << 20), chunk_bytes)
        await measure_ceiling(ceiling_target, total_bytes, chunk_bytes, with_copies=True)
        ours, chunked, whole, copies = [], [], [], []
        for _ in range(rounds):
            ours.append(await kvstore.run())
            chunked.append(await measure_ceiling(ceiling_target, total_bytes, chunk_bytes, streams))
            whole.append(await measure_ceiling(ceiling_target, total_bytes, block_bytes, streams))
            copies.append(
                await measure_ceiling(
                    ceiling_target, total_bytes, chunk_bytes, streams, with_copies=True
                )
            )
    median = statistics.median
    return ThroughputRow(
        block_bytes=block_bytes,
        put_gbps=median(s[0] for s in ours),
        get_gbps=median(s[1] for s in ours),
        ceiling_put_gbps=median(s[0] for s in chunked),
        ceiling_get_gbps=median(s[1] for s in chunked),
        whole_put_gbps=median(s[0] for s in whole),
        whole_get_gbps=median(s[1] for s in whole),
        put_ratio=median(o[0] / c[0] for o, c in zip(ours, chunked, strict=True)),
        get_ratio=median(o[1] / c[1] for o, c in zip(ours, chunked, strict=True)),
        copies_put_gbps=median(s[0] for s in copies),
        copies_get_gbps=median(s[1] for s in copies),
        copies_put_ratio=median(o[0] / c[0] for o, c in zip(ours, copies, strict=True)),
        copies_get_ratio=median(o[1] / c[1] for o, c in zip(ours, copies, strict=True)),
    )


def run_sweep(
    block_sizes: list[int], total_bytes: int, rounds: int, chunk_bytes: int, streams: int = 1
) -> list[ThroughputRow]:
    dram = max(2 * total_bytes + (256 << 20), 1 << 30)
    with (
        spawned_server(
            ["--dram-bytes", str(dram), "--page-bytes", "1MiB", "--log-level", "warning"]
        ) as target,
        spawned_ceiling_server() as ceiling_target,
    ):
        return [
            asyncio.run(
                measure_size(
                    target, ceiling_target, size, total_bytes, rounds, chunk_bytes, streams
                )
            )
            for size in block_sizes
        ]


def add_throughput_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--block-sizes",
        default="1MiB,32MiB",
        help="comma-separated block sizes (multiples of 128KiB)",
    )
    parser.add_argument("--total", default="512MiB", help="bytes moved per round and size")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (median)")
    parser.add_argument(
        "--streams",
        type=int,
        default=1,
        help="concurrent streams per put and get, for kvstore and plain grpcio alike",
    )
    parser.add_argument("--chunk", default="1MiB", help="stream message payload size")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_throughput(args: argparse.Namespace) -> int:
    tune_allocator()  # this process runs both clients: kvstore's and the ceiling's
    block_sizes = [parse_size(part) for part in args.block_sizes.split(",")]
    if args.streams < 1:
        raise SystemExit("--streams must be at least 1")
    rows = run_sweep(
        block_sizes, parse_size(args.total), args.rounds, parse_size(args.chunk), args.streams
    )
    if args.json:
        print(
            json.dumps(
                [asdict(row) for row in rows],
                indent=2,
            )
        )
        return 0
    streams = f", {args.streams} streams each" if args.streams > 1 else ""
    table = Table(
        title=f"kvstore put/get vs plain grpcio (same run, loopback, separate processes{streams})"
    )
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
        "grpcio + copies put",
        "+ copies get",
        "put / + copies",
        "get / + copies",
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
            f"{row.copies_put_gbps:.2f}",
            f"{row.copies_get_gbps:.2f}",
            f"{row.copies_put_ratio:.2f}x",
            f"{row.copies_get_ratio:.2f}x",
        )
    Console().print(table)
    return 0
