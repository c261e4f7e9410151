"""`kvstore-bench cluster hits`: a trace's prefix hit rate on N nodes against 1 of the same size.

The trace (by default the conversation sample in bench/data, cut by
kvstore.bench.trace_sample) is replayed request after request (one in flight: the order,
and so every cache decision, is the trace's) through `kvstore-bench trace`'s workload:
look up the full blocks, get the hit prefix, put the rest. It is replayed four times,
each against a fresh local cluster (etcd and daemons, separate processes, no SSD tier):

- ample: DRAM for twice the trace's unique blocks, so that nothing is evicted;
- eviction: DRAM for a quarter of them, so that eviction decides the hits;

each with 1 node and with N nodes whose DRAM adds up to the same. Placement cuts
chains into runs and spreads them over the nodes, and each node evicts on its own, so
the N-node rate can differ from the 1-node one only through how evenly runs spread and
how each node's LRU order differs from the global one. The goal is a gap within 1 point.

Each replay also reads every node's Stats at its end (`NodeCounts`): blocks stored,
evictions, blocks held and capacity per node show whether one node stored, and so
evicted, more than its share; and it counts the outcomes of the puts, so that a put
that failed or was dropped would show. The daemons draw their node ids at random (no
SSD directory), so the N-node placement, and its rate, differ slightly between runs;
`kvstore-bench placement --draws` gives the spread a plain per-node LRU model predicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from kvstore.bench.cluster_report import PartResult, percent, verdict
from kvstore.bench.load import LoadConfig, fetch_stats, run_load
from kvstore.bench.nodes import local_cluster
from kvstore.bench.placement_sim import replay as replay_placement
from kvstore.bench.presets import get_preset
from kvstore.bench.replay import TraceWorkload, trace_workload
from kvstore.bench.report import merge_results
from kvstore.bench.trace import (
    TraceRequest,
    infinite_cache_hit_rate,
    load_trace,
    lru_cache_hit_rate,
)
from kvstore.bench.trace_sample import CONVERSATION_SAMPLE
from kvstore.bench.workload import page_bytes_for, parse_scale, scaled_layout
from kvstore.client import ClientOptions, KVLayout, StoreStats
from kvstore.cluster.members import Member
from kvstore.cluster.placement import Placement
from kvstore.units import human_bytes

GOAL_GAP_POINTS = 1.0
AMPLE, EVICTION = "ample", "eviction"
# DRAM as a multiple of the unique blocks' footprint.
CAPACITY_FACTORS = {AMPLE: 2.0, EVICTION: 0.25}


@dataclass(frozen=True)
class HitsSetup:
    trace: Path = CONVERSATION_SAMPLE
    max_requests: int | None = None
    nodes: int = 3
    scale: str = "1/16384"  # of Llama-3-8B's bytes per token: 4 KiB blocks of 512 tokens
    block_tokens: int = 512
    processes: int = 1  # load processes (0: a thread of this one)


@dataclass(frozen=True)
class NodeCounts:
    """One daemon at the end of a replay, from its Stats (DRAM only: no SSD tier)."""

    node_id: str
    capacity_blocks: int
    num_blocks: int  # held at the end
    blocks_put: int  # stored since it started
    evictions: int


@dataclass(frozen=True)
class Replay:
    """One replay's outcome."""

    capacity: str
    nodes: int
    dram_bytes: int  # in all
    block_hit_rate: float
    token_hit_rate: float
    hit_blocks: int
    blocks: int
    errors: int
    evictions: int
    put_outcomes: dict[str, int]  # blocks per PutOutcome name
    node_counts: list[NodeCounts]
    # The same keys through plain LRUs, one per node of the same capacity, placed as this
    # replay's client placed them (its node ids): what placement alone explains.
    placement_model_hit_rate: float


