"""`kvstore-bench trace`: replaying generated Mooncake traces against a real server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstore.bench.cli import main
from kvstore.bench.presets import get_preset
from kvstore.bench.replay import reference_hit_rates, trace_workload
from kvstore.bench.trace import infinite_cache_hit_rate, load_trace
from kvstore.bench.workload import scaled_layout
from kvstore.client import ClientOptions, KVClient, KVForm, Namespace
from kvstore.server import RunningServer

ServerFactory = Callable[..., Awaitable[RunningServer]]

BLOCK_TOKENS = 512  # a Mooncake hash id is one 512-token block
BLOCK_BYTES = 16384  # the layout the flags below give: 512 tokens x 32 B
LAYOUT_FLAGS = ["--scale", "1/4096", "--layers", "2", "--block-tokens", str(BLOCK_TOKENS)]
INFINITE = "trace, infinite cache"


def conversation_trace(
    path: Path,
    *,
    num_conversations: int = 6,
    num_turns: int = 5,
    blocks_per_turn: int = 3,
    gap_ms: int = 1000,
) -> Path:
    """Conversations that interleave turn by turn. Every request starts with the same two
    system-prompt blocks, then its conversation's chain, which grows by ``blocks_per_turn``
    full blocks a turn; each request ends in a partial block of 5 tokens that is never stored."""
    chains = [[0, 1] for _ in range(num_conversations)]
    next_id = 2
    lines = []
    timestamp = 0
    for _ in range(num_turns):
        for chain in chains:
            chain.extend(range(next_id, next_id + blocks_per_turn))
            next_id += blocks_per_turn
            partial_id = next_id
            next_id += 1
            record = {
                "timestamp": timestamp,
                "input_length": len(chain) * BLOCK_TOKENS + 5,
                "output_length": 10,
                "hash_ids": [*chain, partial_id],
            }
            lines.append(json.dumps(record))
            timestamp += gap_ms
    path.write_text("\n".join(lines) + "\n")
    return path


def replay_argv(trace: Path, server: RunningServer, out: Path, *extra: str) -> list[str]:
    target = f"127.0.0.1:{server.port}"
    return [
        "trace", str(trace), *LAYOUT_FLAGS, "--target", target, "--processes", "0",
        "--no-progress", "--json", str(out), *extra,
    ]  # fmt: skip


async def replay(argv: list[str], out: Path) -> tuple[dict[str, Any], float]:
    start = time.monotonic()
    status = await asyncio.to_thread(main, argv)
    elapsed = time.monotonic() - start
    assert status == 0
    return json.loads(await asyncio.to_thread(out.read_text)), elapsed


# -- pure ------------------------------------------------------------------------------------------


def test_workload_scales_arrival_times(tmp_path: Path) -> None:
    requests = load_trace(
        conversation_trace(tmp_path / "t.jsonl", gap_ms=500), block_tokens=BLOCK_TOKENS
    )
    layout = scaled_layout(get_preset("Llama-3-8B"), 1 / 4096, BLOCK_TOKENS, num_layers=2)
    workload = trace_workload(requests, layout, time_scale=0.1, salt=b"s")
    assert workload.num_units() == 30
    assert workload.offsets_s[:3] == pytest.approx((0.0, 0.05, 0.1))
    with pytest.raises(ValueError, match="time scale"):
        trace_workload(requests, layout, time_scale=0, salt=b"s")


def test_reference_adds_lru_only_below_the_unique_blocks(tmp_path: Path) -> None:
    requests = load_trace(conversation_trace(tmp_path / "t.jsonl"), block_tokens=BLOCK_TOKENS)
    unique = infinite_cache_hit_rate(requests, BLOCK_TOKENS).num_unique_blocks
    assert list(reference_hit_rates(requests, BLOCK_TOKENS, unique)) == [INFINITE]
    rates = reference_hit_rates(requests, BLOCK_TOKENS, unique // 3)
    lru = rates[f"trace, LRU at {unique // 3} blocks"]
    assert lru[0] < rates[INFINITE][0]


# -- against a real server -------------------------------------------------------------------------


async def test_replay_matches_the_infinite_cache_when_capacity_is_ample(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    trace = conversation_trace(tmp_path / "t.jsonl")
    expected = infinite_cache_hit_rate(load_trace(trace, block_tokens=BLOCK_TOKENS), BLOCK_TOKENS)
    assert 0.5 < expected.block_hit_rate < 0.9, "the generated trace has hits and misses"
    server = await server_factory(store__page_bytes=BLOCK_BYTES)
    out = tmp_path / "ample.json"
    # One request at a time, in file order: exactly the order the model assumes.
    report, _ = await replay(replay_argv(trace, server, out, "--concurrency", "1"), out)
    hits = report["hit_rate"]
    assert hits["num_blocks"] == expected.num_cacheable_blocks
    assert hits["num_hit_blocks"] == expected.num_hit_blocks
    assert hits["num_hit_tokens"] == expected.num_hit_tokens
    assert hits["num_tokens"] == expected.num_tokens, "partial last blocks count as tokens"
    assert hits["blocks"] == pytest.approx(expected.block_hit_rate)
    assert hits["tokens"] == pytest.approx(expected.token_hit_rate)
    assert report["reference"] == {
        INFINITE: {"blocks": expected.block_hit_rate, "tokens": expected.token_hit_rate}
    }
    assert report["put_outcomes"] == {"COMMITTED": expected.num_unique_blocks}
    assert report["server"]["tiers"][0]["evictions"] == 0


async def test_replay_hits_less_when_capacity_forces_eviction(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    trace = conversation_trace(tmp_path / "t.jsonl")
    expected = infinite_cache_hit_rate(load_trace(trace, block_tokens=BLOCK_TOKENS), BLOCK_TOKENS)
    capacity_blocks = 32  # of 92 unique blocks
    server = await server_factory(
        store__page_bytes=BLOCK_BYTES, store__dram_bytes=capacity_blocks * BLOCK_BYTES
    )
    out = tmp_path / "evict.json"
    report, _ = await replay(replay_argv(trace, server, out, "--concurrency", "1"), out)
    assert report["hit_rate"]["blocks"] < expected.block_hit_rate - 0.1
    assert report["hit_rate"]["tokens"] < expected.token_hit_rate - 0.1
    assert report["server"]["tiers"][0]["evictions"] > 0
    # A remote server's pages are unknown, so the model assumes none is wasted.
    assert f"trace, LRU at {capacity_blocks} blocks" in report["reference"]


async def test_timed_replay_follows_the_scaled_timestamps(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    trace = conversation_trace(tmp_path / "t.jsonl", gap_ms=1000)
    server = await server_factory(store__page_bytes=BLOCK_BYTES)
    out = tmp_path / "timed.json"
    # 12 requests 1 s apart in trace time, 40 ms apart replayed: 0.44 s from first to last.
    argv = replay_argv(trace, server, out, "--time-scale", "0.04", "--max-requests", "12")
    report, _elapsed = await replay(argv, out)
    assert report["mode"] == "timed"
    assert report["units"] == {"name": "request", "started": 12, "cancelled": 0}
    assert 0.44 <= report["wall_s"] < 0.44 + 2.0
    assert report["schedule_lag_ms"]["p50"] < 40
    reference = report["reference"][INFINITE]["blocks"]
    assert 0 < report["hit_rate"]["blocks"] <= reference


async def test_closed_and_open_loop_stop_within_the_duration(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    trace = conversation_trace(tmp_path / "long.jsonl", num_conversations=40, num_turns=50)
    server = await server_factory(store__page_bytes=BLOCK_BYTES)
    for mode in (["--concurrency", "2"], ["--rate", "40"]):
        out = tmp_path / f"{mode[0][2:]}.json"
        argv = replay_argv(trace, server, out, *mode, "--duration", "1")
        report, elapsed = await replay(argv, out)
        assert elapsed < 1 + 3.0, mode
        assert report["wall_s"] < 1 + 1.0, mode
        assert 0 < report["units"]["started"] < 2000, mode
        assert report["units"]["cancelled"] == 0, mode


async def test_put_errors_are_counted_when_dram_is_full_of_pinned_blocks(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    # One put of a layer-major squatter fills all of DRAM: let one put hold all of it.
    server = await server_factory(
        store__page_bytes=BLOCK_BYTES,
        store__dram_bytes=8 * BLOCK_BYTES,
        store__max_put_reserved_bytes=8 * BLOCK_BYTES,
    )
    layout = scaled_layout(get_preset("Llama-3-8B"), 1 / 4096, BLOCK_TOKENS, num_layers=2)
    assert layout.block_bytes == BLOCK_BYTES
    squatter = Namespace(tenant="squatter", model_fingerprint="m", layout=layout)
    keys = [f"pinned-{i}".encode() for i in range(8)]
    async with KVClient(f"127.0.0.1:{server.port}", squatter, options=ClientOptions()) as client:
        kv = torch.zeros((8, layout.num_layers, *layout.layer_shape), dtype=torch.bfloat16)
        assert (await client.put_blocks(keys, kv, form=KVForm.BLOCKS)).num_committed == 8
        assert await client.pin(keys, ttl_s=60) == 8
    trace = conversation_trace(tmp_path / "t.jsonl", num_conversations=2, num_turns=2)
    out = tmp_path / "full.json"
    report, _ = await replay(replay_argv(trace, server, out, "--concurrency", "1"), out)
    errors = report["errors"]
    assert errors["by_code"] == {"RESOURCE_EXHAUSTED": 4}, "every put fails, nothing else"
    assert errors["by_operation"] == {
        "put": {"RESOURCE_EXHAUSTED": 4},
        "request": {"RESOURCE_EXHAUSTED": 4},
    }
    assert report["operations"]["lookup"]["count"] == 4
    assert report["operations"]["request"]["count"] == 0


@pytest.mark.slow
def test_trace_command_with_its_own_server_and_two_processes(tmp_path: Path) -> None:
    trace = conversation_trace(tmp_path / "t.jsonl", gap_ms=200)
    out = tmp_path / "own.json"
    argv = ["trace", str(trace), *LAYOUT_FLAGS, "--time-scale", "0.25", "--processes", "2"]
    argv += ["--dram-bytes", "16MiB", "--no-progress", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["processes"] == 2
    assert report["units"]["started"] == 30
    assert 0 < report["hit_rate"]["blocks"] <= report["reference"][INFINITE]["blocks"]
    assert report["errors"]["by_code"] == {}
