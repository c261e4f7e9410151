"""`kvstore-bench lookup`: LookupPrefix latency for a long chain, client to server process.

Puts a chain of `--keys` small blocks, then times `--iterations` lookups of the whole
chain (all hits) and of a chain that misses at its first key, one at a time from one
client, and prints p50/p99/max. The baseline, measured in the same run, is an empty
RPC (Stats): the floor of any call through Python gRPC on this machine. The server
runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import numpy as np
import torch

from kvstore.allocator import tune_allocator
from kvstore.bench.spawn import spawned_server
from kvstore.client import DType, KVClient, KVForm, KVLayout, Namespace

_LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=16, dtype=DType.FLOAT16, block_tokens=16)


async def measure_lookups(
    target: str, num_keys: int, iterations: int
) -> dict[str, dict[str, float]]:
    namespace = Namespace(tenant="bench", model_fingerprint="lookup", layout=_LAYOUT)
    tokens = np.arange(num_keys * _LAYOUT.block_tokens, dtype=np.int64)
    async with KVClient(target, namespace) as client:
        keys = client.keys(tokens)
        kv = torch.zeros((num_keys, 1, *_LAYOUT.layer_shape), dtype=torch.float16)
        await client.put_blocks(keys, kv, form=KVForm.BLOCKS)
        missing = [b"absent-" + key[:16] for key in keys]
        if (await client.lookup_keys(keys)).num_matched != num_keys:
            raise RuntimeError("the chain was not stored")
        if (await client.lookup_keys(missing)).num_matched != 0:
            raise RuntimeError("a chain that was never stored matched")
        results = {}
        cases: dict[str, Callable[[], Awaitable[object]]] = {
            "empty rpc": client.stats,
            "hit": lambda: client.lookup_keys(keys),
            "miss": lambda: client.lookup_keys(missing),
        }
        for name, call in cases.items():
            for _ in range(20):  # warm-up
                await call()
            samples = []
            for _ in range(iterations):
                start = time.perf_counter()
                await call()
                samples.append(time.perf_counter() - start)
            ms = np.array(samples) * 1000
            results[name] = {
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
                "max_ms": float(ms.max()),
            }
        return results


def add_lookup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keys", type=int, default=1000, help="blocks in the chain")
    parser.add_argument("--iterations", type=int, default=500, help="timed lookups per case")
    parser.add_argument("--target", help="HOST:PORT of a running server (default: start one)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run_lookup(args: argparse.Namespace) -> int:
    tune_allocator()
    if args.target:
        results = asyncio.run(measure_lookups(args.target, args.keys, args.iterations))
    else:
        with spawned_server(["--dram-bytes", "256MiB", "--log-level", "warning"]) as target:
            results = asyncio.run(measure_lookups(target, args.keys, args.iterations))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"LookupPrefix of a {args.keys}-key chain, {args.iterations} sequential calls:")
    floor = results["empty rpc"]["p50_ms"]
    for name, row in results.items():
        print(
            f"  {name:9}  p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  "
            f"max {row['max_ms']:.3f} ms  (p50 {row['p50_ms'] / floor:.1f}x the empty RPC)"
        )
    return 0
