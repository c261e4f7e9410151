"""`kvstore-bench soak`: agent load for a long time, judged on drift.

The load is `kvstore-bench agent`'s (the same sessions, flags and worker processes), by
default 16 sessions in 4 processes against a daemon with a small DRAM tier, so that DRAM
turns over every second or less and eviction runs all the time. Every ``--sample-s`` a
thread reads the daemon's Stats (RSS, open fds, event-loop lag, bytes put). At the end it
prints, per ``--row-s`` (a minute), the daemon's health, each operation's p50/p99 latency
and the errors by status code, then a verdict (kvstore.bench.drift): the exit status is 1
on drift (RSS up more than 5 % after warm-up, open fds up, any error, or with
``--max-loop-lag-ms`` a longer stall), else 0.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from kvstore.bench.agent import add_agent_arguments, agent_load_from_args
from kvstore.bench.command import parse_seconds, scraping, server_for
from kvstore.bench.drift import DriftBounds, HealthSample, Verdict, judge_drift
from kvstore.bench.load import LoadDriver, LoadRun
from kvstore.bench.report import build_report, merge_results, print_report
from kvstore.bench.workload import GET, LOOKUP, PUT, WorkerResult
from kvstore.client import KVStoreClientError, Namespace, StoreStats, SyncKVClient, TierKind
from kvstore.units import human_bytes

ROW_OPS = (LOOKUP, GET, PUT)
SOAK_DEFAULTS: dict[str, object] = {
    "duration": 600.0,
    "processes": 4,
    "concurrency": 16,
    "scale": "1/256",
    "max_context": 32 * 1024,
    "dram_bytes": "64MiB",
}


@dataclass(frozen=True)
class StatsReading:
    """One Stats sample: unix time, and the reply (None: the daemon did not answer)."""

    at: float
    stats: StoreStats | None


class StatsSampler:
    """Reads the daemon's Stats every ``period_s`` on a thread of its own, over one client."""

    def __init__(self, target: str, namespace: Namespace, period_s: float) -> None:
        self.readings: list[StatsReading] = []
        self._target = target
        self._namespace = namespace
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-stats", daemon=True)

    def __enter__(self) -> StatsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with SyncKVClient(self._target, self._namespace) as client:
            due = time.monotonic()
            while True:
                at = time.time()
                try:
                    stats: StoreStats | None = client.stats()
                except KVStoreClientError:
                    stats = None
                self.readings.append(StatsReading(at, stats))
                due += self._period_s
                if self._stop.wait(max(0.0, due - time.monotonic())):
                    return


@dataclass(frozen=True)
class SoakRow:
    """One row of the table: the daemon's health and the load's latency over [start_s, end_s)."""

    start_s: float
    end_s: float
    rss_bytes: int | None  # the row's last sample
    open_fds: int | None
    data_plane_connections: int | None
    loop_lag_max_us: int | None  # the longest stall any sample in the row saw
    loop_lag_p99_us: int | None  # the highest 10-s p99 of the row's samples
    latency_ms: dict[str, tuple[float, float] | None]  # op -> (p50, p99); None: no calls
    num_turns: int
    errors: dict[str, int]  # status code name -> count
    dram_turnover_s: float | None  # DRAM capacity over the bytes put per second


def health_samples(readings: list[StatsReading], started_at: float) -> list[HealthSample]:
    return [
        HealthSample(
            t_s=reading.at - started_at,
            rss_bytes=reading.stats.rss_bytes,
            open_fds=reading.stats.open_fds,
            data_plane_connections=reading.stats.data_plane_connections,
            loop_lag_max_us=reading.stats.loop_lag_max_us,
            loop_lag_p99_us=reading.stats.loop_lag_p99_us,
        )
        for reading in readings
        if reading.stats is not None
    ]


