"""kvstore-bench lookup and throughput, run small against a real server."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import trustme
from threaded_server import server_thread  # tests/threaded_server.py

from kvstore.bench.ceiling import measure_ceiling
from kvstore.bench.cli import main as bench_main
from kvstore.bench.cost import Round, timed_phase
from kvstore.bench.spawn import spawned_ceiling_server
from kvstore.bench.throughput import KVStoreRounds, layout_for
from kvstore.client import ClientOptions, KVClient, Namespace, Unauthenticated
from kvstore.server.auth import token_sha256


def test_lookup_reports_hits_misses_and_the_plain_grpcio_floor(
    store_target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = bench_main(
        ["lookup", "--keys", "64", "--iterations", "19", "--target", store_target, "--json"]
    )
    assert code == 0
    results = json.loads(capsys.readouterr().out)
    assert {row["calls"] for row in results.values()} == {19}  # as asked, not rounded
    assert set(results) == {
        "plain grpcio stream",
        "plain grpcio unary",
        "no keys",
        "hit",
        "miss",
        "hit, unary",
        "hit, data plane",
    }
    floors = {"hit, unary": "plain grpcio unary", "plain grpcio unary": "plain grpcio unary"}
    for name, row in results.items():
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
        # Streamed cases against the streamed floor, unary ones against the unary floor.
        floor = results[floors.get(name, "plain grpcio stream")]["p50_ms"]
        assert row["p50_ratio_to_floor"] == pytest.approx(row["p50_ms"] / floor)


def test_lookup_compares_an_authenticating_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    """--compare-auth starts a daemon with a tokens file of its own; its hits answer."""
    code = bench_main(["lookup", "--keys", "16", "--iterations", "20", "--compare-auth"])
    assert code == 0
    out = capsys.readouterr().out
    assert "hit, with auth" in out
    assert "hit, unary, with auth" in out
    assert "authentication adds" in out
    assert "to the p50 of 'hit, unary'" in out


@pytest.mark.parametrize("streams", [1, 3])
def test_throughput_moves_blocks_and_checks_what_came_back(store_target: str, streams: int) -> None:
    block_bytes = 128 << 10  # one token of the benchmark's Llama-3-8B geometry
    assert layout_for(block_bytes).block_tokens == 1
    layout = layout_for(block_bytes)
    namespace = Namespace(tenant="bench", model_fingerprint="throughput-test", layout=layout)

    async def two_rounds() -> list[Round]:
        options = ClientOptions(chunk_bytes=64 << 10)
        async with KVClient(store_target, namespace, options=options) as client:
            kvstore = KVStoreRounds(client, layout, 1 << 20, streams)
            return [await kvstore.run() for _ in range(2)]  # each checks what came back

    for round_ in asyncio.run(two_rounds()):
        for phase in (round_.put, round_.get):
            assert phase.gbps > 0
            # The server runs in this process here: both probes read this process's CPU.
            assert phase.cpu.server_s_per_gb > 0
            assert phase.cpu.client_s_per_gb > 0


def test_throughput_rejects_block_sizes_off_the_token_grid() -> None:
    with pytest.raises(ValueError, match="multiple of"):
        layout_for(100_000)


def test_plain_grpcio_ceiling_moves_every_byte_with_and_without_kvstores_copies() -> None:
    with spawned_ceiling_server() as target:
        for streams in (1, 2):
            for with_copies in (False, True):
                # measure_ceiling raises unless every byte it asked for came back.
                round_ = asyncio.run(
                    measure_ceiling(target, 4 << 20, 256 << 10, streams, with_copies=with_copies)
                )
                for phase in (round_.put, round_.get):
                    assert phase.gbps > 0
                    # The ceiling server is another process: its CPU is its own.
                    assert phase.cpu.server_s_per_gb > 0
                    assert phase.cpu.client_s_per_gb > 0


def test_a_timed_phase_charges_each_side_its_own_cpu() -> None:
    readings = iter([1.0, 3.0])  # the server's CPU clock before and after

    async def server_cpu() -> float:
        return next(readings)

    async def burn_cpu() -> None:
        start = time.process_time()
        while time.process_time() - start < 0.05:
            pass

    start = time.perf_counter()
    phase = asyncio.run(timed_phase(2_000_000_000, server_cpu, burn_cpu))
    wall_s = time.perf_counter() - start
    assert phase.cpu.server_s_per_gb == pytest.approx(1.0)  # 2 s over 2 GB
    assert 0.025 <= phase.cpu.client_s_per_gb < 1.0
    assert phase.cpu.total_s_per_gb == pytest.approx(1.0 + phase.cpu.client_s_per_gb)
    assert phase.cpu.bound_gbps(cores=2) == pytest.approx(2 / phase.cpu.total_s_per_gb)
    assert phase.gbps >= 2 / wall_s  # timed inside the call, probes left out


@pytest.mark.slow
@pytest.mark.parametrize("untuned", [False, True])
def test_throughput_command_reports_speed_and_cpu_for_every_line(
    untuned: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["throughput", "--block-sizes", "128KiB", "--total", "2MiB", "--rounds", "1"]
    args += ["--chunk", "64KiB", "--json", *(["--untuned-clients"] if untuned else [])]
    assert bench_main(args) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["block_bytes"] == 128 << 10
    for line in ("", "grpc_", "ceiling_", "whole_", "copies_"):
        assert row[f"{line}put_gbps"] > 0
        assert row[f"{line}get_gbps"] > 0
    for line in ("", "grpc_", "ceiling_", "copies_"):
        for op in ("put", "get"):
            cost = row[f"{line}{op}_cpu"]
            # kvstore's server is another process here, as the ceiling's is.
            assert cost["client_s_per_gb"] > 0
            assert cost["server_s_per_gb"] > 0
    # One round: each ratio is that round's ratio of the two speeds.
    assert row["put_ratio"] == pytest.approx(row["put_gbps"] / row["ceiling_put_gbps"])
    assert row["get_ratio"] == pytest.approx(row["get_gbps"] / row["ceiling_get_gbps"])
    assert row["grpc_put_ratio"] == pytest.approx(row["grpc_put_gbps"] / row["ceiling_put_gbps"])


def test_the_bench_reaches_a_daemon_with_tls_and_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--tls-ca and --token reach every KVClient of the run (through KVSTORE_TLS_CA and
    KVSTORE_TOKEN, which monkeypatch restores afterwards)."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    token = "bench-token-0123"
    (tmp_path / "tokens.toml").write_text(
        f'[[tokens]]\nsha256 = "{token_sha256(token)}"\ntenant = "bench"\n'
    )
    for variable in ("KVSTORE_TOKEN", "KVSTORE_TLS_CA"):
        monkeypatch.setenv(variable, "")
    secured = {
        "tls.cert_file": str(tmp_path / "server.pem"),
        "tls.key_file": str(tmp_path / "server.key"),
        "auth.tokens_file": str(tmp_path / "tokens.toml"),
    }
    with server_thread(**secured) as target:
        lookup = ["lookup", "--keys", "16", "--iterations", "5", "--target", target, "--json"]
        tls = ["--tls-ca", str(tmp_path / "ca.pem")]
        assert bench_main([*lookup, *tls, "--token", token]) == 0
        assert json.loads(capsys.readouterr().out)["hit"]["p50_ms"] > 0
        monkeypatch.setenv("KVSTORE_TOKEN", "")
        with pytest.raises(Unauthenticated):
            bench_main([*lookup, *tls])


def test_the_memcpy_baseline_copies_every_byte_and_counts_its_cpu() -> None:
    import torch

    from kvstore.bench.memcpy import measure_memcpy

    source = torch.randint(0, 256, (4 << 20,), dtype=torch.uint8)
    phase = measure_memcpy(source, 1 << 20)  # raises unless the bytes arrived
    assert phase.gbps > 0
    assert phase.cpu.client_s_per_gb >= 0
    assert phase.cpu.server_s_per_gb == 0  # one process: nothing on a server side


def test_watch_snapshot_times_taking_the_entries_against_building_the_events(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert bench_main(["watch-snapshot", "--blocks", "300", "--repeats", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["blocks"] == 300
    assert report["entries_ms"] > 0
    assert report["events_ms"] > 0
    assert report["events_over_entries"] == pytest.approx(
        report["events_ms"] / report["entries_ms"]
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lookup", "--under-load", "0.1", "--nodes", "2"], "drop --nodes"),
        (["lookup", "--iterations", "0"], "--iterations must be at least 1"),
        (["throughput", "--rounds", "0"], "--rounds must be at least 1"),
        (["metrics", "--rounds", "0"], "--rounds must be at least 1"),
        (["metrics", "--rounds", "5", "--iterations", "3"], "must be at least --rounds"),
        (["lz4", "--datasets", "bf16x"], "unknown dataset(s) bf16x"),
        (["trace", "/dev/null", "--block-tokens", "256"], "--block-tokens must be 512"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exited:
        bench_main(argv)
    assert message in str(exited.value.code)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b'{"timestamp": 1, "input_length": 2, "output_length": 1, "hash_ids": [1]}\n{"t',
            ":2: invalid JSON",
        ),
        (b"\xff\xfe\n", ":1: not UTF-8 text"),
    ],
)
@pytest.mark.parametrize("command", [["trace"], ["placement"], ["cluster", "hits", "--trace"]])
def test_a_bad_trace_is_a_message_not_a_traceback(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    content: bytes,
    message: str,
) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_bytes(content)
    assert bench_main([*command, str(trace)]) == 2
    assert f"kvstore-bench: {trace}{message}" in capsys.readouterr().err


def test_a_missing_trace_is_a_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench_main(["trace", str(tmp_path / "none.jsonl")]) == 2
    assert "cannot read the trace: No such file or directory" in capsys.readouterr().err
