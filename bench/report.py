"""Turn a load run into numbers a person can read: a rich table, and JSON.

``LoadReport.to_json()`` has these keys (times in milliseconds, rates as fractions in [0, 1])::

    workload, mode, target, processes, concurrency, rate, wall_s, settings
    operations: {op: {count, errors, ops_per_s, bytes, gb_per_s,       # lookup, get, put, ...,
                      latency_ms: {p50, p95, p99, max, mean}}}     # and turn / request
    hit_rate:   {blocks, tokens, num_requests, num_blocks, num_hit_blocks, num_lookup_hit_blocks,
                 num_tokens, num_hit_tokens, per_tier: {tier: rate}, groups: {group: {...same}}}
    reference:  {name: {blocks, tokens}}   # what a model predicts (a trace's infinite-cache rate)
    errors:     {by_code: {code: n}, by_operation: {op: {code: n}}}
    put_outcomes: {COMMITTED: n, ALREADY_PRESENT: n, PARENT_MISSING: n}
    schedule_lag_ms: {p50, p95, p99, max, mean} or null (closed loop)
    units: {name, started, cancelled}   # name: "session" (agent) or "request" (trace)
    server: {tiers: [{name, capacity_bytes, used_bytes, num_blocks, hits, misses, evictions}],
             lookups, blocks_put, blocks_got} or null          # counter deltas over the run

Hit rates are over the requests that completed (a failed one shows under ``errors``) and count a
block as hit when the get served it; ``per_tier`` splits the hit blocks by the
tier the lookup reported (its entries sum to ``blocks``). Errors ``by_code`` count failed RPCs;
``by_operation`` also has the failed whole units (a failed put fails its turn).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from kvstore.bench.load import LoadRun
from kvstore.bench.workload import BLOCK_OPS, WorkerResult
from kvstore.client import StoreStats
from kvstore.units import human_bytes


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles (numpy's linear interpolation), max and mean, in milliseconds."""

    p50: float
    p95: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, seconds: np.ndarray) -> LatencySummary:
        if seconds.size == 0:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0)
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        return cls(float(p50), float(p95), float(p99), float(ms.max()), float(ms.mean()))


@dataclass(frozen=True)
class OpSummary:
    name: str
    count: int
    errors: int
    ops_per_s: float
    bytes: int
    gb_per_s: float
    latency_ms: LatencySummary


@dataclass(frozen=True)
class HitSummary:
    """Prefix hits over a set of requests; ``per_tier`` rates sum to ``blocks``."""

    num_requests: int
    num_blocks: int
    num_hit_blocks: int
    num_lookup_hit_blocks: int
    num_tokens: int
    num_hit_tokens: int
    per_tier: dict[str, float] = field(default_factory=dict)

    @property
    def blocks(self) -> float:
        return self.num_hit_blocks / self.num_blocks if self.num_blocks else 0.0

    @property
    def tokens(self) -> float:
        return self.num_hit_tokens / self.num_tokens if self.num_tokens else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "tokens": self.tokens, **asdict(self)}


