"""`kvstore-bench metrics`: what serving Prometheus metrics costs the requests.

Two daemons, each in its own process and alike but for `--metrics-port`: one without
metrics, one with them on and scraped every `--scrape-interval` by this process (a
scrape runs on the daemon's event loop, as every request does). The same work runs
against each in alternating rounds (the order flips every round), so a shift in the
machine's speed lands on both: 1,000-key lookups that hit (timed one by one), and a
put and a get of `--blocks` blocks of `--block-bytes` (timed as a whole, GB/s). It
prints each daemon's figures and, paired round by round, what metrics add to the
lookup p50 and the ratio of GB/s with metrics to without (medians of the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry, generate_latest

from kvstore.allocator import tune_allocator
from kvstore.bench.scrape import Scraper
from kvstore.bench.spawn import free_port, spawned_server
from kvstore.client import DType, KVClient, KVForm, KVLayout, Namespace
from kvstore.server import build_server, load_config
from kvstore.server.request_metrics import RequestMetrics
from kvstore.units import parse_size

_LOOKUP_LAYOUT = KVLayout(
    num_layers=1, num_kv_heads=1, head_dim=16, dtype=DType.FLOAT16, block_tokens=16
)
# Goals: metrics must not be what a deployment notices.
GOAL_LOOKUP_ADDED_MS = 0.02
GOAL_TRANSFER_RATIO = 0.95


@dataclass
class Samples:
    """One daemon's figures, one entry per kept round (the lookups: every one timed)."""

    lookup_s: list[float]
    lookup_p50_s: list[float]
    put_gbps: list[float]
    get_gbps: list[float]


