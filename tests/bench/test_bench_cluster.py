"""`--nodes N` on the load commands and `kvstore-bench cluster` (hits, lookup, workers,
failover) at tiny sizes: real etcd, real daemons and load processes, each its own process;
their output has the structure the README shows, and no process outlives a run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from child_processes import children_named  # tests/child_processes.py

from kvstore.bench.cli import main
from kvstore.bench.local_etcd import etcd_missing_reason
from kvstore.bench.trace import infinite_cache_hit_rate, load_trace
from kvstore.bench.trace_sample import CONVERSATION_SAMPLE, write_sample

MiB = 1 << 20
DAEMONS_AND_ETCD = ("kvstore.server.main", "etcd")
# Small agent sessions: 2 sessions of 2 turns, 32 KiB blocks of 256 tokens in 2 layers.
TINY_AGENT = [
    *(
        "--scale",
        "1/1024",
        "--layers",
        "2",
        "--sessions",
        "2",
        "--turns",
        "2-2",
        "--think-time",
        "0-0",
    ),
    *("--system-tokens", "512", "--tool-tokens", "0", "--task-tokens", "300-300"),
    *("--tool-result-tokens", "600-600", "--reply-tokens", "100-100", "--duration", "30"),
    *("--concurrency", "2", "--processes", "0", "--no-progress"),
]


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    assert children_named(*DAEMONS_AND_ETCD) == []
    yield
    # Load and client processes run `multiprocessing.spawn`; its resource tracker, one per
    # test process for its whole life, is no leftover of a run.
    assert children_named(*DAEMONS_AND_ETCD, "multiprocessing.spawn") == []


@pytest.fixture
def cluster_run(no_leftovers: None) -> None:
    """A test that starts etcd: skipped, saying why, where there is no etcd binary."""
    reason = etcd_missing_reason()
    if reason is not None:
        pytest.skip(reason)


def run_json(argv: list[str], path: Path) -> dict[str, Any]:
    assert main([*argv, "--json", str(path)]) == 0
    document: dict[str, Any] = json.loads(path.read_text())
    return document


# -- the sample trace -------------------------------------------------------------------


def test_the_committed_sample_is_a_valid_trace_with_reuse_between_requests() -> None:
    requests = load_trace(CONVERSATION_SAMPLE)
    assert len(requests) == 1000
    stats = infinite_cache_hit_rate(requests)
    assert 0.1 < stats.block_hit_rate < 0.5  # later turns of a conversation hit earlier ones
    assert [r.timestamp_ms for r in requests] == sorted(r.timestamp_ms for r in requests)


def test_a_sample_is_the_first_requests_unchanged(tmp_path: Path) -> None:
    source = tmp_path / "full.jsonl"
    lines = [
        {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]},
        {"timestamp": 12.5, "input_length": 1100, "output_length": 9, "hash_ids": [0, 1, 2]},
        {"timestamp": 40, "input_length": 10, "output_length": 0, "hash_ids": [7]},
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "deep" / "sample.jsonl"
    assert write_sample(source, out, 2) == 2
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines[:2]
    assert write_sample(source, out, 10) == 3  # a shorter trace: all of it
    with pytest.raises(ValueError, match="at least one request"):
        write_sample(source, out, 0)


# -- --nodes on the load commands ---------------------------------------------------------


@pytest.mark.slow  # a cluster of two daemons
def test_agent_with_nodes_runs_on_a_local_cluster_that_shares_the_dram(
    tmp_path: Path, cluster_run: None
) -> None:
    argv = ["agent", *TINY_AGENT, "--nodes", "2", "--dram-bytes", "32MiB"]
    report = run_json(argv, tmp_path / "agent.json")
    assert report["target"].startswith("etcd://127.0.0.1:")
    assert report["units"]["started"] == 2
    assert report["operations"]["turn"]["count"] == 4
    assert report["errors"]["by_code"] == {}
    assert report["hit_rate"]["groups"]["later turns"]["blocks"] > 0
    # The two daemons' DRAM adds up to what one daemon would have had, and no SSD tier.
    tiers = report["server"]["tiers"]
    assert [tier["name"] for tier in tiers] == ["dram"]
    assert tiers[0]["capacity_bytes"] == 32 * MiB


def test_nodes_with_a_target_or_below_one_is_refused_with_the_reason(
    no_leftovers: None,
) -> None:
    with pytest.raises(SystemExit, match="--nodes starts its own cluster; drop --target"):
        main(["agent", *TINY_AGENT, "--nodes", "2", "--target", "127.0.0.1:1"])
    with pytest.raises(SystemExit, match="--nodes must be at least 1, got 0"):
        main(["agent", *TINY_AGENT, "--nodes", "0"])
    with pytest.raises(SystemExit, match="--nodes starts its own cluster"):
        main(["lookup", "--nodes", "2", "--target", "127.0.0.1:1"])
    with pytest.raises(SystemExit, match="--nodes must be at least 1"):
        main(["throughput", "--nodes", "-1"])


@pytest.mark.slow  # a cluster of three daemons
def test_trace_with_nodes_hits_what_one_store_would_with_ample_dram(
    tmp_path: Path, cluster_run: None
) -> None:
    argv = ["trace", str(CONVERSATION_SAMPLE), "--max-requests", "60", "--scale", "1/16384"]
    argv += ["--concurrency", "1", "--processes", "0", "--nodes", "3", "--dram-bytes", "24MiB"]
    report = run_json([*argv, "--no-progress"], tmp_path / "trace.json")
    assert report["target"].startswith("etcd://")
    assert report["units"]["started"] == 60
    assert report["errors"]["by_code"] == {}
    assert report["server"]["tiers"][0]["evictions"] == 0
    # One request at a time and nothing evicted: the three nodes hit every block a single
    # unbounded cache would, since every client places a run where a lookup looks for it.
    assert report["hit_rate"]["blocks"] == report["reference"]["trace, infinite cache"]["blocks"]
    assert report["hit_rate"]["blocks"] > 0


@pytest.mark.slow  # a cluster of two daemons and a ceiling server
def test_lookup_with_nodes_prints_every_case_as_json(
    capsys: pytest.CaptureFixture[str], cluster_run: None
) -> None:
    assert main(["lookup", "--nodes", "2", "--keys", "40", "--iterations", "20", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert {"hit", "miss", "no keys", "hit, unary", "plain grpcio stream"} <= set(results)
    assert all(row["p50_ms"] > 0 for row in results.values())


@pytest.mark.slow  # a cluster of two daemons, a ceiling server, 1 MiB blocks both ways
def test_throughput_with_nodes_moves_blocks_through_the_cluster(
    capsys: pytest.CaptureFixture[str], cluster_run: None
) -> None:
    argv = ["throughput", "--nodes", "2", "--block-sizes", "1MiB", "--total", "4MiB"]
    assert main([*argv, "--rounds", "1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["block_bytes"] == MiB
    assert row["put_gbps"] > 0
    assert row["get_gbps"] > 0


# -- kvstore-bench cluster ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["hits", "--nodes", "1"], "--nodes must be at least 2"),
        (["workers", "--workers", "1"], "--workers must be at least 2"),
        (["failover", "--duration", "10", "--kill-after", "10"], "--kill-after must be inside"),
        (["hits", "--trace", "/nonexistent/t.jsonl"], "no such file"),
        (["lookup", "--keys", "0"], "--keys must be at least 1"),
    ],
)
def test_cluster_refuses_bad_settings_before_starting_anything(
    flags: list[str], reason: str, no_leftovers: None
) -> None:
    with pytest.raises(SystemExit, match=reason):
        main(["cluster", *flags])


@pytest.mark.slow  # four replays, each on a fresh cluster
def test_cluster_hits_compares_n_nodes_with_one_ample_and_under_eviction(
    tmp_path: Path, cluster_run: None
) -> None:
    argv = ["cluster", "hits", "--nodes", "2", "--max-requests", "40", "--processes", "0"]
    hits = run_json(argv, tmp_path / "hits.json")["parts"]["hits"]
    assert hits["num_requests"] == 40
    replays = {(r["capacity"], r["nodes"]): r for r in hits["replays"]}
    assert set(replays) == {("ample", 1), ("ample", 2), ("eviction", 1), ("eviction", 2)}
    for capacity in ("ample", "eviction"):
        single, spread = replays[capacity, 1], replays[capacity, 2]
        assert single["dram_bytes"] == spread["dram_bytes"]  # the same DRAM in all
        assert single["blocks"] == spread["blocks"] > 0
        assert single["errors"] == spread["errors"] == 0
        gap = (spread["block_hit_rate"] - single["block_hit_rate"]) * 100
        assert hits["gap_points"][capacity] == pytest.approx(gap)
    assert replays["ample", 1]["evictions"] == replays["ample", 2]["evictions"] == 0
    for (_, nodes), replay in replays.items():
        counts = replay["node_counts"]
        assert len(counts) == nodes
        assert len({count["node_id"] for count in counts}) == nodes
        # Every block the daemons stored is a put the client saw committed, and no put
        # was dropped for a missing parent or an unreachable node.
        assert sum(count["blocks_put"] for count in counts) == replay["put_outcomes"]["COMMITTED"]
        assert set(replay["put_outcomes"]) <= {"COMMITTED", "ALREADY_PRESENT"}
        assert sum(count["evictions"] for count in counts) == replay["evictions"]
        for count in counts:
            assert 0 < count["num_blocks"] <= count["capacity_blocks"]
        # Each node has an even share of the DRAM.
        assert len({count["capacity_blocks"] for count in counts}) == 1
    assert replays["eviction", 1]["evictions"] > 0
    assert replays["eviction", 2]["evictions"] > 0
    # One request at a time into ample DRAM: one node hits what an unbounded cache would.
    assert replays["ample", 1]["block_hit_rate"] == hits["infinite_cache_hit_rate"] > 0
    assert replays["eviction", 1]["block_hit_rate"] <= replays["ample", 1]["block_hit_rate"]
    # The per-node LRU model of the run's own placement: exact where nothing is evicted.
    assert replays["ample", 2]["placement_model_hit_rate"] == replays["ample", 2]["block_hit_rate"]
    assert (
        0
        < replays["eviction", 2]["placement_model_hit_rate"]
        <= replays["ample", 2]["placement_model_hit_rate"]
    )
    assert hits["goal_met"] == all(abs(g) <= 1.0 for g in hits["gap_points"].values())


@pytest.mark.slow  # a daemon and two clusters at once
def test_cluster_lookup_times_one_daemon_one_node_and_n_nodes(
    tmp_path: Path, cluster_run: None
) -> None:
    argv = ["cluster", "lookup", "--nodes", "2", "--keys", "60", "--iterations", "30"]
    lookup = run_json(argv, tmp_path / "lookup.json")["parts"]["lookup"]
    cases = lookup["cases"]
    assert set(cases) == {"1 daemon", "1 node", "2 nodes"}
    for row in cases.values():
        assert row["count"] == 30
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert cases["1 node"]["p50_ratio_to_1_node"] == 1.0
    assert cases["1 daemon"]["p50_ratio_to_1_daemon"] == 1.0
    ratio = cases["2 nodes"]["p50_ms"] / cases["1 node"]["p50_ms"]
    assert cases["2 nodes"]["p50_ratio_to_1_node"] == pytest.approx(ratio)
    assert lookup["goal_met"] == (ratio <= 1.5)


@pytest.mark.slow  # two supervisors, three daemons, two client processes
def test_cluster_workers_moves_verified_bytes_through_both_supervisors(
    tmp_path: Path, cluster_run: None
) -> None:
    argv = ["cluster", "workers", "--clients", "2", "--total", "8MiB", "--rounds", "1"]
    workers = run_json(argv, tmp_path / "workers.json")["parts"]["workers"]
    assert workers["bytes_per_round"] == 8 * MiB
    assert set(workers["gbps"]) == {"1", "2"}
    for side in ("1", "2"):
        assert workers["gbps"][side]["put"] > 0
        assert workers["gbps"][side]["get"] > 0
    for op in ("put", "get"):
        expected = workers["gbps"]["2"][op] / workers["gbps"]["1"][op]
        assert workers["ratio"][op] == pytest.approx(expected)


@pytest.mark.slow  # agent load on three daemons, one killed, a lease expiry
def test_cluster_failover_turns_a_killed_node_into_misses_not_errors(
    tmp_path: Path, cluster_run: None
) -> None:
    argv = ["cluster", "failover", "--duration", "16", "--kill-after", "6", "--interval", "2"]
    argv += ["--lease-ttl", "2", "--load-processes", "1", "--concurrency", "3"]
    failover = run_json(argv, tmp_path / "failover.json")["parts"]["failover"]
    assert 0 < failover["kill_s"] < 16
    dropped = failover["etcd_dropped_after_s"]
    assert dropped is not None
    assert 0 < dropped < 2 + 10
    events = [e for interval in failover["intervals"] for e in interval["events"]]
    assert any("killed" in e for e in events)
    assert any("dropped" in e for e in events)
    assert sum(i["requests"] for i in failover["intervals"]) > 0
    assert set(failover["hit_rate_by_phase"]) == {
        "before the kill",
        "kill to etcd's drop",
        "after the drop",
    }
    # The promise: a lost node costs misses, never errors.
    assert failover["errors"] == 0, failover["errors_by_code"]
    assert failover["goal_met"]