def measure_hits(setup: HitsSetup) -> PartResult:
    requests = load_trace(setup.trace, block_tokens=setup.block_tokens)
    if setup.max_requests is not None:
        requests = requests[: setup.max_requests]
    if not requests:
        raise SystemExit(f"kvstore-bench cluster hits: {setup.trace} holds no requests")
    layout = scaled_layout(get_preset("Llama-3-8B"), parse_scale(setup.scale), setup.block_tokens)
    page_bytes = page_bytes_for(layout.block_bytes)
    footprint = -(-layout.block_bytes // page_bytes) * page_bytes
    infinite = infinite_cache_hit_rate(requests, setup.block_tokens)
    unique = infinite.num_unique_blocks
    # Whole pages for every node of either cluster, and the same total for both.
    quantum = page_bytes * setup.nodes
    replays: list[Replay] = []
    models: dict[str, float] = {}
    for capacity, factor in CAPACITY_FACTORS.items():
        total = max(quantum, int(unique * footprint * factor) // quantum * quantum)
        capacity_blocks = total // footprint
        model = (
            lru_cache_hit_rate(requests, capacity_blocks, setup.block_tokens)
            if capacity_blocks < unique
            else infinite
        )
        models[capacity] = model.block_hit_rate
        for nodes in (1, setup.nodes):
            replays.append(
                _replay(setup, requests, layout, footprint, page_bytes, capacity, nodes, total)
            )
    return _result(setup, len(requests), infinite.block_hit_rate, unique, replays, models)


def _replay(
    setup: HitsSetup,
    requests: list[TraceRequest],
    layout: KVLayout,
    footprint: int,
    page_bytes: int,
    capacity: str,
    nodes: int,
    total_dram_bytes: int,
) -> Replay:
    workload = trace_workload(
        requests, layout, time_scale=1.0, salt=f"cluster-hits-{capacity}-{nodes}".encode()
    )
    # One request in flight: the replay's order is the trace's, in every run.
    config = LoadConfig(processes=setup.processes, concurrency=1, max_units=len(requests))
    with local_cluster(
        nodes,
        total_dram_bytes=total_dram_bytes,
        page_bytes=page_bytes,
        server_args=["--log-level", "warning"],
    ) as cluster:
        run = run_load(workload, config, cluster.etcd_target, show_progress=False)
        node_counts = [
            _node_counts(node.node_id, fetch_stats(node.target, workload.namespace), footprint)
            for node in cluster.nodes
        ]
    merged = merge_results(run.results)
    blocks = int(merged.request_blocks.sum())
    hit_blocks = int(merged.request_hit_blocks.sum())
    tokens = int(merged.request_tokens.sum())
    evictions = 0
    if run.stats_after is not None:
        evictions = sum(int(tier.evictions) for tier in run.stats_after.tiers)
    return Replay(
        capacity=capacity,
        nodes=nodes,
        dram_bytes=total_dram_bytes,
        block_hit_rate=hit_blocks / blocks if blocks else 0.0,
        token_hit_rate=int(merged.request_hit_tokens.sum()) / tokens if tokens else 0.0,
        hit_blocks=hit_blocks,
        blocks=blocks,
        # A failed unit is already counted at its failed RPC (as in kvstore.bench.report).
        errors=sum(n for (op, _), n in merged.errors.items() if op != run.unit_op),
        evictions=evictions,
        put_outcomes=dict(merged.put_outcomes),
        node_counts=node_counts,
        placement_model_hit_rate=_placement_model(workload, node_counts),
    )


def _placement_model(workload: TraceWorkload, node_counts: list[NodeCounts]) -> float:
    members = [
        Member(count.node_id, "", 0, {"dram": count.capacity_blocks}) for count in node_counts
    ]
    chains = [chain for index in range(workload.num_units()) if (chain := workload.chain(index))]
    placement = Placement(members, ClientOptions().cluster_run_blocks)
    return replay_placement(chains, placement, sum(count.capacity_blocks for count in node_counts))


def _node_counts(node_id: str, stats: StoreStats | None, footprint: int) -> NodeCounts:
    if stats is None:
        raise RuntimeError(f"node {node_id} did not answer Stats at the end of the replay")
    return NodeCounts(
        node_id=node_id,
        capacity_blocks=sum(int(tier.capacity_bytes) // footprint for tier in stats.tiers),
        num_blocks=sum(int(tier.num_blocks) for tier in stats.tiers),
        blocks_put=int(stats.blocks_put),
        evictions=sum(int(tier.evictions) for tier in stats.tiers),
    )


def _node_note(replay: Replay) -> str:
    """Per node of an N-node replay: blocks stored, evicted, and held of its capacity."""
    nodes = ", ".join(
        f"{count.blocks_put} / {count.evictions} / {count.num_blocks} of {count.capacity_blocks}"
        for count in sorted(replay.node_counts, key=lambda count: -count.blocks_put)
    )
    return (
        f"{replay.capacity}, {replay.nodes} nodes, blocks stored / evicted / held per node: {nodes}"
    )


def _result(
    setup: HitsSetup,
    num_requests: int,
    infinite_rate: float,
    unique_blocks: int,
    replays: list[Replay],
    models: dict[str, float],
) -> PartResult:
    rows: list[list[str]] = []
    gaps: dict[str, float] = {}
    for capacity in CAPACITY_FACTORS:
        single, spread = (r for r in replays if r.capacity == capacity)
        gap = (spread.block_hit_rate - single.block_hit_rate) * 100
        gaps[capacity] = gap
        rows.append(
            [
                capacity,
                human_bytes(single.dram_bytes),
                percent(models[capacity]),
                percent(single.block_hit_rate),
                percent(spread.block_hit_rate),
                percent(spread.placement_model_hit_rate),
                f"{gap:+.2f}",
                f"{single.evictions} / {spread.evictions}",
                f"{single.errors} / {spread.errors}",
            ]
        )
    met = all(abs(gap) <= GOAL_GAP_POINTS for gap in gaps.values())
    notes = [
        f"{num_requests} requests of {setup.trace.name}, one in flight; {unique_blocks} unique "
        f"full blocks; infinite-cache hit rate {infinite_rate:.2%}",
        "hit rate: blocks the get served / full blocks looked up; LRU model: the trace "
        "replayed through one LRU of that many blocks (kvstore.bench.trace); "
        f"{setup.nodes}-LRU model: the same keys through one plain LRU per node, placed by "
        "this run's node ids (kvstore.bench.placement_sim)",
        f"goal: the {setup.nodes}-node hit rate within {GOAL_GAP_POINTS:g} point of 1 node's, "
        f"ample and with eviction: {verdict(met)}",
        *(_node_note(replay) for replay in replays if replay.nodes > 1),
        "put outcomes, blocks: "
        + "; ".join(
            f"{replay.capacity} {replay.nodes} node(s) "
            + ", ".join(f"{name} {count}" for name, count in sorted(replay.put_outcomes.items()))
            for replay in replays
        ),
    ]
    return PartResult(
        part="hits",
        title=f"prefix hit rate, {setup.nodes} nodes vs 1 node of the same DRAM",
        columns=[
            "capacity",
            "DRAM in all",
            "LRU model",
            "1 node",
            f"{setup.nodes} nodes",
            f"{setup.nodes}-LRU model",
            "gap, points",
            "evictions 1 / N",
            "errors 1 / N",
        ],
        rows=rows,
        data={
            "trace": str(setup.trace),
            "num_requests": num_requests,
            "unique_blocks": unique_blocks,
            "infinite_cache_hit_rate": infinite_rate,
            "lru_model_hit_rate": models,
            "gap_points": gaps,
            "goal_gap_points": GOAL_GAP_POINTS,
            "goal_met": met,
            "replays": [asdict(replay) for replay in replays],
        },
        notes=notes,
    )
