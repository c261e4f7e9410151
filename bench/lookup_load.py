"""`kvstore-bench lookup --under-load GBPS`: lookups while other processes move bulk bytes.

The daemon runs in its own process. This process puts a chain of `--keys` blocks, then
looks the whole chain up, one call after another, for `--duration` seconds twice: first
on the idle daemon, then while `kvstore.bench.bulk_load` processes put and get blocks
at GBPS (GB/s, put and got bytes together). For each phase it prints the lookups' p50,
p99 and max, and the daemon's own event-loop lag (Stats: the longest and the p99 late
wake-up of its loop probe over the last 10 s, read as the phase ends; a phase as long
as that window sees only its own lag). A lookup that waits behind a put's or a get's
work on the daemon's loop shows in both. Of the longest lag it also prints how long the
daemon's loop thread waited for a core (Stats' loop_lag_max_runqueue_us): near all of
it, the daemon was not scheduled (every core busy); near none, its loop was busy.

`--resident-blocks N` adds a phase between the two: lookups while another process stores
N more small blocks (chains in another namespace), so the daemon's index grows to a
full pool's; the loaded phase then runs beside that index. Whatever costs the daemon
time per block it holds (a garbage-collector pass over every object) shows in the
lookups' tail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from kvstore.allocator import tune_allocator
from kvstore.bench.bulk_load import BulkLoad
from kvstore.bench.spawn import spawned_server
from kvstore.client import DType, KVClient, KVForm, KVLayout, Namespace
from kvstore.units import parse_size

LOOKUP_LAYOUT = KVLayout(
    num_layers=1, num_kv_heads=1, head_dim=16, dtype=DType.FLOAT16, block_tokens=16
)
_WARMUP = 50
_RESIDENT_CHAIN = 1000  # blocks per put of the resident blocks
_RESIDENT_PAGE_BYTES = 4096  # one page per resident block (a block is 1 KiB)
GOAL_P99_MS = 3.0
GOAL_LOOP_LAG_MS = 5.0


@dataclass(frozen=True, slots=True)
class PhaseResult:
    """One phase's lookups and the daemon's loop lag as the phase ended."""

    num_lookups: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    loop_lag_max_ms: float
    loop_lag_p99_ms: float
    load_gbps: float  # what the load processes moved (0 on the idle daemon)
    # Of loop_lag_max_ms, the daemon's loop thread waiting for a core (the machine, not
    # the loop; 0 where the kernel does not say).
    loop_lag_max_runqueue_ms: float = 0.0


class ChainLookups:
    """A stored chain of `num_keys` blocks and a client that looks it up."""

    def __init__(self, client: KVClient, num_keys: int) -> None:
        self._client = client
        self._num_keys = num_keys
        tokens = np.arange(num_keys * LOOKUP_LAYOUT.block_tokens, dtype=np.int64)
        self._keys = client.keys(tokens)

    async def store(self) -> None:
        kv = torch.zeros((self._num_keys, 1, *LOOKUP_LAYOUT.layer_shape), dtype=torch.float16)
        await self._client.put_blocks(self._keys, kv, form=KVForm.BLOCKS)
        await self._lookup_once()

    async def _lookup_once(self) -> None:
        matched = (await self._client.lookup_keys(self._keys)).num_matched
        if matched != self._num_keys:
            raise RuntimeError(f"the chain matched {matched} of {self._num_keys} keys")

    async def run_for(self, duration_s: float) -> list[float]:
        """Back-to-back lookups of the whole chain for `duration_s` after the warm-up (on
        a busy machine the warm-up alone can take longer): each one's seconds."""
        await self._warm_up()
        end = time.perf_counter() + duration_s
        return await self._sample_while(lambda: time.perf_counter() < end)

    async def run_while(self, going: Callable[[], bool]) -> list[float]:
        """Back-to-back lookups while `going()`, at least one: each one's seconds."""
        await self._warm_up()
        return await self._sample_while(going)

    async def _warm_up(self) -> None:
        for _ in range(_WARMUP):
            await self._lookup_once()

    async def _sample_while(self, going: Callable[[], bool]) -> list[float]:
        samples = []
        while True:  # at least one: a phase always has a figure
            start = time.perf_counter()
            await self._lookup_once()
            samples.append(time.perf_counter() - start)
            if not going():
                return samples

    async def phase(self, duration_s: float, load_gbps: float = 0.0) -> PhaseResult:
        return await self.result(await self.run_for(duration_s), load_gbps)

    async def filling_phase(self, target: str, num_blocks: int) -> PhaseResult:
        """Lookups while another process stores `num_blocks` resident blocks."""
        filler = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kvstore.bench.lookup_load", target, str(num_blocks)
        )
        try:
            samples = await self.run_while(lambda: filler.returncode is None)
        finally:
            if filler.returncode is None:
                filler.kill()
            code = await filler.wait()
        if code != 0:
            raise RuntimeError(f"storing the resident blocks failed (exit {code})")
        return await self.result(samples, 0.0)

    async def result(self, samples: list[float], load_gbps: float) -> PhaseResult:
        ms = np.array(samples) * 1000
        stats = await self._client.stats()
        return PhaseResult(
            num_lookups=len(ms),
            p50_ms=float(np.percentile(ms, 50)),
            p99_ms=float(np.percentile(ms, 99)),
            max_ms=float(ms.max()),
            loop_lag_max_ms=stats.loop_lag_max_us / 1000,
            loop_lag_p99_ms=stats.loop_lag_p99_us / 1000,
            load_gbps=load_gbps,
            loop_lag_max_runqueue_ms=stats.loop_lag_max_runqueue_us / 1000,
        )


