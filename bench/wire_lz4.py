"""`kvstore-bench wire-lz4`: what lz4 on a get's network path buys, on a slow link and a fast one.

Two `kvstore-server` processes: one whose DRAM reads are throttled (`--throttle-read
dram=RATE`, which paces gets by the bytes they send, so compressed bytes pass faster:
a slow link's stand-in), and one unthrottled (loopback as it is). On each, the same
blocks are got with `ClientOptions.wire_compression` "off", "lz4" and "auto" (a client
each, taking turns get by get), over the TCP data plane (shared memory off: it never
compresses), or gRPC with `--grpc`.

The data are KV of a real prefill (`kvstore-bench lz4`'s: the disagg transformer, cast to
fp16 and bf16), KV of a narrow range of values (uniform in [1.0, 1.2), fp16: what
compresses about 2x), and random bytes. For each: GB/s of raw KV delivered (the median
get of `--rounds`), the ratio on the wire (raw bytes / bytes received), and what auto
chose once it had measured (one warm-up get before the rounds).
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
from kvstore.bench.lz4 import datasets, layout_of, prefill_kv
from kvstore.bench.spawn import spawned_server
from kvstore.client import ClientOptions, KVClient, KVForm, Namespace
from kvstore.units import human_bytes, parse_size

MODES = ("off", "lz4", "auto")


@dataclass(frozen=True)
class WireFigures:
    link: str  # "throttled 200MB/s" or "unthrottled"
    dataset: str
    get_bytes: int
    gbps: dict[str, float]  # per mode: raw KV GB/s, median get
    ratio: dict[str, float]  # per mode: raw bytes / bytes on the wire
    auto_asked: int  # of the measured gets, how many auto sent asking for lz4
    rounds: int
    auto_rates: dict[str, float | None]  # what auto measured: link, encode, decode (B/s), ratio


def narrow_kv(like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    values = torch.rand(like.shape, generator=generator) * 0.2 + 1.0
    return values.to(torch.float16)


def bench_datasets(kv: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    found = datasets(kv)
    found["narrow"] = narrow_kv(kv)
    return {name: found[name] for name in names}


async def _measure(
    target: str,
    namespace: Namespace,
    blocks: torch.Tensor,
    copies: int,
    rounds: int,
    grpc_only: bool,
) -> tuple[dict[str, float], dict[str, float], int, dict[str, float | None]]:
    keys = [
        f"{namespace.model_fingerprint}-{copy}-{index}".encode()
        for copy in range(copies)
        for index in range(len(blocks))
    ]
    kv = blocks.repeat(copies, *([1] * (blocks.dim() - 1)))
    block_bytes = namespace.layout.block_bytes
    clients = {
        mode: KVClient(
            target,
            namespace,
            options=ClientOptions(
                wire_compression=mode,  # type: ignore[arg-type]
                shared_memory=False,
                data_plane=not grpc_only,
            ),
        )
        for mode in MODES
    }
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    wire = dict.fromkeys(MODES, 0)
    auto_asked = 0
    try:
        result = await clients["off"].put_blocks(keys, kv)
        if result.num_committed != len(keys):
            raise RuntimeError(f"only {result.num_committed} of {len(keys)} blocks stored")
        dest = torch.empty_like(kv)
        for client in clients.values():  # warm-up; auto measures the link and probes lz4
            await client.get_into(keys, dest, form=KVForm.BLOCKS)
        # Modes take turns within each round, so load from elsewhere falls on all alike.
        for _ in range(rounds):
            for mode, client in clients.items():
                asked = client.wire_compression.ask()
                started = time.perf_counter()
                got = await client.get_into(keys, dest, form=KVForm.BLOCKS)
                seconds = time.perf_counter() - started
                if got != len(keys) or not torch.equal(
                    dest.view(torch.uint8), kv.view(torch.uint8)
                ):
                    raise RuntimeError(f"the get ({mode}) did not return the stored bytes")
                samples[mode].append(len(keys) * block_bytes / seconds / 1e9)
                stats = client.wire_stats
                assert stats is not None
                wire[mode] += stats.wire_bytes
                if mode == "auto":
                    auto_asked += asked
        auto_rates: dict[str, float | None] = asdict(clients["auto"].wire_compression.rates)
    finally:
        for client in clients.values():
            await client.close()
    gbps = {mode: statistics.median(samples[mode]) for mode in MODES}
    ratio = {mode: rounds * len(keys) * block_bytes / wire[mode] for mode in MODES}
    return gbps, ratio, auto_asked, auto_rates


def add_wire_lz4_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=2048, help="prefill length (tokens)")
    parser.add_argument("--copies", type=int, default=4, help="copies of the blocks per get")
    parser.add_argument("--throttle", default="200MB", help="the slow link's rate (bytes/s)")
    parser.add_argument("--rounds", type=int, default=3, help="measured gets per mode (median)")
    parser.add_argument(
        "--datasets", default="bf16,fp16,narrow,random", help="comma-separated: bf16, fp16, "
        "fp8, narrow, random"
    )  # fmt: skip
    parser.add_argument("--grpc", action="store_true", help="gRPC instead of the TCP data plane")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_wire_lz4(args: argparse.Namespace) -> int:
    tune_allocator()
    config, kv = prefill_kv(args.tokens)
    data = bench_datasets(kv, args.datasets.split(","))
    rate = parse_size(args.throttle)
    total = args.copies * sum(blocks.numel() * blocks.element_size() for blocks in data.values())
    common = ["--dram-bytes", str(total + (64 << 20)), "--log-level", "warning"]
    figures = []
    links = {
        f"throttled {rate / 1e6:g} MB/s": ["--throttle-read", f"dram={rate}"],
        "unthrottled": [],
    }
    for link, flags in links.items():
        with spawned_server([*common, *flags]) as target:
            for name, blocks in data.items():
                layout = layout_of(config, blocks.dtype)
                namespace = Namespace(
                    tenant="bench", model_fingerprint=f"wire-{name}", layout=layout
                )
                gbps, ratio, asked, rates = asyncio.run(
                    _measure(target, namespace, blocks, args.copies, args.rounds, args.grpc)
                )
                figures.append(
                    WireFigures(
                        link=link,
                        dataset=name,
                        get_bytes=args.copies * len(blocks) * layout.block_bytes,
                        gbps=gbps,
                        ratio=ratio,
                        auto_asked=asked,
                        rounds=args.rounds,
                        auto_rates=rates,
                    )
                )
    if args.json:
        print(json.dumps([asdict(figure) for figure in figures], indent=2))
        return 0
    print_report(figures, args)
    return 0


def print_report(figures: list[WireFigures], args: argparse.Namespace) -> None:
    console = Console(width=180)
    transport = "gRPC" if args.grpc else "TCP data plane"
    table = Table(title=f"lz4 on a get's network path ({transport}; one run)")
    columns = (
        "link", "data", "get", "off GB/s", "lz4 GB/s", "lz4/off", "wire ratio (lz4)",
        "auto GB/s", "auto asked", "auto measured: link / encode / decode GB/s, ratio",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("link", "data") else "right")
    for figure in figures:
        table.add_row(
            figure.link,
            figure.dataset,
            human_bytes(figure.get_bytes),
            f"{figure.gbps['off']:.3f}",
            f"{figure.gbps['lz4']:.3f}",
            f"{figure.gbps['lz4'] / figure.gbps['off']:.2f}x",
            f"{figure.ratio['lz4']:.2f}x",
            f"{figure.gbps['auto']:.3f}",
            f"lz4 in {figure.auto_asked} of {figure.rounds}",
            _rates(figure.auto_rates),
        )
    console.print(table)
    console.print(
        "GB/s: raw KV bytes delivered per second, median get; wire ratio: raw bytes / bytes "
        "received; auto: after one get to measure the link (and probe lz4 on its bytes); "
        "auto asked: its measured gets that asked for lz4."
    )


def _rates(rates: dict[str, float | None]) -> str:
    def gbps(name: str) -> str:
        value = rates.get(name)
        return "-" if value is None else f"{value / 1e9:.2f}"

    ratio = rates.get("ratio")
    return (
        f"{gbps('link')} / {gbps('encode')} / {gbps('decode')}, "
        f"{'-' if ratio is None else f'{ratio:.2f}x'}"
    )
