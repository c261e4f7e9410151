"""`kvstore-bench soak`: its per-row table from synthetic samples, and short real runs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvstore.bench.cli import main
from kvstore.bench.soak import StatsReading, soak_rows
from kvstore.bench.workload import WorkerResult
from kvstore.client import StoreStats, TierKind, TierStats
from kvstore.server import RunningServer

ServerFactory = Callable[..., Awaitable[RunningServer]]

# Tiny sessions (512-byte blocks), as in test_bench_agent.py, with no ramp-up so that
# every client connection opens within the warm-up.
SMALL_SESSION = [
    "--preset", "Llama-3-8B", "--scale", "1/4096", "--layers", "2", "--block-tokens", "16",
    "--system-tokens", "256", "--tool-tokens", "64", "--task-tokens", "16-48",
    "--tool-result-tokens", "32-96", "--reply-tokens", "8-32", "--turns", "3-4",
    "--think-time", "0-0.02", "--concurrency", "4", "--ramp-up", "0", "--no-progress",
]  # fmt: skip
SHORT_SOAK = ["--duration", "4", "--sample-s", "0.25", "--row-s", "2", "--warm-up", "1.5"]


# -- the table ------------------------------------------------------------------------------------


def make_stats(*, bytes_put: int, dram_bytes: int = 100, **fields: Any) -> StoreStats:
    dram = TierStats(
        **{
            **dict.fromkeys(TierStats.__dataclass_fields__, 0),
            "tier": TierKind.DRAM,
            "name": "dram",
            "degraded": False,
            "capacity_bytes": dram_bytes,
        }
    )
    counters = dict.fromkeys(StoreStats.__dataclass_fields__, 0)
    return StoreStats(**{**counters, "tiers": (dram,), "bytes_put": bytes_put, **fields})


def make_result(ops: list[tuple[str, float, float]], errors: list[tuple[float, str, str]]) -> Any:
    names = ("lookup", "get", "put", "turn")
    return WorkerResult(
        op_names=names,
        op_kind=np.array([names.index(op) for op, _, _ in ops], dtype=np.uint8),
        op_start_s=np.array([start for _, start, _ in ops]),
        op_latency_s=np.array([latency for _, _, latency in ops]),
        op_bytes=np.zeros(len(ops), dtype=np.int64),
        group_names=(),
        request_group=np.zeros(0, np.uint8),
        request_start_s=np.zeros(0),
        request_blocks=np.zeros(0, np.int64),
        request_lookup_hits=np.zeros(0, np.int64),
        request_hit_blocks=np.zeros(0, np.int64),
        request_tokens=np.zeros(0, np.int64),
        request_hit_tokens=np.zeros(0, np.int64),
        tier_hit_blocks={},
        errors={},
        put_outcomes={},
        schedule_lag_s=np.zeros(0),
        num_units_started=0,
        num_units_cancelled=0,
        max_unit_index=-1,
        error_log=tuple(errors),
    )


def test_rows_split_samples_latencies_and_errors_by_time() -> None:
    started_at = 1_000.0
    readings = [
        StatsReading(started_at + t, make_stats(bytes_put=put, rss_bytes=rss, open_fds=fds, **lag))
        for t, put, rss, fds, lag in [
            (0.0, 0, 10, 20, {"loop_lag_max_us": 500, "loop_lag_p99_us": 400}),
            (5.0, 250, 11, 21, {"loop_lag_max_us": 9000, "loop_lag_p99_us": 800}),
            (10.0, 500, 12, 22, {"loop_lag_max_us": 700, "loop_lag_p99_us": 600}),
            (15.0, 500, 13, 23, {"loop_lag_max_us": 100, "loop_lag_p99_us": 100}),
        ]
    ]
    readings.insert(2, StatsReading(started_at + 7.0, None))  # unanswered: left out
    ops = [("lookup", 1.0, 0.001), ("lookup", 2.0, 0.003), ("turn", 2.0, 0.01)]
    ops += [("lookup", 11.0, 0.020), ("put", 12.0, 0.005)]
    errors = [(3.0, "put", "RESOURCE_EXHAUSTED"), (3.0, "turn", "RESOURCE_EXHAUSTED")]
    errors += [(12.0, "get", "UNAVAILABLE")]
    rows = soak_rows(
        readings,
        make_result(ops, errors),
        started_at=started_at,
        duration_s=20.0,
        row_s=10.0,
        unit_op="turn",
    )
    first, second = rows
    assert (first.start_s, first.end_s, second.start_s, second.end_s) == (0, 10, 10, 20)
    assert (first.rss_bytes, first.open_fds) == (11, 21)  # the row's last sample
    assert (first.loop_lag_max_us, first.loop_lag_p99_us) == (9000, 800)
    assert (second.loop_lag_max_us, second.loop_lag_p99_us) == (700, 600)
    lookup_p50, lookup_p99 = first.latency_ms["lookup"] or (0, 0)
    assert lookup_p50 == pytest.approx(2.0)
    assert lookup_p99 == pytest.approx(2.98)
    assert first.latency_ms["get"] is None
    assert second.latency_ms["put"] == (pytest.approx(5.0), pytest.approx(5.0))
    assert first.num_turns == 1
    # A failed turn is counted at its failed RPC, once.
    assert first.errors == {"RESOURCE_EXHAUSTED": 1}
    assert second.errors == {"UNAVAILABLE": 1}
    # 100 bytes of DRAM. First row: 250 bytes put from 0 to 5 s. Second row: from the
    # first row's last sample (5 s) to 15 s, 250 bytes.
    assert first.dram_turnover_s == pytest.approx(2.0)
    assert second.dram_turnover_s == pytest.approx(4.0)


# -- real runs ---------------------------------------------------------------------------------


async def run_soak(argv: list[str]) -> int:
    """kvstore-bench in a thread: the in-process server lives on this loop."""
    return await asyncio.to_thread(main, ["soak", *argv])


async def test_a_short_soak_against_a_real_server_passes(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    # 256 KiB of DRAM: 512 sessions' worth of blocks turn it over within the run.
    server = await server_factory(store__page_bytes=512, store__dram_bytes=256 << 10)
    report_path = tmp_path / "soak.json"
    target = f"127.0.0.1:{server.port}"
    argv = [*SMALL_SESSION, *SHORT_SOAK, "--target", target, "--processes", "0"]
    # The server shares this test's process, whose RSS the load's own worker adds to.
    argv += ["--max-rss-growth", "25", "--json", str(report_path)]
    assert await run_soak(argv) == 0
    document = json.loads(report_path.read_text())
    soak = document["soak"]
    assert soak["verdict"] == {**soak["verdict"], "passed": True, "failures": []}
    assert soak["num_unanswered"] == 0
    assert len(soak["samples"]) >= 10
    assert all(s["rss_bytes"] > 0 and s["open_fds"] > 0 for s in soak["samples"])
    (dram,) = document["load"]["server"]["tiers"]
    assert dram["evictions"] > 0, "the soak's DRAM must turn over"
    rows = soak["rows"]
    assert [(row["start_s"], row["end_s"]) for row in rows] == [(0, 2), (2, 4)]
    for row in rows:
        assert row["num_turns"] > 0
        assert row["latency_ms"]["lookup"] is not None
        assert row["errors"] == {}
        assert row["dram_turnover_s"] is not None


async def test_a_soak_past_its_loop_lag_bound_exits_1(
    server_factory: ServerFactory, capfd: pytest.CaptureFixture[str]
) -> None:
    server = await server_factory(store__page_bytes=512)
    target = f"127.0.0.1:{server.port}"
    argv = [*SMALL_SESSION, *SHORT_SOAK, "--target", target, "--processes", "0"]
    # No probe wakes within a microsecond of its due time.
    argv += ["--max-rss-growth", "25", "--max-loop-lag-ms", "0.001"]
    assert await run_soak(argv) == 1
    out = capfd.readouterr().out
    assert "soak failed" in out
    assert "event-loop lag over 0.001 ms" in out


@pytest.mark.slow
async def test_a_soak_starts_its_own_daemon_in_worker_processes(tmp_path: Path) -> None:
    report_path = tmp_path / "soak.json"
    argv = [*SMALL_SESSION, "--duration", "6", "--sample-s", "0.5", "--row-s", "3"]
    argv += ["--warm-up", "2", "--processes", "2", "--dram-bytes", "256KiB"]
    argv += ["--json", str(report_path)]
    assert await run_soak(argv) == 0
    soak = json.loads(report_path.read_text())["soak"]
    assert soak["verdict"]["passed"]
    # The daemon's own process: a Python with torch and gRPC loaded.
    assert min(s["rss_bytes"] for s in soak["samples"]) > 50 << 20
    assert len(soak["rows"]) == 2
