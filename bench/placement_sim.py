"""`kvstore-bench placement`: how the cluster's run length K trades hit rate and balance.

It replays a Mooncake trace's prefix chains through the cluster client's placement
(`kvstore.cluster.placement`, the code the client runs) and through one LRU of blocks per
node, against one LRU of the same total capacity, for each K asked. No daemon runs: it
isolates what placement alone costs. A request's hit is its longest prefix present, run
after run, as a cluster lookup walks it; then every block of the request is touched or
stored at its owner, evicting that owner's least recently used block when full. The real
daemons evict chain tails first and keep more state; `kvstore-bench cluster hits` measures
them.
"""

from __future__ import annotations

import argparse
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from kvstore.bench.trace import load_trace
from kvstore.cluster.members import Member
from kvstore.cluster.placement import Placement

DEFAULT_RUN_BLOCKS = "1,2,4,8,16"
DEFAULT_CAPACITIES = "2,0.25"  # of the trace's unique blocks: ample, and forcing eviction


@dataclass(frozen=True)
class PlacementResult:
    run_blocks: int
    capacity_blocks: int
    one_node_hit_rate: float
    cluster_hit_rate: float
    largest_share: float  # of the distinct blocks, on the fullest node

    @property
    def gap_points(self) -> float:
        return (self.cluster_hit_rate - self.one_node_hit_rate) * 100


def chain_keys(hash_ids: Sequence[int]) -> list[bytes]:
    """A chain of 32-byte keys, each naming its whole prefix, as the client's keys do."""
    keys, parent = [], b""
    for hash_id in hash_ids:
        parent = hashlib.blake2b(parent + hash_id.to_bytes(8, "little"), digest_size=32).digest()
        keys.append(parent)
    return keys


def replay(chains: Sequence[list[bytes]], placement: Placement, capacity_blocks: int) -> float:
    """The block hit rate of `chains` over per-member LRUs of capacity/N blocks each."""
    lrus: dict[str, OrderedDict[bytes, None]] = {
        m.node_id: OrderedDict() for m in placement.members
    }
    per_node = max(1, capacity_blocks // len(placement.members))
    hits = total = 0
    for keys in chains:
        owners = [
            run.owner.node_id for run in placement.runs(keys) for _ in range(run.start, run.stop)
        ]
        matched = 0
        while matched < len(keys) and keys[matched] in lrus[owners[matched]]:
            matched += 1
        hits += matched
        total += len(keys)
        for key, owner in zip(keys, owners, strict=True):
            lru = lrus[owner]
            if key in lru:
                lru.move_to_end(key)
                continue
            lru[key] = None
            if len(lru) > per_node:
                lru.popitem(last=False)
    return hits / total if total else 0.0


def largest_share(chains: Sequence[list[bytes]], placement: Placement) -> float:
    owner_of: dict[bytes, str] = {}
    for keys in chains:
        for run in placement.runs(keys):
            for key in keys[run.start : run.stop]:
                owner_of[key] = run.owner.node_id
    counts: dict[str, int] = {}
    for owner in owner_of.values():
        counts[owner] = counts.get(owner, 0) + 1
    return max(counts.values()) / len(owner_of) if owner_of else 0.0


def simulate(
    chains: Sequence[list[bytes]], num_nodes: int, run_blocks: int, capacity_blocks: int
) -> PlacementResult:
    members = [Member(f"node-{i}", f"node-{i}:1", 0, {"dram": 1}) for i in range(num_nodes)]
    one = Placement(members[:1], run_blocks)
    cluster = Placement(members, run_blocks)
    return PlacementResult(
        run_blocks=run_blocks,
        capacity_blocks=capacity_blocks,
        one_node_hit_rate=replay(chains, one, capacity_blocks),
        cluster_hit_rate=replay(chains, cluster, capacity_blocks),
        largest_share=largest_share(chains, cluster),
    )


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="Mooncake JSONL trace (hash_ids are the chain)")
    parser.add_argument("--nodes", type=int, default=3, help="cluster members (default 3)")
    parser.add_argument(
        "--run-blocks",
        default=DEFAULT_RUN_BLOCKS,
        help=f"comma-separated K values to try (default {DEFAULT_RUN_BLOCKS})",
    )
    parser.add_argument(
        "--capacity",
        default=DEFAULT_CAPACITIES,
        help="comma-separated total capacities, as fractions of the trace's unique blocks "
        f"(default {DEFAULT_CAPACITIES}: ample, then forcing eviction)",
    )


def _parse_list(text: str, kind: type[float] | type[int], flag: str) -> list[float]:
    try:
        values = [float(kind(part)) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"kvstore-bench placement: {flag} takes numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise SystemExit(f"kvstore-bench placement: {flag} takes positive numbers, got {text!r}")
    return values


def run_placement(args: argparse.Namespace) -> int:
    if args.nodes < 2:
        raise SystemExit("kvstore-bench placement: --nodes must be at least 2")
    run_blocks = [int(value) for value in _parse_list(args.run_blocks, int, "--run-blocks")]
    fractions = _parse_list(args.capacity, float, "--capacity")
    chains = [chain_keys(request.hash_ids) for request in load_trace(args.trace)]
    unique = len({key for keys in chains for key in keys})
    table = Table(title=f"placement: {len(chains)} requests, {unique} unique blocks")
    for column in ("capacity", "K", "1 node hit %", f"{args.nodes} nodes hit %", "gap (points)"):
        table.add_column(column, justify="right")
    table.add_column("fullest node's share", justify="right")
    for fraction in fractions:
        capacity = max(args.nodes, int(unique * fraction))
        for k in run_blocks:
            result = simulate(chains, args.nodes, k, capacity)
            table.add_row(
                f"{fraction:g}x ({capacity})",
                str(k),
                f"{result.one_node_hit_rate * 100:.2f}",
                f"{result.cluster_hit_rate * 100:.2f}",
                f"{result.gap_points:+.2f}",
                f"{result.largest_share:.2f}",
            )
    Console().print(table)
    return 0
