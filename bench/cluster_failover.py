"""`kvstore-bench cluster failover`: agent load on N nodes, one of them killed with SIGKILL.

`kvstore-bench agent`'s sessions (smaller contexts, shorter think times) run against a
local cluster of N daemons through the cluster client (`etcd://`), from load processes
of their own. `kill_after_s` into the load one daemon is killed (SIGKILL: no drain, no
withdrawal), and a thread times how long etcd keeps listing it: until its lease
(`lease_ttl_s`) expires. Then, per `interval_s` of the run:

- requests (agent turns) begun, their prefix hit rate (blocks the get served / blocks
  looked up) and the lookup's own (blocks matched / looked up);
- errors, of any operation and any status code.

The dead node's runs become misses: a session's chain is cut where its first run on that
node begins, until the client's membership drops the node and the puts that follow place
those runs on the living. The promise: misses, never errors, so the goal is 0 errors.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from rich.console import Console

from kvstore.bench.agent import AgentProfile, AgentWorkload
from kvstore.bench.cluster_report import PartResult, percent, verdict
from kvstore.bench.load import LoadConfig, LoadDriver, LoadRun
from kvstore.bench.local_cluster import LocalCluster
from kvstore.bench.nodes import local_cluster
from kvstore.bench.presets import get_preset
from kvstore.bench.report import merge_results
from kvstore.bench.workload import page_bytes_for, parse_scale, scaled_layout
from kvstore.client import Namespace
from kvstore.units import human_bytes

PROFILE = AgentProfile(
    system_prompt_tokens=2048,
    tool_definitions_tokens=1024,
    turns=(8, 20),
    task_tokens=(200, 1000),
    tool_result_tokens=(500, 3000),
    reply_tokens=(100, 500),
    max_context_tokens=32 * 1024,
    think_time_s=(0.2, 1.0),
)


@dataclass(frozen=True)
class FailoverSetup:
    nodes: int = 3
    duration_s: float = 40.0
    kill_after_s: float = 15.0
    interval_s: float = 2.5
    lease_ttl_s: int = 3
    processes: int = 2
    concurrency: int = 6
    scale: str = "1/1024"  # of Llama-3-8B's KV bytes per token: 32 KiB blocks of 256 tokens
    block_tokens: int = 256
    num_layers: int = 2  # 16 KiB per layer of a block: no put message under the put floor
    total_dram_bytes: int = 384 << 20
    seed: int | None = None


class _Killer(threading.Thread):
    """Kills node `victim` `after_s` after `start()`, then times until etcd drops it."""

    def __init__(self, cluster: LocalCluster, victim: int, after_s: float) -> None:
        super().__init__(name="failover-kill", daemon=True)
        self._cluster = cluster
        self._victim = victim
        self._after_s = after_s
        self._cancel = threading.Event()
        self.killed_at: float | None = None  # unix time
        self.dropped_after_s: float | None = None
        self.error: BaseException | None = None

    def cancel(self) -> None:
        self._cancel.set()

    def run(self) -> None:
        cluster = self._cluster
        if self._cancel.wait(self._after_s):
            return
        try:
            survivors = {n.node_id for n in cluster.nodes if n.index != self._victim}
            cluster.kill(self._victim)
            self.killed_at = time.time()
            cluster.wait_for_members(survivors, timeout_s=cluster.lease_ttl_s + 60)
            self.dropped_after_s = time.time() - self.killed_at
        except BaseException as error:  # reported with the result
            self.error = error


def measure_failover(setup: FailoverSetup) -> PartResult:
    layout = scaled_layout(
        get_preset("Llama-3-8B"),
        parse_scale(setup.scale),
        setup.block_tokens,
        num_layers=setup.num_layers,
    )
    seed = setup.seed if setup.seed is not None else secrets.randbits(32)
    workload = AgentWorkload(
        profile=PROFILE,
        namespace=Namespace(
            tenant="kvstore-bench", model_fingerprint="cluster-failover", layout=layout
        ),
        seed=seed,
    )
    config = LoadConfig(
        processes=setup.processes,
        concurrency=setup.concurrency,
        duration_s=setup.duration_s,
        ramp_up_s=min(2.0, setup.kill_after_s / 2),
        grace_s=10.0,
        seed=seed,
    )
    victim = setup.nodes - 1
    # The load processes start first: they import torch while the cluster starts.
    with (
        LoadDriver(workload, config, console=Console(quiet=True), show_progress=False) as driver,
        local_cluster(
            setup.nodes,
            total_dram_bytes=setup.total_dram_bytes,
            page_bytes=page_bytes_for(layout.block_bytes),
            server_args=["--log-level", "warning"],
            lease_ttl_s=setup.lease_ttl_s,
        ) as cluster,
    ):
        killer = _Killer(cluster, victim, setup.kill_after_s)
        killer.start()
        try:
            run = driver.run(cluster.etcd_target)
        finally:
            killer.cancel()
            killer.join()
    if killer.error is not None:
        raise RuntimeError(f"the kill of node {victim} failed: {killer.error}") from killer.error
    if killer.killed_at is None:
        raise RuntimeError("the load ended before the kill: raise --duration or lower --kill-after")
    kill_s = killer.killed_at - run.started_at
    if not 0 < kill_s < setup.duration_s:
        raise RuntimeError(
            f"node {victim} was killed {kill_s:.1f}s from the load's start, outside the run; "
            "the load processes took long to start: raise --kill-after"
        )
    return _result(setup, run, seed, layout.block_bytes, kill_s, killer.dropped_after_s)


def _result(
    setup: FailoverSetup,
    run: LoadRun,
    seed: int,
    block_bytes: int,
    kill_s: float,
    dropped_after_s: float | None,
) -> PartResult:
    merged = merge_results(run.results)
    starts = merged.request_start_s
    # A failed unit is already counted at its failed RPC (as in kvstore.bench.report).
    error_times = np.array([at for at, op, _ in merged.error_log if op != run.unit_op], dtype=float)
    edges = np.arange(0.0, max(run.wall_s, setup.duration_s) + setup.interval_s, setup.interval_s)
    drop_s = kill_s + dropped_after_s if dropped_after_s is not None else None
    rows: list[list[str]] = []
    intervals = []
    for low, high in itertools.pairwise(edges.tolist()):
        inside = (starts >= low) & (starts < high)
        blocks = int(merged.request_blocks[inside].sum())
        hits = int(merged.request_hit_blocks[inside].sum())
        matched = int(merged.request_lookup_hits[inside].sum())
        errors = int(((error_times >= low) & (error_times < high)).sum())
        events = []
        if low <= kill_s < high:
            events.append(f"node {setup.nodes - 1} killed at {kill_s - low:.1f}s")
        if drop_s is not None and low <= drop_s < high:
            events.append(f"etcd dropped it at {drop_s - low:.1f}s")
        interval = {
            "from_s": float(low),
            "to_s": float(high),
            "from_kill_s": float(low - kill_s),
            "requests": int(inside.sum()),
            "blocks": blocks,
            "hit_rate": hits / blocks if blocks else None,
            "lookup_hit_rate": matched / blocks if blocks else None,
            "errors": errors,
            "events": events,
        }
        intervals.append(interval)
        if not interval["requests"] and not errors and not events:
            continue
        rows.append(
            [
                f"{low - kill_s:+.1f} … {high - kill_s:+.1f}",
                str(interval["requests"]),
                percent(hits / blocks) if blocks else "-",
                percent(matched / blocks) if blocks else "-",
                str(errors),
                "; ".join(events),
            ]
        )
    phases = {
        "before the kill": starts < kill_s,
        "kill to etcd's drop": (starts >= kill_s) & (starts < (drop_s or np.inf)),
        "after the drop": starts >= (drop_s or np.inf),
    }
    phase_rates = {}
    for name, inside in phases.items():
        blocks = int(merged.request_blocks[inside].sum())
        phase_rates[name] = (
            int(merged.request_hit_blocks[inside].sum()) / blocks if blocks else None
        )
    rpc_errors = {key: count for key, count in merged.errors.items() if key[0] != run.unit_op}
    num_errors = sum(rpc_errors.values())
    by_code = Counter({f"{op} {code}": count for (op, code), count in rpc_errors.items()})
    dropped = f"{dropped_after_s:.1f}s" if dropped_after_s is not None else "never"
    notes = [
        f"agent sessions, {setup.concurrency} in flight from {setup.processes} processes, "
        f"{human_bytes(block_bytes)} blocks, {setup.nodes} nodes with "
        f"{human_bytes(setup.total_dram_bytes)} DRAM in all; seed {seed}",
        f"node {setup.nodes - 1} SIGKILLed {kill_s:.1f}s into the load; etcd dropped it "
        f"{dropped} later (lease TTL {setup.lease_ttl_s}s)",
        "hit rate by phase: "
        + ", ".join(
            f"{name} {percent(rate) if rate is not None else '-'}"
            for name, rate in phase_rates.items()
        ),
        "put outcomes: "
        + ", ".join(f"{name} {count}" for name, count in sorted(merged.put_outcomes.items())),
        f"goal: 0 errors (a lost node costs misses only): {num_errors} "
        f"{dict(by_code) if by_code else ''}: {verdict(num_errors == 0)}",
    ]
    return PartResult(
        part="failover",
        title=f"agent load on {setup.nodes} nodes, one killed: per {setup.interval_s:g}s",
        columns=["s from the kill", "turns", "hit rate", "lookup hits", "errors", "event"],
        rows=rows,
        data={
            "nodes": setup.nodes,
            "seed": seed,
            "kill_s": kill_s,
            "etcd_dropped_after_s": dropped_after_s,
            "lease_ttl_s": setup.lease_ttl_s,
            "intervals": intervals,
            "hit_rate_by_phase": phase_rates,
            "errors": num_errors,
            "errors_by_code": dict(by_code),
            "put_outcomes": dict(merged.put_outcomes),
            "goal_met": num_errors == 0,
        },
        notes=notes,
    )
