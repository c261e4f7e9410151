"""`kvstore-bench trace FILE`: replay a Mooncake-format JSONL trace against the store.

Each trace request becomes one store request (`kvstore.bench.workload.fetch_and_store`): a
LookupPrefix of the keys of its full blocks, a get of the hit prefix, a put of the missed full
blocks; a partial last block is never stored, so it never hits. Hash ids map to keys through
`kvstore.bench.trace.block_keys_for_request`, salted per run so that replays into a long-running
server do not hit each other's blocks.

Requests arrive at their timestamps times ``--time-scale`` (0.05 replays an hour in three minutes),
or open-/closed-loop with ``--rate`` / ``--concurrency``. The report puts the measured prefix hit
rate (blocks and tokens) next to the trace's own infinite-cache rate over the same requests and,
where the server's capacity is known and smaller than the trace, an LRU model at that capacity: a
measured rate below the infinite-cache one and near the LRU one means capacity limited it.
"""

from __future__ import annotations

import argparse
import secrets
from dataclasses import dataclass

from kvstore.bench.command import (
    add_load_arguments,
    add_model_arguments,
    load_config_from_args,
    model_layout,
    run_command,
)
from kvstore.bench.load import LoadRun
from kvstore.bench.report import merge_results
from kvstore.bench.trace import (
    BLOCK_TOKENS,
    TraceRequest,
    block_keys_for_request,
    infinite_cache_hit_rate,
    load_trace,
    lru_cache_hit_rate,
)
from kvstore.bench.workload import UnitContext, fetch_and_store, page_bytes_for
from kvstore.client import KVLayout, Namespace
from kvstore.units import parse_size

ALL_REQUESTS = "all requests"


@dataclass(frozen=True)
class TraceWorkload:
    """Trace requests as units; unit ``i`` is request ``i`` in file order."""

    requests: tuple[TraceRequest, ...]
    offsets_s: tuple[float, ...]  # arrival of each request after the first, scaled
    namespace: Namespace
    salt: bytes
    name: str = "trace"
    unit_name: str = "request"
    unit_op: str = "request"

    def num_units(self) -> int:
        return len(self.requests)

    def arrival_offsets_s(self) -> tuple[float, ...]:
        return self.offsets_s

    def describe(self) -> dict[str, object]:
        layout = self.namespace.layout
        return {
            "num_requests": len(self.requests),
            "span_s": self.offsets_s[-1] if self.offsets_s else 0.0,
            "salt": self.salt.decode(),
            "bytes_per_token": layout.bytes_per_token,
            "block_tokens": layout.block_tokens,
            "block_bytes": layout.block_bytes,
            "namespace": self.namespace.describe(),
        }

    def chain(self, index: int) -> list[bytes]:
        """The keys request `index` looks up and stores: its full blocks'."""
        request = self.requests[index]
        num_full = request.input_length // self.namespace.layout.block_tokens
        return block_keys_for_request(request, self.salt)[:num_full]

    async def run_unit(self, index: int, context: UnitContext) -> None:
        request = self.requests[index]
        await fetch_and_store(
            context, self.chain(index), num_tokens=request.input_length, group=ALL_REQUESTS
        )


def trace_workload(
    requests: list[TraceRequest], layout: KVLayout, *, time_scale: float, salt: bytes
) -> TraceWorkload:
    """Build the workload; arrival offsets are ``(timestamp - first) / 1000 * time_scale`` s."""
    if time_scale <= 0:
        raise ValueError(f"time scale must be > 0, got {time_scale}")
    first = requests[0].timestamp_ms if requests else 0.0
    return TraceWorkload(
        requests=tuple(requests),
        offsets_s=tuple((r.timestamp_ms - first) / 1000 * time_scale for r in requests),
        namespace=Namespace(
            tenant="kvstore-bench", model_fingerprint="mooncake-trace", layout=layout
        ),
        salt=salt,
    )


def reference_hit_rates(
    requests: list[TraceRequest],
    block_tokens: int,
    capacity_blocks: int | None,
) -> dict[str, tuple[float, float]]:
    """(blocks, tokens) hit rates the trace itself predicts: infinite cache, and LRU at a capacity
    below its unique blocks."""
    infinite = infinite_cache_hit_rate(requests, block_tokens)
    rates = {"trace, infinite cache": (infinite.block_hit_rate, infinite.token_hit_rate)}
    if capacity_blocks is not None and 0 < capacity_blocks < infinite.num_unique_blocks:
        lru = lru_cache_hit_rate(requests, capacity_blocks, block_tokens)
        rates[f"trace, LRU at {capacity_blocks} blocks"] = (lru.block_hit_rate, lru.token_hit_rate)
    return rates


def capacity_blocks_of(run: LoadRun, layout: KVLayout, page_bytes: int | None) -> int | None:
    """Blocks the server can hold, from its reported tier capacities (None when unknown)."""
    if run.stats_after is None:
        return None
    footprint = layout.block_bytes
    if page_bytes:
        footprint = -(-layout.block_bytes // page_bytes) * page_bytes
    return sum(int(tier.capacity_bytes) // footprint for tier in run.stats_after.tiers)


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvstore-bench trace``."""
    parser.add_argument("file", help="Mooncake JSONL trace (timestamp ms, input_length, hash_ids)")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply the trace's times by this (0.05: an hour in 3 minutes)",
    )
    parser.add_argument(
        "--max-requests", "--limit", type=int, help="replay only the first N requests"
    )
    add_model_arguments(parser, scale="1/4096", block_tokens=512)
    add_load_arguments(parser, duration=None, concurrency=None)


def run_trace(args: argparse.Namespace) -> int:
    """Run ``kvstore-bench trace``; returns the exit status."""
    preset, layout = model_layout(args)
    if layout.block_tokens != BLOCK_TOKENS:
        # A hash id names one 512-token block of the trace: a store block of another size
        # would need ids the trace does not have.
        raise SystemExit(
            f"kvstore-bench trace: a Mooncake trace's hash_ids are {BLOCK_TOKENS}-token blocks, "
            f"and each is replayed as one store block: --block-tokens must be {BLOCK_TOKENS}, "
            f"not {layout.block_tokens}"
        )
    requests = load_trace(args.file, block_tokens=layout.block_tokens)
    if args.max_requests is not None:
        requests = requests[: args.max_requests]
    if not requests:
        raise SystemExit(f"kvstore-bench: {args.file} holds no requests")
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    workload = trace_workload(
        requests, layout, time_scale=args.time_scale, salt=f"replay-{seed}".encode()
    )
    config = load_config_from_args(args, seed=seed)
    # The page size decides how many blocks fit; a server elsewhere is assumed to waste none.
    page_bytes = None
    if not args.target:
        page_bytes = parse_size(args.page_bytes) if args.page_bytes else None
        page_bytes = page_bytes or page_bytes_for(layout.block_bytes)

    def reference(run: LoadRun) -> dict[str, tuple[float, float]]:
        # Over the requests that were started: a duration may end the replay early.
        started = merge_results(run.results).max_unit_index + 1
        capacity = capacity_blocks_of(run, layout, page_bytes)
        return reference_hit_rates(requests[:started], layout.block_tokens, capacity)

    settings = {
        "file": str(args.file),
        "time_scale": args.time_scale,
        "preset": preset.name,
        "scale": args.scale,
        "seed": seed,
        **workload.describe(),
    }
    return run_command(args, workload, config, settings=settings, reference=reference)
