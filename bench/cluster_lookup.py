"""`kvstore-bench cluster lookup`: a long chain's lookup latency on N nodes against 1.

A chain of `keys` small blocks is put, then looked up whole (every key a hit), one call
at a time from one client, against three stores running at once:

- "1 daemon": one `kvstore-server`, its HOST:PORT as the target (no cluster client);
- "1 node": a local cluster of one daemon, through the cluster client (`etcd://`);
- "N nodes": a local cluster of N daemons, through the cluster client.

The cluster client asks every owner of the chain's runs at once, each for its runs back
to back, so N nodes cost one parallel round trip, not one per run. The cases take turns
in short rounds, so a change in the shared machine's speed lands on all of them alike.
The goal: N nodes' p50 at most 1.5x one node's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import torch

from kvstore.bench.cluster_report import PartResult, verdict
from kvstore.bench.nodes import local_cluster
from kvstore.bench.spawn import spawned_server
from kvstore.client import DType, KVClient, KVForm, KVLayout, Namespace

GOAL_P50_RATIO = 1.5
_LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=16, dtype=DType.FLOAT16, block_tokens=16)
_DRAM_BYTES = 96 << 20
_PAGE_BYTES = 4096
_ROUNDS = 10
_WARMUP = 20
SINGLE_DAEMON, ONE_NODE = "1 daemon", "1 node"


@dataclass(frozen=True)
class LookupSetup:
    nodes: int = 3
    keys: int = 1000
    iterations: int = 1000


def measure_lookup(setup: LookupSetup) -> PartResult:
    server_args = ["--log-level", "warning"]
    with contextlib.ExitStack() as stack:
        single = stack.enter_context(
            spawned_server(
                ["--dram-bytes", str(_DRAM_BYTES), "--page-bytes", str(_PAGE_BYTES), *server_args]
            )
        )
        targets = {SINGLE_DAEMON: single}
        for nodes in (1, setup.nodes):
            cluster = local_cluster(
                nodes, total_dram_bytes=_DRAM_BYTES, page_bytes=_PAGE_BYTES, server_args=server_args
            )
            targets[_label(nodes)] = stack.enter_context(cluster).etcd_target
        samples = asyncio.run(_measure(targets, setup.keys, setup.iterations))
    return _result(setup, samples)


def _label(nodes: int) -> str:
    return ONE_NODE if nodes == 1 else f"{nodes} nodes"


async def _timed(call: Callable[[], Awaitable[object]], count: int) -> list[float]:
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        await call()
        seconds.append(time.perf_counter() - start)
    return seconds


async def _measure(
    targets: dict[str, str], num_keys: int, iterations: int
) -> dict[str, np.ndarray]:
    namespace = Namespace(tenant="bench", model_fingerprint="cluster-lookup", layout=_LAYOUT)
    tokens = np.arange(num_keys * _LAYOUT.block_tokens, dtype=np.int64)
    kv = torch.zeros((num_keys, 1, *_LAYOUT.layer_shape), dtype=torch.float16)
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            name: await stack.enter_async_context(KVClient(target, namespace))
            for name, target in targets.items()
        }
        keys = next(iter(clients.values())).keys(tokens)
        for name, client in clients.items():
            result = await client.put_blocks(keys, kv, form=KVForm.BLOCKS)
            if result.num_committed != num_keys:
                raise RuntimeError(f"{name}: put stored {result.num_committed} of {num_keys}")
            if (await client.lookup_keys(keys)).num_matched != num_keys:
                raise RuntimeError(f"{name}: the stored chain does not match whole")
        for client in clients.values():
            await _timed(lambda client=client: client.lookup_keys(keys), _WARMUP)  # type: ignore[misc]
        samples: dict[str, list[float]] = {name: [] for name in clients}
        per_round = max(1, iterations // _ROUNDS)
        for _ in range(_ROUNDS):
            for name, client in clients.items():
                samples[name] += await _timed(
                    lambda client=client: client.lookup_keys(keys),  # type: ignore[misc]
                    per_round,
                )
    return {name: np.array(seconds) * 1000 for name, seconds in samples.items()}


def _result(setup: LookupSetup, samples: dict[str, np.ndarray]) -> PartResult:
    figures = {
        name: {
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()),
            "count": int(ms.size),
        }
        for name, ms in samples.items()
    }
    for row in figures.values():
        row["p50_ratio_to_1_node"] = row["p50_ms"] / figures[ONE_NODE]["p50_ms"]
        row["p50_ratio_to_1_daemon"] = row["p50_ms"] / figures[SINGLE_DAEMON]["p50_ms"]
    spread = figures[_label(setup.nodes)]
    met = spread["p50_ratio_to_1_node"] <= GOAL_P50_RATIO
    rows = [
        [
            name,
            f"{row['p50_ms']:.3f}",
            f"{row['p99_ms']:.3f}",
            f"{row['max_ms']:.3f}",
            f"{row['p50_ratio_to_1_node']:.2f}x",
            f"{row['p50_ratio_to_1_daemon']:.2f}x",
        ]
        for name, row in figures.items()
    ]
    notes = [
        f"LookupPrefix of a {setup.keys}-key chain (all hits), one call at a time, "
        f"{setup.iterations} per case in {_ROUNDS} alternating rounds",
        "1 daemon: its HOST:PORT; 1 node and N nodes: the cluster client over etcd://",
        f"goal: {setup.nodes} nodes' p50 <= {GOAL_P50_RATIO}x 1 node's: {verdict(met)}",
    ]
    return PartResult(
        part="lookup",
        title=f"lookup latency of a {setup.keys}-key chain, {setup.nodes} nodes vs 1",
        columns=["store", "p50 ms", "p99 ms", "max ms", "p50 ÷ 1 node", "p50 ÷ 1 daemon"],
        rows=rows,
        data={
            "keys": setup.keys,
            "iterations": setup.iterations,
            "cases": figures,
            "goal_p50_ratio": GOAL_P50_RATIO,
            "goal_met": met,
        },
        notes=notes,
    )
