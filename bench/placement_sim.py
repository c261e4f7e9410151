"""`kvstore-bench placement`: how the cluster's run length K trades hit rate and balance.

It replays a Mooncake trace's prefix chains through the cluster client's placement
(`kvstore.cluster.placement`, the code the client runs) and through one LRU of blocks per
node, against one LRU of the same total capacity, for each K asked. No daemon runs: it
isolates what placement alone costs. A request's chain is its full blocks, as
`kvstore-bench trace` and `cluster hits` store them (a partial last block is never
stored). A request's hit is its longest prefix present, run after run, as a cluster
lookup walks it; then every block of the request is touched or stored at its owner,
evicting that owner's least recently used block when full.

Owners depend on the members' node ids, which real daemons draw at random when they have
no SSD directory: each row is replayed over `--draws` sets of node ids, and shows the
gap's mean and range. The placement is the client's: each chain's first block a run of
its own. `--root-with-run` replays the placement from before that rule, the first block
heading a run of K like any other run start, so that conversations sharing it all put
their next blocks, up to their first run start, on its owner (for the cost of that
concentration).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from kvstore.bench.trace import load_trace
from kvstore.cluster.members import Member
from kvstore.cluster.placement import Placement

DEFAULT_RUN_BLOCKS = "1,2,4,8,16"
DEFAULT_CAPACITIES = "2,0.25"  # of the trace's unique blocks: ample, and forcing eviction
DEFAULT_DRAWS = 5


@dataclass(frozen=True)
class PlacementResult:
    run_blocks: int
    capacity_blocks: int
    one_node_hit_rate: float
    cluster_hit_rate: float
    largest_share: float  # of the distinct blocks, on the fullest node
    # Of the blocks stored (each miss stores one), on the node that stored the most: the
    # node that evicts soonest when every node has the same capacity.
    busiest_store_share: float

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


def owners_of(
    placement: Placement, keys: Sequence[bytes], *, root_with_run: bool = False
) -> list[str]:
    """The node id of each block's owner. With `root_with_run`, the placement from before
    a chain's first block was a run alone: the blocks after it, up to the first run
    start, continue its run."""
    if root_with_run and len(keys) > 1:
        root_owner = placement.owner(keys[0])
        runs = placement.runs(keys[1:], tail=True, lead_owner=root_owner)
        return [
            root_owner.node_id,
            *(r.owner.node_id for r in runs for _ in range(r.start, r.stop)),
        ]
    return [run.owner.node_id for run in placement.runs(keys) for _ in range(run.start, run.stop)]


def replay(
    chains: Sequence[list[bytes]],
    placement: Placement,
    capacity_blocks: int,
    *,
    root_with_run: bool = False,
    stored: Counter[str] | None = None,
) -> float:
    """The block hit rate of `chains` over per-member LRUs of capacity/N blocks each;
    `stored` counts the blocks each member stored."""
    lrus: dict[str, OrderedDict[bytes, None]] = {
        m.node_id: OrderedDict() for m in placement.members
    }
    per_node = max(1, capacity_blocks // len(placement.members))
    hits = total = 0
    for keys in chains:
        owners = owners_of(placement, keys, root_with_run=root_with_run)
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
            if stored is not None:
                stored[owner] += 1
            lru[key] = None
            if len(lru) > per_node:
                lru.popitem(last=False)
    return hits / total if total else 0.0


def largest_share(
    chains: Sequence[list[bytes]], placement: Placement, *, root_with_run: bool = False
) -> float:
    owner_of: dict[bytes, str] = {}
    for keys in chains:
        for key, owner in zip(
            keys, owners_of(placement, keys, root_with_run=root_with_run), strict=True
        ):
            owner_of[key] = owner
    counts = Counter(owner_of.values())
    return max(counts.values()) / len(owner_of) if owner_of else 0.0


def draw_members(num_nodes: int, draw: int = 0) -> list[Member]:
    """`num_nodes` members of equal weight; each `draw` names them differently."""
    prefix = f"draw-{draw}-" if draw else ""
    return [Member(f"{prefix}node-{i}", f"node-{i}:1", 0, {"dram": 1}) for i in range(num_nodes)]


def simulate(
    chains: Sequence[list[bytes]],
    num_nodes: int,
    run_blocks: int,
    capacity_blocks: int,
    *,
    draw: int = 0,
    root_with_run: bool = False,
) -> PlacementResult:
    members = draw_members(num_nodes, draw)
    one = Placement(members[:1], run_blocks)
    cluster = Placement(members, run_blocks)
    stored: Counter[str] = Counter()
    cluster_rate = replay(
        chains, cluster, capacity_blocks, root_with_run=root_with_run, stored=stored
    )
    return PlacementResult(
        run_blocks=run_blocks,
        capacity_blocks=capacity_blocks,
        one_node_hit_rate=replay(chains, one, capacity_blocks),
        cluster_hit_rate=cluster_rate,
        largest_share=largest_share(chains, cluster, root_with_run=root_with_run),
        busiest_store_share=max(stored.values()) / stored.total() if stored else 0.0,
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
    parser.add_argument("--max-requests", type=int, help="replay only the first N requests")
    parser.add_argument(
        "--draws",
        type=int,
        default=DEFAULT_DRAWS,
        help=f"sets of node ids to replay each row over (default {DEFAULT_DRAWS})",
    )
    parser.add_argument(
        "--root-with-run",
        action="store_true",
        help="the placement before a chain's first block was a run alone: it heads a run "
        "of K (not the client's placement)",
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
    if args.draws < 1:
        raise SystemExit(f"kvstore-bench placement: --draws must be at least 1, got {args.draws}")
    run_blocks = [int(value) for value in _parse_list(args.run_blocks, int, "--run-blocks")]
    fractions = _parse_list(args.capacity, float, "--capacity")
    requests = load_trace(args.trace)
    if args.max_requests is not None:
        requests = requests[: args.max_requests]
    chains = [chain_keys(request.full_block_ids()) for request in requests]
    chains = [keys for keys in chains if keys]
    unique = len({key for keys in chains for key in keys})
    placement = (
        "each chain's first block heading a run (the placement before), "
        if args.root_with_run
        else "each chain's first block alone, then "
    )
    table = Table(
        title=f"placement: {len(requests)} requests, {unique} unique full blocks; "
        f"{placement}runs of K; {args.draws} draws of node ids"
    )
    for column in ("capacity", "K", "1 node hit %", f"{args.nodes} nodes hit %"):
        table.add_column(column, justify="right")
    table.add_column("gap (points): mean [min, max]", justify="right")
    table.add_column("fullest node's share", justify="right")
    table.add_column("busiest node's share of stores", justify="right")
    for fraction in fractions:
        capacity = max(args.nodes, int(unique * fraction))
        for k in run_blocks:
            results = [
                simulate(
                    chains, args.nodes, k, capacity, draw=draw, root_with_run=args.root_with_run
                )
                for draw in range(args.draws)
            ]
            gaps = [result.gap_points for result in results]
            table.add_row(
                f"{fraction:g}x ({capacity})",
                str(k),
                f"{results[0].one_node_hit_rate * 100:.2f}",
                f"{statistics.mean(r.cluster_hit_rate for r in results) * 100:.2f}",
                f"{statistics.mean(gaps):+.2f} [{min(gaps):+.2f}, {max(gaps):+.2f}]",
                f"{statistics.mean(r.largest_share for r in results):.2f}",
                f"{statistics.mean(r.busiest_store_share for r in results):.2f}",
            )
    console = Console()
    # Wide enough for every column unwrapped, on a terminal or not (tests read it).
    Console(width=max(console.width, 150)).print(table)
    return 0