@dataclass
class LoadReport:
    """One run's report; see the module docstring for the JSON form."""

    workload: str
    mode: str
    target: str
    processes: int
    concurrency: int | None
    rate: float | None
    wall_s: float
    settings: dict[str, Any]
    operations: list[OpSummary]
    hit_rate: HitSummary
    hit_groups: dict[str, HitSummary]
    reference: dict[str, tuple[float, float]]  # name -> (block rate, token rate)
    errors_by_code: dict[str, int]
    errors_by_operation: dict[str, dict[str, int]]
    put_outcomes: dict[str, int]
    schedule_lag_ms: LatencySummary | None
    unit_op: str
    unit_name: str
    units_started: int
    units_cancelled: int
    server: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "mode": self.mode,
            "target": self.target,
            "processes": self.processes,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "wall_s": self.wall_s,
            "settings": self.settings,
            "operations": {
                op.name: {k: v for k, v in asdict(op).items() if k != "name"}
                for op in self.operations
            },
            "hit_rate": {
                **self.hit_rate.to_json(),
                "groups": {name: hits.to_json() for name, hits in self.hit_groups.items()},
            },
            "reference": {
                name: {"blocks": blocks, "tokens": tokens}
                for name, (blocks, tokens) in self.reference.items()
            },
            "errors": {"by_code": self.errors_by_code, "by_operation": self.errors_by_operation},
            "put_outcomes": self.put_outcomes,
            "schedule_lag_ms": asdict(self.schedule_lag_ms) if self.schedule_lag_ms else None,
            "units": {
                "name": self.unit_name,
                "started": self.units_started,
                "cancelled": self.units_cancelled,
            },
            "server": self.server,
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def merge_results(results: list[WorkerResult]) -> WorkerResult:
    """One result holding every worker's samples (names re-indexed, counters summed)."""
    op_names = _union(r.op_names for r in results)
    group_names = _union(r.group_names for r in results)

    def cat(name: str, dtype: type) -> np.ndarray:
        arrays = [np.asarray(getattr(r, name)) for r in results]
        return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)

    def remap(names: tuple[str, ...], all_names: tuple[str, ...], kinds: np.ndarray) -> np.ndarray:
        table = np.array([all_names.index(n) for n in names] or [0], dtype=np.uint8)
        return table[kinds] if kinds.size else kinds.astype(np.uint8)

    def total(name: str) -> dict[Any, int]:
        counter: Counter[Any] = Counter()
        for result in results:
            counter.update(getattr(result, name))
        return dict(counter)

    return WorkerResult(
        op_names=op_names,
        op_kind=np.concatenate(
            [remap(r.op_names, op_names, r.op_kind) for r in results] or [np.zeros(0, np.uint8)]
        ),
        op_start_s=cat("op_start_s", np.float64),
        op_latency_s=cat("op_latency_s", np.float64),
        op_bytes=cat("op_bytes", np.int64),
        group_names=group_names,
        request_group=np.concatenate(
            [remap(r.group_names, group_names, r.request_group) for r in results]
            or [np.zeros(0, np.uint8)]
        ),
        request_start_s=cat("request_start_s", np.float64),
        request_blocks=cat("request_blocks", np.int64),
        request_lookup_hits=cat("request_lookup_hits", np.int64),
        request_hit_blocks=cat("request_hit_blocks", np.int64),
        request_tokens=cat("request_tokens", np.int64),
        request_hit_tokens=cat("request_hit_tokens", np.int64),
        tier_hit_blocks=total("tier_hit_blocks"),
        errors=total("errors"),
        put_outcomes=total("put_outcomes"),
        schedule_lag_s=cat("schedule_lag_s", np.float64),
        num_units_started=sum(r.num_units_started for r in results),
        num_units_cancelled=sum(r.num_units_cancelled for r in results),
        max_unit_index=max((r.max_unit_index for r in results), default=-1),
        error_log=tuple(sorted(entry for r in results for entry in r.error_log)),
    )


def _union(name_lists: Any) -> tuple[str, ...]:
    names: dict[str, None] = {}
    for name_list in name_lists:
        names.update(dict.fromkeys(name_list))
    return tuple(names)


def hit_summary(merged: WorkerResult, mask: np.ndarray | None = None) -> HitSummary:
    """Hits over the requests selected by ``mask`` (all when None)."""
    select = mask if mask is not None else np.ones(merged.request_blocks.size, dtype=bool)
    num_blocks = int(merged.request_blocks[select].sum())
    num_hit_blocks = int(merged.request_hit_blocks[select].sum())
    per_tier = {}
    if mask is None and num_blocks:
        per_tier = {tier: n / num_blocks for tier, n in sorted(merged.tier_hit_blocks.items())}
    return HitSummary(
        num_requests=int(select.sum()),
        num_blocks=num_blocks,
        num_hit_blocks=num_hit_blocks,
        num_lookup_hit_blocks=int(merged.request_lookup_hits[select].sum()),
        num_tokens=int(merged.request_tokens[select].sum()),
        num_hit_tokens=int(merged.request_hit_tokens[select].sum()),
        per_tier=per_tier,
    )