def _transfer_layout(block_bytes: int) -> KVLayout:
    # 2 layers of bf16 K and V: 8 bytes a token per head-dim unit.
    head_dim = 128
    tokens = max(1, block_bytes // (2 * 2 * 2 * head_dim))
    return KVLayout(
        num_layers=2, num_kv_heads=1, head_dim=head_dim, dtype=DType.BFLOAT16, block_tokens=tokens
    )


async def _measure(targets: dict[str, str], args: argparse.Namespace) -> dict[str, Samples]:
    lookup_ns = Namespace(tenant="bench", model_fingerprint="lookup", layout=_LOOKUP_LAYOUT)
    transfer_layout = _transfer_layout(parse_size(args.block_bytes))
    transfer_ns = Namespace(tenant="bench", model_fingerprint="transfer", layout=transfer_layout)
    samples = {name: Samples([], [], [], []) for name in targets}
    async with contextlib.AsyncExitStack() as stack:
        lookups = {
            name: await stack.enter_async_context(KVClient(target, lookup_ns))
            for name, target in targets.items()
        }
        transfers = {
            name: await stack.enter_async_context(KVClient(target, transfer_ns))
            for name, target in targets.items()
        }
        tokens = np.arange(args.keys * _LOOKUP_LAYOUT.block_tokens, dtype=np.int64)
        chain = next(iter(lookups.values())).keys(tokens)
        kv = torch.zeros((args.keys, 1, *_LOOKUP_LAYOUT.layer_shape), dtype=torch.float16)
        for client in lookups.values():
            await client.put_blocks(chain, kv, form=KVForm.BLOCKS)
            if (await client.lookup_keys(chain)).num_matched != args.keys:
                raise RuntimeError("the lookup chain was not stored")
        blocks = torch.zeros(
            (args.blocks, transfer_layout.num_layers, *transfer_layout.layer_shape),
            dtype=torch.bfloat16,
        )
        moved_bytes = args.blocks * transfer_layout.block_bytes
        names = list(targets)
        for round_index in range(args.rounds + 1):  # round 0 warms up and is not kept
            # `iterations` timed lookups per daemon in all, spread over the kept rounds.
            kept = max(round_index - 1, 0)
            count = args.iterations // args.rounds + (kept < args.iterations % args.rounds)
            # Each daemon goes first in every other round: no order favours either.
            for name in names if round_index % 2 else names[::-1]:
                lookup = lookups[name].lookup_keys
                timed = []
                for _ in range(count):
                    start = time.perf_counter()
                    await lookup(chain)
                    timed.append(time.perf_counter() - start)
                client = transfers[name]
                keys = [b"r%d-b%d" % (round_index, index) for index in range(args.blocks)]
                start = time.perf_counter()
                await client.put_blocks(keys, blocks)
                put_s = time.perf_counter() - start
                dest = torch.empty_like(blocks)
                start = time.perf_counter()
                got = await client.get_into(keys, dest, form=KVForm.BLOCKS)
                get_s = time.perf_counter() - start
                if got != args.blocks:
                    raise RuntimeError(f"{name}: a get returned {got} of {args.blocks} blocks")
                await client.delete(keys[:1])  # the chain goes: DRAM stays free
                if round_index:
                    samples[name].lookup_s += timed
                    samples[name].lookup_p50_s.append(float(np.median(timed)))
                    samples[name].put_gbps.append(moved_bytes / put_s / 1e9)
                    samples[name].get_gbps.append(moved_bytes / get_s / 1e9)
    return samples


def add_metrics_cost_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keys", type=int, default=1000, help="keys in a lookup (default 1000)")
    parser.add_argument(
        "--iterations", type=int, default=2000, help="timed lookups per daemon (default 2000)"
    )
    parser.add_argument(
        "--rounds", type=int, default=20, help="alternating rounds, each daemon once (default 20)"
    )
    parser.add_argument("--blocks", type=int, default=16, help="blocks a put and a get move")
    parser.add_argument("--block-bytes", default="1MiB", help="bytes a block (default 1MiB)")
    parser.add_argument(
        "--scrape-interval",
        type=float,
        default=1.0,
        help="seconds between scrapes of the metered daemon (default 1)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures as JSON")


def observe_cost_ns(repeats: int = 5, calls: int = 20_000) -> float:
    """What a lookup's histogram observations cost, in ns: the best of `repeats` runs."""
    metrics = RequestMetrics(CollectorRegistry())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            metrics.observe_lookup(0.0008, 1 << 20)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e9


async def scrape_hold_ms(repeats: int = 20) -> float:
    """How long encoding one scrape holds a daemon's event loop, in ms: a daemon built in
    this process, the best of `repeats` encodings of its whole registry."""
    config = load_config(
        None,
        {"listen": "127.0.0.1:0", "metrics_port": 0, "data_port": -1, "log_level": "warning"},
    )
    running = await build_server(config)
    try:
        assert running.metrics is not None
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            generate_latest(running.metrics.registry)
            best = min(best, time.perf_counter() - start)
        return best * 1e3
    finally:
        await running.drain()


def run_metrics_cost(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        raise SystemExit("kvstore-bench metrics: --rounds must be at least 1")
    if args.iterations < args.rounds:
        raise SystemExit(
            f"kvstore-bench metrics: --iterations ({args.iterations}) must be at least "
            f"--rounds ({args.rounds}): each round times some lookups"
        )
    tune_allocator()
    common = ["--dram-bytes", "512MiB", "--log-level", "warning"]
    metrics_port = free_port()
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(spawned_server(common))
        metered = stack.enter_context(
            spawned_server([*common, "--metrics-port", str(metrics_port)])
        )
        scrapes = stack.enter_context(_temporary_file())
        scraper = stack.enter_context(
            Scraper(f"http://127.0.0.1:{metrics_port}/metrics", scrapes, args.scrape_interval)
        )
        samples = asyncio.run(_measure({"metrics off": plain, "metrics on": metered}, args))
    if scraper.num_failed or not scraper.num_scrapes:
        raise SystemExit(
            f"kvstore-bench metrics: {scraper.num_failed} of the scrapes failed "
            f"({scraper.num_scrapes} answered)"
        )
    figures = {
        name: {
            "lookup_p50_ms": float(np.percentile(s.lookup_s, 50) * 1e3),
            "lookup_p99_ms": float(np.percentile(s.lookup_s, 99) * 1e3),
            "put_gbps": float(np.median(s.put_gbps)),
            "get_gbps": float(np.median(s.get_gbps)),
        }
        for name, s in samples.items()
    }
    off, on = samples["metrics off"], samples["metrics on"]
    # Paired by round: each round's figure on the metered daemon against the plain one's
    # in the same round, so the machine's drift between rounds cancels; then the median.
    added_ms = float(np.median(np.subtract(on.lookup_p50_s, off.lookup_p50_s)) * 1e3)
    put_ratio = float(np.median(np.divide(on.put_gbps, off.put_gbps)))
    get_ratio = float(np.median(np.divide(on.get_gbps, off.get_gbps)))
    print(
        f"metrics off vs on (scraped every {args.scrape_interval:g} s, {scraper.num_scrapes} "
        f"scrapes), {args.rounds} alternating rounds:"
    )
    for name, row in figures.items():
        print(
            f"  {name:12} lookup of {args.keys} keys p50 {row['lookup_p50_ms']:.3f} ms "
            f"p99 {row['lookup_p99_ms']:.3f} ms; put {row['put_gbps']:.2f} GB/s, "
            f"get {row['get_gbps']:.2f} GB/s ({args.blocks} x {args.block_bytes}; medians "
            f"of the rounds)"
        )
    print(
        f"  metrics on against off, median of the rounds: lookup p50 {added_ms:+.3f} ms "
        f"(goal <= +{GOAL_LOOKUP_ADDED_MS} ms: "
        f"{'met' if added_ms <= GOAL_LOOKUP_ADDED_MS else 'not met'}); put {put_ratio:.3f}x, "
        f"get {get_ratio:.3f}x (goal >= {GOAL_TRANSFER_RATIO}x: "
        f"{'met' if min(put_ratio, get_ratio) >= GOAL_TRANSFER_RATIO else 'not met'})"
    )
    observe_ns = observe_cost_ns()
    scrape_ms = float(np.median(scraper.seconds) * 1e3)
    hold_ms = asyncio.run(scrape_hold_ms())
    print(
        f"  one lookup's histogram observations: {observe_ns:.0f} ns (in this process, best "
        f"of 5); one scrape: {hold_ms:.2f} ms of the daemon's loop (best of 20, in this "
        f"process), {scrape_ms:.2f} ms round trip over loopback (median)"
    )
    if args.json:
        figures["ratios"] = {
            "lookup_p50_added_ms": added_ms,
            "put_gbps_ratio": put_ratio,
            "get_gbps_ratio": get_ratio,
        }
        figures["costs"] = {
            "observe_lookup_ns": observe_ns,
            "scrape_ms": scrape_ms,
            "scrape_hold_ms": hold_ms,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


@contextlib.contextmanager
def _temporary_file() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder) / "scrapes.jsonl"