def soak_rows(
    readings: list[StatsReading],
    merged: WorkerResult,
    *,
    started_at: float,
    duration_s: float,
    row_s: float,
    unit_op: str,
) -> list[SoakRow]:
    """The table's rows: ``row_s`` each from the start of the load to its deadline."""
    answered = [(r.at - started_at, r.stats) for r in readings if r.stats is not None]
    op_index = {name: index for index, name in enumerate(merged.op_names)}
    rows = []
    for start_s in np.arange(0.0, duration_s, row_s):
        end_s = min(float(start_s) + row_s, duration_s)
        in_row = [(t, s) for t, s in answered if start_s <= t < end_s]
        before = [(t, s) for t, s in answered if t < start_s]
        in_ops = (merged.op_start_s >= start_s) & (merged.op_start_s < end_s)
        latency: dict[str, tuple[float, float] | None] = {}
        for op in ROW_OPS:
            select = in_ops & (merged.op_kind == op_index[op]) if op in op_index else None
            seconds = merged.op_latency_s[select] if select is not None else np.zeros(0)
            p50, p99 = np.percentile(seconds * 1e3, [50, 99]) if seconds.size else (0, 0)
            latency[op] = (float(p50), float(p99)) if seconds.size else None
        turns = in_ops & (merged.op_kind == op_index[unit_op]) if unit_op in op_index else None
        errors = Counter(
            code
            for t, op, code in merged.error_log
            if start_s <= t < end_s and op != unit_op  # a failed turn counts at its RPC
        )
        last = in_row[-1][1] if in_row else None
        rows.append(
            SoakRow(
                start_s=float(start_s),
                end_s=end_s,
                rss_bytes=last.rss_bytes if last else None,
                open_fds=last.open_fds if last else None,
                data_plane_connections=last.data_plane_connections if last else None,
                loop_lag_max_us=max((s.loop_lag_max_us for _, s in in_row), default=None),
                loop_lag_p99_us=max((s.loop_lag_p99_us for _, s in in_row), default=None),
                latency_ms=latency,
                num_turns=int(turns.sum()) if turns is not None else 0,
                errors=dict(errors),
                dram_turnover_s=_dram_turnover_s(before[-1:] + in_row),
            )
        )
    return rows


def _dram_turnover_s(span: list[tuple[float, StoreStats]]) -> float | None:
    if len(span) < 2:
        return None
    (t0, first), (t1, last) = span[0], span[-1]
    put_bytes_per_s = (last.bytes_put - first.bytes_put) / max(t1 - t0, 1e-9)
    dram = [tier for tier in last.tiers if tier.tier is TierKind.DRAM]
    if not dram or put_bytes_per_s <= 0:
        return None
    return dram[0].capacity_bytes / put_bytes_per_s


def print_soak(rows: list[SoakRow], verdict: Verdict, console: Console) -> None:
    table = Table(title="soak: the daemon's health and the load's latency, per row")
    columns = ["time", "RSS", "fds (data plane)", "loop lag ms max / p99"]
    columns += [f"{op} ms p50 / p99" for op in ROW_OPS]
    columns += ["turns", "errors", "DRAM turned over every"]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            _span(row),
            human_bytes(row.rss_bytes) if row.rss_bytes is not None else "-",
            f"{row.open_fds} ({row.data_plane_connections})" if row.open_fds is not None else "-",
            _pair(row.loop_lag_max_us, row.loop_lag_p99_us),
            *(_latency(row.latency_ms[op]) for op in ROW_OPS),
            str(row.num_turns),
            ", ".join(f"{code} {n}" for code, n in sorted(row.errors.items())) or "0",
            f"{row.dram_turnover_s:.2f} s" if row.dram_turnover_s is not None else "-",
        )
    console.print(table)
    if verdict.rss_growth is not None:
        console.print(
            f"RSS after warm-up: {human_bytes(verdict.rss_start_bytes or 0)} -> "
            f"{human_bytes(verdict.rss_end_bytes or 0)} ({verdict.rss_growth:+.1%}); "
            f"open fds besides data-plane connections {verdict.fds_start} -> {verdict.fds_end}"
        )
    if verdict.passed:
        console.print("[bold green]soak passed[/]: no drift, no errors")
    for failure in verdict.failures:
        console.print(f"[bold red]soak failed[/]: {failure}")


def _span(row: SoakRow) -> str:
    if row.start_s % 60 == 0 and (row.end_s - row.start_s) % 60 == 0:
        return f"{row.start_s / 60:.0f}-{row.end_s / 60:.0f} min"
    return f"{row.start_s:.0f}-{row.end_s:.0f} s"


def _pair(max_us: int | None, p99_us: int | None) -> str:
    if max_us is None or p99_us is None:
        return "-"
    return f"{max_us / 1e3:.1f} / {p99_us / 1e3:.1f}"


def _latency(p50_p99: tuple[float, float] | None) -> str:
    return f"{p50_p99[0]:.1f} / {p50_p99[1]:.1f}" if p50_p99 is not None else "-"