def build_report(
    run: LoadRun,
    *,
    settings: dict[str, Any],
    reference: dict[str, tuple[float, float]] | None = None,
) -> LoadReport:
    """Aggregate ``run``'s worker results; ``reference`` adds predicted hit rates to compare."""
    merged = merge_results(run.results)
    wall_s = max(run.wall_s, 1e-9)
    errors_by_op: dict[str, dict[str, int]] = {}
    for (op, code), count in sorted(merged.errors.items()):
        errors_by_op.setdefault(op, {})[code] = count
    errors_by_code: Counter[str] = Counter()
    for (op, code), count in merged.errors.items():
        if op != run.unit_op:  # a failed unit is already counted at its failed RPC
            errors_by_code[code] += count
    ordered = [
        op for op in (*BLOCK_OPS, run.unit_op) if op in merged.op_names or op in errors_by_op
    ]
    operations = []
    for op in ordered:
        select = merged.op_kind == merged.op_names.index(op) if op in merged.op_names else None
        latencies = merged.op_latency_s[select] if select is not None else np.zeros(0)
        nbytes = int(merged.op_bytes[select].sum()) if select is not None else 0
        operations.append(
            OpSummary(
                name=op,
                count=int(latencies.size),
                errors=sum(errors_by_op.get(op, {}).values()),
                ops_per_s=latencies.size / wall_s,
                bytes=nbytes,
                gb_per_s=nbytes / wall_s / 1e9,
                latency_ms=LatencySummary.of(latencies),
            )
        )
    groups = {
        name: hit_summary(merged, merged.request_group == index)
        for index, name in enumerate(merged.group_names)
    }
    lag = LatencySummary.of(merged.schedule_lag_s) if run.mode != "closed" else None
    return LoadReport(
        workload=run.workload,
        mode=run.mode,
        target=run.target,
        processes=run.config.num_workers if run.config.processes else 0,
        concurrency=run.config.concurrency,
        rate=run.config.rate,
        wall_s=run.wall_s,
        settings=settings,
        operations=operations,
        hit_rate=hit_summary(merged),
        hit_groups=groups if len(groups) > 1 else {},
        reference=reference or {},
        errors_by_code=dict(errors_by_code),
        errors_by_operation=errors_by_op,
        put_outcomes=merged.put_outcomes,
        schedule_lag_ms=lag,
        unit_op=run.unit_op,
        unit_name=run.unit_name,
        units_started=merged.num_units_started,
        units_cancelled=merged.num_units_cancelled,
        server=server_delta(run.stats_before, run.stats_after),
    )


def server_delta(before: StoreStats | None, after: StoreStats | None) -> dict[str, Any] | None:
    """The server's counters over the run (a shared server's earlier traffic subtracted)."""
    if after is None:
        return None
    earlier = {tier.name: tier for tier in before.tiers} if before is not None else {}
    tiers = []
    for tier in after.tiers:
        old = earlier.get(tier.name)
        tiers.append(
            {
                "name": tier.name,
                "capacity_bytes": tier.capacity_bytes,
                "used_bytes": tier.used_bytes,
                "num_blocks": tier.num_blocks,
                **{
                    key: getattr(tier, key) - (getattr(old, key) if old is not None else 0)
                    for key in ("hits", "misses", "evictions")
                },
            }
        )
    return {
        "tiers": tiers,
        **{
            key: getattr(after, key) - (getattr(before, key) if before is not None else 0)
            for key in ("lookups", "blocks_put", "blocks_got", "bytes_put", "bytes_got")
        },
        # The daemon's CPU over the run; without a reading before it, unknown.
        "cpu_s": (
            (after.process_cpu_us - before.process_cpu_us) / 1e6 if before is not None else None
        ),
    }