def measure_under_load(
    target: str,
    rate_gbps: float,
    *,
    num_keys: int,
    duration_s: float,
    num_processes: int,
    block_bytes: int,
    transfer_bytes: int,
    resident_blocks: int = 0,
) -> dict[str, PhaseResult]:
    """The idle phase, then the loaded one; the load processes connect during the first."""
    namespace = Namespace(
        tenant="bench", model_fingerprint="lookup-under-load", layout=LOOKUP_LAYOUT
    )
    load = BulkLoad(
        target,
        rate_gbps,
        num_processes=num_processes,
        block_bytes=block_bytes,
        transfer_bytes=transfer_bytes,
    )

    async def phases() -> dict[str, PhaseResult]:
        async with KVClient(target, namespace) as client:
            lookups = ChainLookups(client, num_keys)
            await lookups.store()
            results = {"idle": await lookups.phase(duration_s)}
            if resident_blocks > 0:
                results["filling"] = await lookups.filling_phase(target, resident_blocks)
            load.start()
            loaded = await lookups.phase(duration_s)
            moved = await asyncio.to_thread(load.stop)
        return {**results, "loaded": replace(loaded, load_gbps=moved.gbps)}

    with load:  # the load processes are connected, and idle, before the first phase
        return asyncio.run(phases())


async def store_resident_blocks(target: str, num_blocks: int) -> None:
    """`num_blocks` small blocks in chains of _RESIDENT_CHAIN, in a namespace of their own."""
    if num_blocks <= 0:
        return
    namespace = Namespace(tenant="bench", model_fingerprint="resident", layout=LOOKUP_LAYOUT)
    async with KVClient(target, namespace) as client:
        for first in range(0, num_blocks, _RESIDENT_CHAIN):
            count = min(_RESIDENT_CHAIN, num_blocks - first)
            keys = [b"resident-%d" % index for index in range(first, first + count)]
            kv = torch.zeros((count, 1, *LOOKUP_LAYOUT.layer_shape), dtype=torch.float16)
            result = await client.put_blocks(keys, kv, form=KVForm.BLOCKS)
            if result.num_committed != count:
                raise RuntimeError(
                    f"the daemon took {result.num_committed} of {count} resident blocks: "
                    "give it more DRAM (--target) or ask for fewer (--resident-blocks)"
                )


def resident_server_args(num_blocks: int) -> list[str]:
    """The spawned daemon's flags: room for the resident blocks beside the load's GiB."""
    if num_blocks <= 0:
        return _SERVER_ARGS
    dram = (1 << 30) + num_blocks * _RESIDENT_PAGE_BYTES
    return ["--dram-bytes", str(dram), "--page-bytes", str(_RESIDENT_PAGE_BYTES), *_SERVER_LOG]


