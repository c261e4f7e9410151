"""`kvstore-bench transfer-cost`: what one daemon spends on TCP puts, and how long a
small get takes, per block size.

For each block size a daemon is started in its own process, and this process:
- puts `--put-bytes` of fresh blocks over TCP (shared memory off), chains of
  `--chain-blocks`, `--rounds` times (the first a warm-up), deleting them after each
  round, and reads the daemon's own CPU time (Stats' `process_cpu_us`) around each;
- then gets `--get-blocks` stored blocks `--gets` times, through shared memory and over
  TCP, one call at a time.

It prints the medians: the daemon's CPU-seconds per GB put and the put GB/s, and each
path's get p50. These are the figures a change to the put or get path moves; run the
same command on two installs, taking turns, to compare them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from kvstore.bench.spawn import spawned_server
from kvstore.bench.throughput import layout_for
from kvstore.client import ClientOptions, KVClient, KVForm, Namespace
from kvstore.units import human_bytes, parse_size


@dataclass(frozen=True)
class TransferCost:
    block_bytes: int
    put_daemon_cpu_s_per_gb: float
    put_gbps: float
    get_blocks: int
    get_p50_ms_shm: float
    get_p50_ms_tcp: float


def add_transfer_cost_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block-sizes", default="1MiB,128KiB", help="comma-separated sizes")
    parser.add_argument("--put-bytes", default="512MiB", help="bytes put per round")
    parser.add_argument("--chain-blocks", type=int, default=64, help="blocks per put")
    parser.add_argument("--rounds", type=int, default=7, help="put rounds (the first warms up)")
    parser.add_argument("--get-blocks", type=int, default=4, help="blocks per small get")
    parser.add_argument("--gets", type=int, default=1500, help="small gets per path")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_transfer_cost(args: argparse.Namespace) -> int:
    if args.rounds < 2 or args.chain_blocks < 1 or args.get_blocks < 1 or args.gets < 1:
        raise SystemExit(
            "kvstore-bench transfer-cost: --rounds must be at least 2, and --chain-blocks, "
            "--get-blocks and --gets at least 1"
        )
    try:
        sizes = [parse_size(part) for part in args.block_sizes.split(",")]
        put_bytes = parse_size(args.put_bytes)
        for size in sizes:
            layout_for(size)
    except ValueError as error:
        raise SystemExit(f"kvstore-bench transfer-cost: {error}") from None
    costs = [
        measure(size, put_bytes, args.chain_blocks, args.rounds, args.get_blocks, args.gets)
        for size in sizes
    ]
    if args.json:
        print(json.dumps([asdict(cost) for cost in costs]))
        return 0
    print("one daemon in its own process; TCP puts (shared memory off), then small gets")
    print(
        f"{'block':>9} {'put: daemon CPU-s/GB':>21} {'put GB/s':>9} "
        f"{'get of':>8} {'p50 shm':>9} {'p50 TCP':>9}"
    )
    for cost in costs:
        print(
            f"{human_bytes(cost.block_bytes):>9} {cost.put_daemon_cpu_s_per_gb:>21.3f} "
            f"{cost.put_gbps:>9.2f} {cost.get_blocks:>6} bl "
            f"{cost.get_p50_ms_shm:>6.3f} ms {cost.get_p50_ms_tcp:>6.3f} ms"
        )
    return 0


def measure(
    block_bytes: int, put_bytes: int, chain_blocks: int, rounds: int, get_blocks: int, gets: int
) -> TransferCost:
    layout = layout_for(block_bytes)
    # Pages no larger than a block: a smaller block in a 1 MiB page would waste the rest.
    page_bytes = min(1 << 20, 1 << (block_bytes.bit_length() - 1))
    dram = 2 * put_bytes + (256 << 20)
    flags = ["--dram-bytes", str(dram), "--page-bytes", str(page_bytes), "--log-level", "warning"]
    namespace = Namespace(
        tenant="bench", model_fingerprint=f"transfer-cost-{block_bytes}", layout=layout
    )
    with spawned_server(flags) as target:
        puts = asyncio.run(_puts(target, namespace, put_bytes, chain_blocks, rounds))
        shm = asyncio.run(_gets(target, namespace, get_blocks, gets, shared_memory=True))
        tcp = asyncio.run(_gets(target, namespace, get_blocks, gets, shared_memory=False))
    cpu, gbps = zip(*puts[1:], strict=True)  # the first round warms up
    return TransferCost(
        block_bytes=block_bytes,
        put_daemon_cpu_s_per_gb=statistics.median(cpu),
        put_gbps=statistics.median(gbps),
        get_blocks=get_blocks,
        get_p50_ms_shm=shm,
        get_p50_ms_tcp=tcp,
    )


async def _puts(
    target: str, namespace: Namespace, put_bytes: int, chain_blocks: int, rounds: int
) -> list[tuple[float, float]]:
    """(daemon CPU-s per GB, GB/s) of each round of TCP puts."""
    layout = namespace.layout
    num_chains = max(1, put_bytes // (chain_blocks * layout.block_bytes))
    moved_gb = num_chains * chain_blocks * layout.block_bytes / 1e9
    source = torch.randn(chain_blocks, layout.num_layers, *layout.layer_shape).to(
        layout.dtype.torch_dtype
    )
    samples = []
    async with KVClient(target, namespace, options=ClientOptions(shared_memory=False)) as client:
        for round_number in range(rounds):
            chains = [
                [b"r%d-c%d-%d" % (round_number, chain, block) for block in range(chain_blocks)]
                for chain in range(num_chains)
            ]
            cpu_before = (await client.stats()).process_cpu_us
            started = time.perf_counter()
            for chain in chains:
                result = await client.put_blocks(chain, source, form=KVForm.BLOCKS)
                if result.num_committed != chain_blocks:
                    raise RuntimeError(f"a put stored {result.num_committed} of {chain_blocks}")
            seconds = time.perf_counter() - started
            cpu_s = ((await client.stats()).process_cpu_us - cpu_before) / 1e6
            samples.append((cpu_s / moved_gb, moved_gb / seconds))
            for chain in chains:
                await client.delete(chain[:1])
    return samples


async def _gets(
    target: str, namespace: Namespace, num_blocks: int, gets: int, *, shared_memory: bool
) -> float:
    """The p50 in ms of a get of `num_blocks` stored blocks, one call at a time."""
    layout = namespace.layout
    path = b"shm" if shared_memory else b"tcp"  # each path its own blocks
    keys = [b"small-get-%s-%d" % (path, block) for block in range(num_blocks)]
    source = torch.randn(num_blocks, layout.num_layers, *layout.layer_shape).to(
        layout.dtype.torch_dtype
    )
    dest = torch.empty_like(source)
    options = ClientOptions(shared_memory=shared_memory)
    async with KVClient(target, namespace, options=options) as client:
        await client.put_blocks(keys, source, form=KVForm.BLOCKS)
        seconds = []
        for call in range(gets + gets // 10):  # the first tenth warms up
            started = time.perf_counter()
            if await client.get_into(keys, dest, form=KVForm.BLOCKS) != num_blocks:
                raise RuntimeError("a small get missed its stored blocks")
            if call >= gets // 10:
                seconds.append(time.perf_counter() - started)
        if not torch.equal(dest.view(torch.uint8), source.view(torch.uint8)):
            raise RuntimeError("a small get returned the wrong bytes")
    return statistics.median(seconds) * 1e3