def add_soak_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvstore-bench soak``: the agent's, other defaults, and the soak's own."""
    add_agent_arguments(parser)
    # Smaller blocks and contexts than `agent`'s, and a DRAM that all sessions together
    # overflow about once a second: eviction runs all the time, yet one session's context
    # (32K tokens of 512 B) fits many times over, so no put is too big to place.
    parser.set_defaults(**SOAK_DEFAULTS)
    parser.epilog = "Defaults unlike agent's: " + " ".join(
        f"--{name.replace('_', '-')} {value}" for name, value in SOAK_DEFAULTS.items()
    )
    group = parser.add_argument_group("soak")
    group.add_argument(
        "--sample-s", type=float, default=5.0, help="seconds between Stats samples (default 5)"
    )
    group.add_argument(
        "--row-s", type=parse_seconds, default=60.0, help="seconds per table row (default 60)"
    )
    group.add_argument(
        "--warm-up",
        type=parse_seconds,
        help="drift is measured from here (default: 60 s or a quarter of the run, if less)",
    )
    group.add_argument(
        "--max-rss-growth",
        type=float,
        default=5.0,
        help="percent of RSS growth after warm-up that fails the soak (default 5)",
    )
    group.add_argument(
        "--max-loop-lag-ms",
        type=float,
        help="fail on an event-loop stall longer than this after warm-up (default: report only)",
    )


def run_soak(args: argparse.Namespace) -> int:
    """Run ``kvstore-bench soak``; 0 when it passes, 1 on drift or errors."""
    if not args.sample_s > 0 or not args.row_s > 0:
        raise SystemExit("kvstore-bench soak: --sample-s and --row-s must be > 0")
    workload, config, settings = agent_load_from_args(args)
    duration_s = float(config.duration_s or 0.0)
    warm_up_s = args.warm_up if args.warm_up is not None else min(60.0, duration_s / 4)
    bounds = DriftBounds(
        warm_up_s=warm_up_s,
        max_rss_growth=args.max_rss_growth / 100,
        max_loop_lag_s=args.max_loop_lag_ms / 1e3 if args.max_loop_lag_ms is not None else None,
    )
    console = Console()
    driver = LoadDriver(workload, config, console=console, show_progress=not args.no_progress)
    with (
        driver,
        server_for(args, workload.namespace.layout, console) as target,
        StatsSampler(target, workload.namespace, args.sample_s) as sampler,
        scraping(args, console),
    ):
        run = driver.run(target)
    report = build_report(run, settings=settings)
    print_report(report, console)
    merged = merge_results(run.results)
    readings = sampler.readings
    rows = soak_rows(
        readings,
        merged,
        started_at=run.started_at,
        duration_s=duration_s,
        row_s=args.row_s,
        unit_op=run.unit_op,
    )
    judged = [s for s in health_samples(readings, run.started_at) if 0 <= s.t_s <= duration_s]
    unanswered = sum(1 for r in readings if r.stats is None)
    verdict = judge_drift(judged, report.errors_by_code, bounds, num_unanswered=unanswered)
    print_soak(rows, verdict, console)
    _note_turnover(run, console)
    if args.plot:
        from kvstore.bench.plot import write_plot  # matplotlib is optional and slow to import

        write_plot(merged, report, args.plot)
        console.print(f"wrote {args.plot}")
    if args.json:
        soak = _soak_json(readings, run, rows, verdict, bounds)
        document = {"soak": soak, "load": report.to_json()}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0 if verdict.passed else 1


def _note_turnover(run: LoadRun, console: Console) -> None:
    before, after = run.stats_before, run.stats_after
    if before is None or after is None:
        return
    evicted = sum(t.evictions for t in after.tiers if t.tier is TierKind.DRAM) - sum(
        t.evictions for t in before.tiers if t.tier is TierKind.DRAM
    )
    if evicted <= 0:
        console.print(
            "[yellow]note[/]: DRAM evicted nothing, so eviction was not exercised; "
            "give the daemon less --dram-bytes"
        )
    else:
        console.print(f"DRAM evicted {evicted} blocks during the soak")


def _soak_json(
    readings: list[StatsReading],
    run: LoadRun,
    rows: list[SoakRow],
    verdict: Verdict,
    bounds: DriftBounds,
) -> dict[str, Any]:
    return {
        "bounds": asdict(bounds),
        "samples": [asdict(s) for s in health_samples(readings, run.started_at)],
        "num_unanswered": sum(1 for r in readings if r.stats is None),
        "rows": [asdict(row) for row in rows],
        "verdict": {
            "passed": verdict.passed,
            "failures": list(verdict.failures),
            "rss_start_bytes": verdict.rss_start_bytes,
            "rss_end_bytes": verdict.rss_end_bytes,
            "fds_start": verdict.fds_start,
            "fds_end": verdict.fds_end,
        },
    }