def print_report(report: LoadReport, console: Console | None = None) -> None:
    """The final tables: operations, prefix hits, errors, and the server's tiers."""
    console = console or Console()
    if report.mode == "open":
        loop = f"open loop, {report.rate:g} arrivals/s"
    elif report.mode == "timed":
        loop = "on the trace's timestamps"
    else:
        loop = f"closed loop, concurrency {report.concurrency}"
    where = f"{report.processes} client processes" if report.processes else "in-process client"
    console.print(
        f"[bold]kvstore-bench {report.workload}[/]: {loop}, {where}, "
        f"{report.wall_s:.1f} s against {report.target}; "
        f"{report.units_started} {report.unit_name}(s) started, "
        f"{report.units_cancelled} cancelled at the deadline"
    )
    ops = Table(title="operations")
    ops.add_column("op", no_wrap=True)
    for column in ("count", "ops/s", "GB/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "errors"):
        ops.add_column(column, justify="right", no_wrap=True)
    for op in report.operations:
        lat = op.latency_ms
        ops.add_row(
            op.name,
            str(op.count),
            f"{op.ops_per_s:.1f}",
            f"{op.gb_per_s:.3f}" if op.bytes else "-",
            *(_milliseconds(value) for value in (lat.p50, lat.p95, lat.p99, lat.max)),
            str(op.errors),
        )
    console.print(ops)
    console.print(_hit_table(report))
    if report.schedule_lag_ms is not None:
        lag = report.schedule_lag_ms
        console.print(
            f"schedule lag (start later than arrival): p50 {lag.p50:.1f} ms, "
            f"p99 {lag.p99:.1f} ms, max {lag.max:.1f} ms"
        )
    if report.errors_by_operation:
        errors = Table(title="errors by status code")
        for column in ("code", "failed RPCs", "by operation"):
            errors.add_column(column)
        codes = sorted({c for per_op in report.errors_by_operation.values() for c in per_op})
        for code in codes:
            parts = [
                f"{op}: {per_op[code]}"
                for op, per_op in report.errors_by_operation.items()
                if code in per_op
            ]
            errors.add_row(code, str(report.errors_by_code.get(code, 0)), ", ".join(parts))
        console.print(errors)
    not_stored = {
        name: count
        for name, count in report.put_outcomes.items()
        if name not in ("COMMITTED", "ALREADY_PRESENT")
    }
    if not_stored:
        # A cluster client answers a put to a node it cannot reach with NODE_UNREACHABLE
        # outcomes, not an error: without this line a run against dead nodes looks sound.
        total = sum(report.put_outcomes.values())
        console.print(
            "[bold red]blocks put but not stored[/]: "
            + ", ".join(f"{name} {count}" for name, count in sorted(not_stored.items()))
            + f" of {total} (put GB/s counts only blocks a server received)"
        )
    if report.server is not None:
        console.print(_server_table(report.server, report.wall_s))
    else:
        console.print("[bold red]server Stats: no answer[/] (the server or every node is down)")


def _milliseconds(value: float) -> str:
    # About three significant digits, so that the table fits in 80 columns.
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _hit_table(report: LoadReport) -> Table:
    hits = Table(title="prefix hit rate")
    hits.add_column("")
    for column in ("blocks", "tokens", "hit / looked-up blocks"):
        hits.add_column(column, justify="right")
    overall = report.hit_rate

    def row(label: str, summary: HitSummary) -> None:
        counts = f"{summary.num_hit_blocks} / {summary.num_blocks}"
        hits.add_row(label, f"{summary.blocks:.2%}", f"{summary.tokens:.2%}", counts)

    row(f"measured ({overall.num_requests} requests)", overall)
    for tier, rate in overall.per_tier.items():
        hits.add_row(f"  served from {tier}", f"{rate:.2%}", "", "")
    for name, summary in report.hit_groups.items():
        row(f"  {name} ({summary.num_requests})", summary)
    for name, (blocks, tokens) in report.reference.items():
        hits.add_row(f"{name} (model)", f"{blocks:.2%}", f"{tokens:.2%}", "")
    notes = []
    lost = overall.num_lookup_hit_blocks - overall.num_hit_blocks
    if lost:
        notes.append(f"{lost} block(s) matched by a lookup were evicted before the get")
    failed = sum(report.errors_by_operation.get(report.unit_op, {}).values())
    if failed:
        notes.append(f"{failed} failed {report.unit_op}(s) are not counted")
    hits.caption = "; ".join(notes) or None
    return hits


def _server_table(server: dict[str, Any], wall_s: float) -> Table:
    table = Table(title="server tiers (change over the run)")
    table.caption = server_cpu_summary(server, wall_s)
    for column in ("tier", "used", "capacity", "blocks", "hits", "misses", "evictions"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for tier in server["tiers"]:
        table.add_row(
            tier["name"],
            human_bytes(tier["used_bytes"]),
            human_bytes(tier["capacity_bytes"]),
            str(tier["num_blocks"]),
            str(tier["hits"]),
            str(tier["misses"]),
            str(tier["evictions"]),
        )
    return table


def server_cpu_summary(server: dict[str, Any], wall_s: float) -> str | None:
    """The daemon's CPU over the run: what sizing a deployment for this load needs."""
    cpu_s = server.get("cpu_s")
    if cpu_s is None or wall_s <= 0:
        return None
    line = f"server CPU {cpu_s:.1f} s in {wall_s:.1f} s ({cpu_s / wall_s:.0%} of one core)"
    moved = server["bytes_put"] + server["bytes_got"]
    if moved:
        line += f", {cpu_s / (moved / 1e9):.2f} s per GB put or got"
    return line


def emit(report: Any, as_json: bool, print_table: Callable[[Any], None]) -> int:
    """Print a dataclass report as JSON or as the command's table; the exit code (0)."""
    if as_json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print_table(report)
    return 0


def wide_console(min_width: int = 110) -> Console:
    """A console at least `min_width` wide, so a report's table is not folded."""
    return Console(width=max(Console().width, min_width))
