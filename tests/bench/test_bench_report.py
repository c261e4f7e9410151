"""Report math on known samples: percentiles, merging workers, hit rates, errors, JSON, plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from kvstore.bench.load import LoadConfig, LoadRun
from kvstore.bench.plot import binned_ratio, time_bins, write_plot
from kvstore.bench.report import (
    LatencySummary,
    build_report,
    merge_results,
    print_report,
    server_cpu_summary,
    server_delta,
)
from kvstore.bench.workload import WorkerResult
from kvstore.client import StoreStats, TierKind, TierStats

JSON_KEYS = {
    "workload",
    "mode",
    "target",
    "processes",
    "concurrency",
    "rate",
    "wall_s",
    "settings",
    "operations",
    "hit_rate",
    "reference",
    "errors",
    "put_outcomes",
    "schedule_lag_ms",
    "units",
    "server",
}
OP_KEYS = {"count", "errors", "ops_per_s", "bytes", "gb_per_s", "latency_ms"}
LATENCY_KEYS = {"p50", "p95", "p99", "max", "mean"}


def make_result(
    ops: list[tuple[str, float, float, int]],
    requests: list[tuple[str, int, int, int, int]] | None = None,
    **overrides: Any,
) -> WorkerResult:
    """ops: (name, start s, latency s, bytes); requests: (group, blocks, hits, tokens, hit
    tokens)."""
    requests = requests or []
    op_names = tuple(dict.fromkeys(name for name, *_ in ops))
    group_names = tuple(dict.fromkeys(group for group, *_ in requests))
    fields: dict[str, Any] = {
        "op_names": op_names,
        "op_kind": np.array([op_names.index(o[0]) for o in ops], dtype=np.uint8),
        "op_start_s": np.array([o[1] for o in ops], dtype=np.float64),
        "op_latency_s": np.array([o[2] for o in ops], dtype=np.float64),
        "op_bytes": np.array([o[3] for o in ops], dtype=np.int64),
        "group_names": group_names,
        "request_group": np.array([group_names.index(r[0]) for r in requests], dtype=np.uint8),
        "request_start_s": np.arange(len(requests), dtype=np.float64),
        "request_blocks": np.array([r[1] for r in requests], dtype=np.int64),
        "request_lookup_hits": np.array([r[2] for r in requests], dtype=np.int64),
        "request_hit_blocks": np.array([r[2] for r in requests], dtype=np.int64),
        "request_tokens": np.array([r[3] for r in requests], dtype=np.int64),
        "request_hit_tokens": np.array([r[4] for r in requests], dtype=np.int64),
        "tier_hit_blocks": {},
        "errors": {},
        "put_outcomes": {},
        "schedule_lag_s": np.zeros(0),
        "num_units_started": len(requests),
        "num_units_cancelled": 0,
        "max_unit_index": len(requests) - 1,
    }
    fields.update(overrides)
    return WorkerResult(**fields)


def make_run(results: list[WorkerResult], **overrides: Any) -> LoadRun:
    fields: dict[str, Any] = {
        "workload": "trace",
        "unit_name": "request",
        "unit_op": "request",
        "mode": "closed",
        "config": LoadConfig(processes=2, concurrency=4),
        "target": "127.0.0.1:1",
        "wall_s": 10.0,
        "results": results,
        "stats_before": None,
        "stats_after": None,
    }
    fields.update(overrides)
    return LoadRun(**fields)


def test_percentiles_of_known_samples() -> None:
    # 1..101 ms: with linear interpolation the q-th percentile of 0..100 offsets is exactly q.
    summary = LatencySummary.of(np.arange(1, 102) / 1e3)
    assert summary.p50 == pytest.approx(51.0)
    assert summary.p95 == pytest.approx(96.0)
    assert summary.p99 == pytest.approx(100.0)
    assert summary.max == pytest.approx(101.0)
    assert summary.mean == pytest.approx(51.0)


def test_percentiles_interpolate_between_samples() -> None:
    summary = LatencySummary.of(np.array([0.010, 0.020]))
    assert summary.p50 == pytest.approx(15.0)
    assert summary.p99 == pytest.approx(19.9)
    assert LatencySummary.of(np.zeros(0)) == LatencySummary(0.0, 0.0, 0.0, 0.0, 0.0)


def test_merge_remaps_operation_and_group_names() -> None:
    first = make_result([("lookup", 0, 0.001, 0), ("put", 0, 0.004, 100)], [("a", 4, 1, 64, 16)])
    second = make_result([("put", 1, 0.002, 50), ("get", 1, 0.003, 25)], [("b", 2, 2, 32, 32)])
    merged = merge_results([first, second])
    assert merged.op_names == ("lookup", "put", "get")
    names = [merged.op_names[k] for k in merged.op_kind]
    assert names == ["lookup", "put", "put", "get"]
    assert merged.op_bytes.tolist() == [0, 100, 50, 25]
    assert [merged.group_names[g] for g in merged.request_group] == ["a", "b"]
    assert merged.num_units_started == 2
    assert merged.max_unit_index == 0


def test_report_rates_hits_and_errors() -> None:
    ops = [("lookup", 0.0, 0.001 * (i + 1), 0) for i in range(10)]
    ops += [("get", 0.0, 0.002, 1_000_000_000) for _ in range(5)]
    ops += [("request", 0.0, 0.010, 1_000_000_000) for _ in range(5)]
    requests = [("all", 10, 6, 5000, 3072), ("all", 10, 0, 5000, 0)]
    errors = {("put", "RESOURCE_EXHAUSTED"): 3, ("request", "RESOURCE_EXHAUSTED"): 3}
    result = make_result(
        ops,
        requests,
        errors=errors,
        tier_hit_blocks={"DRAM": 4, "SSD": 2},
        put_outcomes={"COMMITTED": 7},
    )
    report = build_report(make_run([result]), settings={"x": 1}, reference={"model": (0.5, 0.25)})
    by_name = {op.name: op for op in report.operations}
    assert list(by_name) == ["lookup", "get", "put", "request"]
    assert by_name["lookup"].count == 10
    assert by_name["lookup"].ops_per_s == pytest.approx(1.0)
    assert by_name["lookup"].latency_ms.max == pytest.approx(10.0)
    assert by_name["get"].gb_per_s == pytest.approx(0.5)  # 5 GB over 10 s
    assert by_name["put"].count == 0
    assert by_name["put"].errors == 3
    assert report.errors_by_code == {"RESOURCE_EXHAUSTED": 3}, "a failed unit is not counted twice"
    assert report.errors_by_operation["request"] == {"RESOURCE_EXHAUSTED": 3}
    assert report.hit_rate.blocks == pytest.approx(6 / 20)
    assert report.hit_rate.tokens == pytest.approx(3072 / 10000)
    assert report.hit_rate.per_tier == {"DRAM": pytest.approx(0.2), "SSD": pytest.approx(0.1)}
    assert sum(report.hit_rate.per_tier.values()) == pytest.approx(report.hit_rate.blocks)
    assert report.schedule_lag_ms is None  # closed loop

    data = json.loads(json.dumps(report.to_json()))
    assert set(data) == JSON_KEYS
    assert set(data["operations"]["get"]) == OP_KEYS
    assert set(data["operations"]["get"]["latency_ms"]) == LATENCY_KEYS
    assert data["hit_rate"]["blocks"] == pytest.approx(0.3)
    assert data["reference"] == {"model": {"blocks": 0.5, "tokens": 0.25}}
    assert data["errors"]["by_code"] == {"RESOURCE_EXHAUSTED": 3}

    console = Console(record=True, width=140)
    print_report(report, console)
    text = console.export_text()
    assert "RESOURCE_EXHAUSTED" in text
    assert "30.00%" in text
    assert "model" in text


def test_hit_groups_are_reported_separately() -> None:
    requests = [("first turn", 10, 0, 100, 0), ("later turns", 10, 9, 100, 90)]
    report = build_report(make_run([make_result([], requests)]), settings={})
    assert report.hit_groups["first turn"].blocks == 0
    assert report.hit_groups["later turns"].blocks == pytest.approx(0.9)


def make_tier(**fields: Any) -> TierStats:
    counters = dict.fromkeys(TierStats.__dataclass_fields__, 0)
    return TierStats(**{**counters, "tier": TierKind.DRAM, "degraded": False, **fields})


def make_stats(**fields: Any) -> StoreStats:
    counters = dict.fromkeys(StoreStats.__dataclass_fields__, 0)
    return StoreStats(**{**counters, "tiers": (), **fields})


def test_server_delta_subtracts_earlier_traffic() -> None:
    before = make_stats(
        tiers=(make_tier(name="dram", hits=5, misses=1, evictions=2),),
        lookups=10,
        bytes_put=1 << 30,
        process_cpu_us=7_000_000,
    )
    after = make_stats(
        tiers=(make_tier(name="dram", hits=8, misses=4, evictions=2, capacity_bytes=99),),
        lookups=15,
        bytes_put=(1 << 30) + 2_000_000_000,
        bytes_got=1_000_000_000,
        process_cpu_us=10_000_000,
    )
    delta = server_delta(before, after)
    assert delta is not None
    assert delta["lookups"] == 5
    assert (delta["bytes_put"], delta["bytes_got"]) == (2_000_000_000, 1_000_000_000)
    assert delta["cpu_s"] == pytest.approx(3.0)
    assert server_cpu_summary(delta, 6.0) == (
        "server CPU 3.0 s in 6.0 s (50% of one core), 1.00 s per GB put or got"
    )
    assert server_delta(None, after)["cpu_s"] is None, "since start is not the run's"
    (tier,) = delta["tiers"]
    assert (tier["hits"], tier["misses"], tier["evictions"]) == (3, 3, 0)
    assert tier["capacity_bytes"] == 99
    assert server_delta(before, None) is None


def test_binned_hit_ratio() -> None:
    edges = time_bins(2.0, max_bins=2)
    assert edges.tolist() == [0.0, 1.0, 2.0]
    ratio = binned_ratio(
        np.array([0.1, 0.5, 1.5]), np.array([1.0, 3.0, 0.0]), np.array([2.0, 4.0, 0.0]), edges
    )
    assert ratio[0] == pytest.approx(4 / 6)
    assert np.isnan(ratio[1])


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    ops = [("lookup", t / 10, 0.001 + t / 1000, 0) for t in range(30)]
    requests = [("all", 4, t % 4, 64, 16 * (t % 4)) for t in range(30)]
    result = make_result(ops, requests)
    report = build_report(make_run([result], wall_s=3.0), settings={}, reference={"m": (0.4, 0.4)})
    path = tmp_path / "run.png"
    write_plot(merge_results([result]), report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_blocks_no_node_took_are_reported_and_a_silent_server_is_named() -> None:
    """A cluster client answers puts to dead nodes with NODE_UNREACHABLE outcomes and
    lookups with misses, no errors: the report must still show that nothing was stored."""
    result = make_result(
        [("put", 0.0, 0.001, 0)],
        [("all", 10, 0, 5000, 0)],
        put_outcomes={"COMMITTED": 2, "NODE_UNREACHABLE": 98},
    )
    report = build_report(make_run([result]), settings={})
    assert report.server is None
    console = Console(record=True, width=160)
    print_report(report, console)
    text = console.export_text()
    assert "blocks put but not stored: NODE_UNREACHABLE 98 of 100" in text
    assert "server Stats: no answer" in text


async def test_a_put_counts_only_the_bytes_a_server_received() -> None:
    from kvstore.bench.workload import _bytes_reaching_a_server
    from kvstore.client import PutOutcome, PutResult

    outcomes = (PutOutcome.COMMITTED, PutOutcome.NODE_UNREACHABLE, PutOutcome.PARENT_MISSING)
    result = PutResult(outcomes=outcomes, num_skipped=0, bytes_sent=300)
    assert _bytes_reaching_a_server(result, 100) == 200
