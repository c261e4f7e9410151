"""`kvstore-bench watch`: what WatchBlocks watchers cost the puts of small blocks.

One kvstore-server process; this process puts chains of small blocks (4 KiB) from a few
concurrent tasks and counts blocks committed per second. Rounds alternate: no watcher
at all (the baseline, measured in the same run), then N watcher processes following the
namespace (`python -m kvstore.bench.watch TARGET`), each applying every batch to a
BlockView. A round with watchers starts them, waits for each one's SNAPSHOT_END, puts,
then puts a sentinel block and waits until every watcher has seen it: so the round also
checks that each watcher saw every block it put, and reports how far behind the
slowest one finished. The watcher processes share the machine's cores with the server
and the load: on a small host that is part of what the ratio shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from kvstore.bench.spawn import spawned_server
from kvstore.client import (
    BlockEventKind,
    BlockView,
    ClientOptions,
    DType,
    KVClient,
    KVForm,
    KVLayout,
    Namespace,
)

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, dtype=DType.FLOAT16, block_tokens=16)
NAMESPACE = Namespace(tenant="bench", model_fingerprint="watch", layout=LAYOUT)
_SERVER_ARGS = ["--dram-bytes", "256MiB", "--page-bytes", "4KiB", "--log-level", "warning"]
_READY = "ready"


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--watchers", type=int, default=4, help="watcher processes (default 4)")
    parser.add_argument("--puts", type=int, default=300, help="puts per round (default 300)")
    parser.add_argument(
        "--blocks-per-put", type=int, default=8, help="4 KiB blocks per put (default 8)"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="puts in flight (default 4)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of each case, alternating (default 3)"
    )
    parser.add_argument(
        "--grpc-only", action="store_true", help="puts over gRPC, not the TCP data plane"
    )
    parser.add_argument(
        "--control-wakers",
        action="store_true",
        help="a third case: as many processes as --watchers that only wake every 0.5 ms, "
        "touching no kvstore (what busier cores alone do to the puts' speed)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


# -- the watcher process ---------------------------------------------------------------------


async def follow(target: str, sentinel_prefix: bytes) -> None:
    """Apply every batch; say `ready` at the first SNAPSHOT_END, and print the number of
    STORED events and GAPs seen once a STORED of a key with `sentinel_prefix` arrives."""
    view = BlockView()
    num_stored = num_gaps = 0
    async with KVClient(target, NAMESPACE) as client:
        stream = client.watch_blocks()
        async with contextlib.aclosing(stream):
            async for batch in stream:
                view.apply(batch)
                for event in batch.events:
                    if event.kind is BlockEventKind.SNAPSHOT_END and num_stored == 0:
                        print(_READY, flush=True)
                    elif event.kind is BlockEventKind.GAP:
                        num_gaps += 1
                    elif event.kind is BlockEventKind.STORED:
                        num_stored += 1
                        if event.key.startswith(sentinel_prefix):
                            print(json.dumps({"stored": num_stored, "gaps": num_gaps}), flush=True)
                            return


@contextlib.contextmanager
def watcher_processes(
    target: str, count: int, sentinel: bytes
) -> Iterator[list[subprocess.Popen[str]]]:
    command = [sys.executable, "-m", "kvstore.bench.watch", target, sentinel.decode()]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        for _ in range(count)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            if process.stdout.readline().strip() != _READY:
                raise RuntimeError("a watcher process did not start; see its stderr")
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
            process.wait(timeout=30)


# -- the load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundResult:
    blocks_per_s: float
    server_cpu_us_per_block: float  # the daemon's CPU time (all threads) per block put


@dataclass
class WatchResults:
    watchers: int
    blocks_per_put: int
    block_bytes: int
    rounds_none: list[RoundResult] = field(default_factory=list)
    rounds_watched: list[RoundResult] = field(default_factory=list)
    rounds_wakers: list[RoundResult] = field(default_factory=list)  # --control-wakers
    slowest_watcher_done_s: float = 0.0  # after the last put, until every watcher saw it
    every_watcher_saw_every_block: bool = True

    def median(self, rounds: list[RoundResult], name: str) -> float:
        values: list[float] = [getattr(result, name) for result in rounds]
        return statistics.median(values)

    def ratio(self, name: str) -> float:
        """watched ÷ none, of the medians of `name`."""
        return self.median(self.rounds_watched, name) / self.median(self.rounds_none, name)

    def to_json(self) -> dict[str, object]:
        summary = dataclasses.asdict(self)
        for name in ("blocks_per_s", "server_cpu_us_per_block"):
            summary[f"{name}_none"] = self.median(self.rounds_none, name)
            summary[f"{name}_watched"] = self.median(self.rounds_watched, name)
            summary[f"{name}_ratio"] = self.ratio(name)
            if self.rounds_wakers:
                summary[f"{name}_wakers"] = self.median(self.rounds_wakers, name)
        return summary


async def put_round(client: KVClient, round_name: str, args: argparse.Namespace) -> RoundResult:
    """`args.puts` puts of fresh chains: blocks committed per second, and the daemon's
    CPU time per block (from Stats before and after)."""
    kv = torch.zeros((args.blocks_per_put, 1, *LAYOUT.layer_shape), dtype=torch.float16)
    pending = list(range(args.puts))
    committed = 0

    async def worker() -> None:
        nonlocal committed
        while pending:
            index = pending.pop()
            keys = [f"{round_name}-{index}-{i}".encode() for i in range(args.blocks_per_put)]
            result = await client.put_blocks(keys, kv, form=KVForm.BLOCKS)
            committed += result.num_committed

    cpu_before = (await client.stats()).process_cpu_us
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    seconds = time.perf_counter() - start
    cpu_us = (await client.stats()).process_cpu_us - cpu_before
    if committed != args.puts * args.blocks_per_put:
        raise RuntimeError(f"only {committed} blocks committed in round {round_name}")
    return RoundResult(committed / seconds, cpu_us / committed)


async def _put_one(client: KVClient, key: bytes) -> None:
    kv = torch.zeros((1, 1, *LAYOUT.layer_shape), dtype=torch.float16)
    await client.put_blocks([key], kv, form=KVForm.BLOCKS)


def measure(target: str, args: argparse.Namespace) -> WatchResults:
    results = WatchResults(args.watchers, args.blocks_per_put, LAYOUT.block_bytes)
    for round_index in range(args.rounds):
        # The cases swap order every round, so a drift in the machine's speed lands on both.
        if round_index % 2 == 0:
            results.rounds_none.append(asyncio.run(_one_round(target, f"n{round_index}", args)))
        sentinel = f"sentinel-{round_index}".encode()
        with watcher_processes(target, args.watchers, sentinel) as processes:
            results.rounds_watched.append(asyncio.run(_one_round(target, f"w{round_index}", args)))
            done = time.perf_counter()
            asyncio.run(_with_client(target, sentinel))
            for process in processes:
                assert process.stdout is not None
                report = json.loads(process.stdout.readline())
                # Each watcher started after the earlier rounds: it saw this round's
                # blocks, the warm-up block and the sentinel as STORED, and no GAP.
                expected = args.puts * args.blocks_per_put + 2
                if report["stored"] != expected or report["gaps"]:
                    results.every_watcher_saw_every_block = False
            results.slowest_watcher_done_s = max(
                results.slowest_watcher_done_s, time.perf_counter() - done
            )
        if round_index % 2 == 1:
            results.rounds_none.append(asyncio.run(_one_round(target, f"n{round_index}", args)))
        if args.control_wakers:
            with waker_processes(args.watchers):
                results.rounds_wakers.append(
                    asyncio.run(_one_round(target, f"c{round_index}", args))
                )
    return results


@contextlib.contextmanager
def waker_processes(count: int) -> Iterator[None]:
    """Processes that sleep 0.5 ms at a time and do nothing else."""
    spin = "import time\nwhile True:\n    time.sleep(0.0005)"
    processes = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    try:
        yield
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


async def _one_round(target: str, name: str, args: argparse.Namespace) -> RoundResult:
    options = ClientOptions(data_plane=not args.grpc_only)
    async with KVClient(target, NAMESPACE, options=options) as client:
        # One untimed block first: the client connects and finds the data plane.
        await _put_one(client, f"{name}-warmup".encode())
        return await put_round(client, name, args)


async def _with_client(target: str, sentinel: bytes) -> None:
    async with KVClient(target, NAMESPACE) as client:
        await _put_one(client, sentinel)


def run_watch(args: argparse.Namespace) -> int:
    if args.watchers < 1:
        raise SystemExit("kvstore-bench watch: --watchers must be >= 1")
    with spawned_server(_SERVER_ARGS) as target:
        results = measure(target, args)
    if args.json:
        print(json.dumps(results.to_json(), indent=2))
        return 0
    none, watched = results.rounds_none, results.rounds_watched
    print(
        f"puts of {args.blocks_per_put} blocks of {LAYOUT.block_bytes} B, {args.concurrency} "
        f"in flight, {args.puts} puts per round, {args.rounds} rounds per case (medians):"
    )
    cases = [("no watcher", none), (f"{args.watchers} watchers", watched)]
    if results.rounds_wakers:
        cases.append((f"{args.watchers} wakers", results.rounds_wakers))
    for label, rounds in cases:
        print(
            f"  {label:12} {results.median(rounds, 'blocks_per_s'):8.0f} blocks/s  "
            f"daemon CPU {results.median(rounds, 'server_cpu_us_per_block'):6.1f} us/block"
        )
    print(
        f"  with watchers ÷ without: {results.ratio('blocks_per_s'):.2f}x blocks/s, "
        f"{results.ratio('server_cpu_us_per_block'):.2f}x daemon CPU per block"
    )
    print(
        f"  the slowest watcher had every event {results.slowest_watcher_done_s * 1000:.0f} ms "
        f"after the last put; every watcher saw every block, no GAP: "
        f"{results.every_watcher_saw_every_block}"
    )
    return 0


if __name__ == "__main__":
    asyncio.run(follow(sys.argv[1], sys.argv[2].encode()))
