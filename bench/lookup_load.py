"""`kvstore-bench lookup --under-load GBPS`: lookups while other processes move bulk bytes.

The daemon runs in its own process. This process puts a chain of `--keys` blocks, then
looks the whole chain up, one call after another, for `--duration` seconds twice: first
on the idle daemon, then while `kvstore.bench.bulk_load` processes put and get blocks
at GBPS (GB/s, put and got bytes together). For each phase it prints the lookups' p50,
p99 and max, and the daemon's own event-loop lag (Stats: the longest and the p99 late
wake-up of its loop probe over the last 10 s, read as the phase ends; a phase as long
as that window sees only its own lag). A lookup that waits behind a put's or a get's
work on the daemon's loop shows in both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from kvstore.allocator import tune_allocator
from kvstore.bench.bulk_load import BulkLoad
from kvstore.bench.spawn import spawned_server
from kvstore.client import DType, KVClient, KVForm, KVLayout, Namespace
from kvstore.units import parse_size

_LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=16, dtype=DType.FLOAT16, block_tokens=16)
_WARMUP = 50
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


class ChainLookups:
    """A stored chain of `num_keys` blocks and a client that looks it up."""

    def __init__(self, client: KVClient, num_keys: int) -> None:
        self._client = client
        self._num_keys = num_keys
        tokens = np.arange(num_keys * _LAYOUT.block_tokens, dtype=np.int64)
        self._keys = client.keys(tokens)

    async def store(self) -> None:
        kv = torch.zeros((self._num_keys, 1, *_LAYOUT.layer_shape), dtype=torch.float16)
        await self._client.put_blocks(self._keys, kv, form=KVForm.BLOCKS)
        await self._lookup_once()

    async def _lookup_once(self) -> None:
        matched = (await self._client.lookup_keys(self._keys)).num_matched
        if matched != self._num_keys:
            raise RuntimeError(f"the chain matched {matched} of {self._num_keys} keys")

    async def run_for(self, duration_s: float) -> list[float]:
        """Back-to-back lookups of the whole chain for `duration_s`: each one's seconds."""
        for _ in range(_WARMUP):
            await self._lookup_once()
        samples = []
        end = time.perf_counter() + duration_s
        while (start := time.perf_counter()) < end:
            await self._lookup_once()
            samples.append(time.perf_counter() - start)
        return samples

    async def phase(self, duration_s: float, load_gbps: float = 0.0) -> PhaseResult:
        ms = np.array(await self.run_for(duration_s)) * 1000
        stats = await self._client.stats()
        return PhaseResult(
            num_lookups=len(ms),
            p50_ms=float(np.percentile(ms, 50)),
            p99_ms=float(np.percentile(ms, 99)),
            max_ms=float(ms.max()),
            loop_lag_max_ms=stats.loop_lag_max_us / 1000,
            loop_lag_p99_ms=stats.loop_lag_p99_us / 1000,
            load_gbps=load_gbps,
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
) -> dict[str, PhaseResult]:
    """The idle phase, then the loaded one; the load processes connect during the first."""
    namespace = Namespace(tenant="bench", model_fingerprint="lookup-under-load", layout=_LAYOUT)
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
            idle = await lookups.phase(duration_s)
            load.start()
            loaded = await lookups.phase(duration_s)
            moved = await asyncio.to_thread(load.stop)
        return {"idle": idle, "loaded": replace(loaded, load_gbps=moved.gbps)}

    with load:  # the load processes are connected, and idle, before the first phase
        return asyncio.run(phases())


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


_SERVER_ARGS = ["--dram-bytes", "1GiB", "--page-bytes", "64KiB", "--log-level", "warning"]


def run_under_load(args: argparse.Namespace) -> int:
    if args.compare_auth:
        raise SystemExit("kvstore-bench lookup: --under-load and --compare-auth do not mix")
    if not args.duration > 0:
        raise SystemExit("kvstore-bench lookup: --duration must be above 0 seconds")
    tune_allocator()
    with contextlib.ExitStack() as stack:
        target = args.target or stack.enter_context(spawned_server(_SERVER_ARGS))
        try:
            results = measure_under_load(
                target,
                args.under_load,
                num_keys=args.keys,
                duration_s=args.duration,
                num_processes=args.load_processes,
                block_bytes=parse_size(args.load_block),
                transfer_bytes=parse_size(args.load_transfer),
            )
        except ValueError as error:
            raise SystemExit(f"kvstore-bench lookup: {error}") from None
    if args.json:
        print(json.dumps({name: asdict(row) for name, row in results.items()}, indent=2))
        return 0
    print(
        f"LookupPrefix of a {args.keys}-key chain, back to back for {args.duration:g} s per "
        f"phase; the load: {args.load_processes} processes putting and getting "
        f"{args.load_transfer} transfers of {args.load_block} blocks"
    )
    for name, row in results.items():
        load = f"load {row.load_gbps:.2f} GB/s" if name == "loaded" else "no load"
        print(
            f"  {name:7} ({load:16})  {row.num_lookups:6} lookups  p50 {row.p50_ms:.3f} ms  "
            f"p99 {row.p99_ms:.3f} ms  max {row.max_ms:.3f} ms  |  daemon loop lag "
            f"max {row.loop_lag_max_ms:.1f} ms  p99 {row.loop_lag_p99_ms:.1f} ms"
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