def add_under_load_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--under-load: lookups beside bulk transfers")
    group.add_argument(
        "--under-load",
        type=float,
        metavar="GBPS",
        help="time lookups on an idle daemon, then while other processes put and get "
        "blocks at GBPS GB/s in total; print both, and the daemon's event-loop lag",
    )
    group.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="seconds of lookups per phase (default 10: the daemon's loop-lag window)",
    )
    group.add_argument("--load-processes", type=int, default=2, help="bulk-load processes")
    group.add_argument("--load-block", default="1MiB", help="block size of the bulk load")
    group.add_argument(
        "--load-transfer", default="32MiB", help="bytes per bulk put or get (whole blocks)"
    )
    group.add_argument(
        "--resident-blocks",
        type=int,
        default=0,
        help="small blocks stored first, so the daemon holds an index this large "
        "(a spawned daemon then has 4 KiB pages and room for them)",
    )


_SERVER_LOG = ["--log-level", "warning"]
_SERVER_ARGS = ["--dram-bytes", "1GiB", "--page-bytes", "64KiB", *_SERVER_LOG]


def run_under_load(args: argparse.Namespace) -> int:
    if args.compare_auth:
        raise SystemExit("kvstore-bench lookup: --under-load and --compare-auth do not mix")
    if not args.duration > 0:
        raise SystemExit("kvstore-bench lookup: --duration must be above 0 seconds")
    tune_allocator()
    with contextlib.ExitStack() as stack:
        if args.resident_blocks < 0:
            raise SystemExit("kvstore-bench lookup: --resident-blocks must be 0 or more")
        server_args = resident_server_args(args.resident_blocks)
        target = args.target or stack.enter_context(spawned_server(server_args))
        try:
            results = measure_under_load(
                target,
                args.under_load,
                num_keys=args.keys,
                duration_s=args.duration,
                num_processes=args.load_processes,
                block_bytes=parse_size(args.load_block),
                transfer_bytes=parse_size(args.load_transfer),
                resident_blocks=args.resident_blocks,
            )
        except ValueError as error:
            raise SystemExit(f"kvstore-bench lookup: {error}") from None
    if args.json:
        print(json.dumps({name: asdict(row) for name, row in results.items()}, indent=2))
        return 0
    resident = f", {args.resident_blocks} more blocks stored" if args.resident_blocks else ""
    print(
        f"LookupPrefix of a {args.keys}-key chain{resident}, back to back for "
        f"{args.duration:g} s per phase; the load: {args.load_processes} processes putting "
        f"and getting {args.load_transfer} transfers of {args.load_block} blocks"
    )
    for name, row in results.items():
        load = {"loaded": f"load {row.load_gbps:.2f} GB/s", "filling": "index growing"}.get(
            name, "no load"
        )
        print(
            f"  {name:7} ({load:16})  {row.num_lookups:6} lookups  p50 {row.p50_ms:.3f} ms  "
            f"p99 {row.p99_ms:.3f} ms  max {row.max_ms:.3f} ms  |  daemon loop lag "
            f"max {row.loop_lag_max_ms:.1f} ms ({row.loop_lag_max_runqueue_ms:.1f} waiting "
            f"for a core)  p99 {row.loop_lag_p99_ms:.1f} ms"
        )
    idle, loaded = results["idle"], results["loaded"]
    print(
        f"  loaded / idle: p50 {loaded.p50_ms / idle.p50_ms:.2f}x  "
        f"p99 {loaded.p99_ms / idle.p99_ms:.2f}x  max {loaded.max_ms / idle.max_ms:.2f}x"
    )
    if loaded.load_gbps < 0.9 * args.under_load:
        print(
            f"  note: the load reached {loaded.load_gbps:.2f} of {args.under_load:g} GB/s "
            "asked for (the machine's cores ran out)"
        )
    verdict = "met" if loaded.p99_ms <= GOAL_P99_MS else "not met"
    print(f"  goal: loaded lookup p99 <= {GOAL_P99_MS:g} ms: {verdict}")
    verdict = "met" if loaded.loop_lag_max_ms <= GOAL_LOOP_LAG_MS else "not met"
    print(f"  goal: loaded loop lag max <= {GOAL_LOOP_LAG_MS:g} ms: {verdict}")
    return 0


if __name__ == "__main__":  # the filling phase's process: TARGET NUM_BLOCKS
    asyncio.run(store_resident_blocks(sys.argv[1], int(sys.argv[2])))
