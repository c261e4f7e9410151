"""`kvstore-bench agent`: session generation, scaled layouts, and runs against a real server."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvstore.bench.agent import AgentProfile, session_prompts, shared_prefix
from kvstore.bench.cli import main
from kvstore.bench.presets import get_preset
from kvstore.bench.workload import page_bytes_for, parse_scale, scaled_layout
from kvstore.keys import chain_keys
from kvstore.server import RunningServer

ServerFactory = Callable[..., Awaitable[RunningServer]]

BLOCK_TOKENS = 16
SHARED_TOKENS = 256 + 64  # --system-tokens + --tool-tokens below: 20 full blocks
# A tiny session: 512-byte blocks (2 layers x 4 heads x 1 dim, bf16, 16 tokens).
SMALL_SESSION = [
    "--preset", "Llama-3-8B", "--scale", "1/4096", "--layers", "2",
    "--block-tokens", str(BLOCK_TOKENS),
    "--system-tokens", "256", "--tool-tokens", "64", "--task-tokens", "16-48",
    "--tool-result-tokens", "32-96", "--reply-tokens", "8-32", "--turns", "3-4",
    "--think-time", "0-0.02",
]  # fmt: skip


def make_profile(**overrides: Any) -> AgentProfile:
    fields: dict[str, Any] = {
        "system_prompt_tokens": 100,
        "tool_definitions_tokens": 28,
        "turns": (3, 5),
        "task_tokens": (10, 20),
        "tool_result_tokens": (30, 60),
        "reply_tokens": (5, 10),
    }
    fields.update(overrides)
    return AgentProfile(**fields)


async def run_cli(argv: list[str]) -> tuple[int, float]:
    """Run kvstore-bench in a thread (the server lives on this loop); (exit status, seconds)."""
    start = time.monotonic()
    status = await asyncio.to_thread(main, argv)
    return status, time.monotonic() - start


# -- sessions -------------------------------------------------------------------------------------


def test_sessions_share_the_prefix_and_snowball() -> None:
    profile = make_profile()
    prefix = shared_prefix(profile)
    assert prefix.size == 128
    for session in range(3):
        prompts = list(session_prompts(profile, seed=7, session_index=session))
        assert 3 <= len(prompts) <= 5
        for earlier, later in itertools.pairwise(prompts):
            grown = later.size - earlier.size
            assert 35 <= grown <= 70, "each turn adds a reply and a tool result"
            assert np.array_equal(later[: earlier.size], earlier), "the context only grows"
        assert np.array_equal(prompts[0][:128], prefix)
    # Deterministic per (seed, session); different sessions differ after the prefix.
    again = list(session_prompts(profile, seed=7, session_index=1))
    once_more = list(session_prompts(profile, seed=7, session_index=1))
    assert len(again) == len(once_more)
    assert all(np.array_equal(a, b) for a, b in zip(again, once_more, strict=True))
    assert not np.array_equal(
        next(session_prompts(profile, 7, 0))[128:138], next(session_prompts(profile, 7, 1))[128:138]
    )


def test_shared_prefix_hashes_to_the_same_chain_across_sessions() -> None:
    profile = make_profile()
    block_tokens = 16
    first = chain_keys(list(session_prompts(profile, 1, 0))[1], block_tokens)
    other = chain_keys(list(session_prompts(profile, 2, 5))[1], block_tokens)
    num_shared = profile.shared_prefix_tokens // block_tokens
    assert first[:num_shared] == other[:num_shared]
    assert first[num_shared] != other[num_shared]


def test_sessions_stop_at_the_context_limit() -> None:
    profile = make_profile(turns=(30, 30), max_context_tokens=400)
    prompts = list(session_prompts(profile, seed=3, session_index=0))
    assert prompts
    assert len(prompts) < 30
    assert all(prompt.size <= 400 for prompt in prompts)


def test_profile_rejects_bad_ranges() -> None:
    with pytest.raises(ValueError, match="turns"):
        make_profile(turns=(5, 2))
    with pytest.raises(ValueError, match="at least one turn"):
        make_profile(turns=(0, 2))


# -- scaled layouts ------------------------------------------------------------------------------


def test_scaled_layout_keeps_layers_and_shrinks_heads() -> None:
    llama = get_preset("Llama-3-8B")
    assert llama.kv_bytes_per_token == 128 << 10
    layout = scaled_layout(llama, parse_scale("1/64"), 256)
    assert layout.bytes_per_token == 2048
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (32, 8, 2)
    assert layout.block_bytes == 512 << 10
    assert scaled_layout(llama, 1.0, 16).bytes_per_token == llama.kv_bytes_per_token


def test_scaled_layout_drops_layers_below_one_element() -> None:
    layout = scaled_layout(get_preset("Llama-3-8B"), parse_scale("1/4096"), 512)
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (8, 1, 1)
    assert layout.bytes_per_token == 32
    mla = scaled_layout(get_preset("DeepSeek-V3"), 1 / 64, 64)
    assert abs(mla.bytes_per_token - get_preset("DeepSeek-V3").kv_bytes_per_token / 64) < 61 * 4


def test_scale_and_page_parsing() -> None:
    assert parse_scale("1/64") == 1 / 64
    assert parse_scale("0.5") == 0.5
    for bad in ("0", "2", "x", "1/0"):
        with pytest.raises(ValueError, match="scale"):
            parse_scale(bad)
    assert page_bytes_for(512 << 10) == 64 << 10
    assert page_bytes_for(16 << 10) == 16 << 10
    assert page_bytes_for(3 * 1024) == 1024
    assert page_bytes_for(100) == 512


# -- against a real server -----------------------------------------------------------------------


async def test_agent_reuses_the_shared_prompt_and_its_own_turns(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = await server_factory(store__page_bytes=512)
    out = tmp_path / "agent.json"
    argv = ["agent", *SMALL_SESSION, "--target", f"127.0.0.1:{server.port}", "--processes", "0"]
    argv += ["--concurrency", "2", "--ramp-up", "0.2", "--sessions", "6", "--duration", "10"]
    argv += ["--seed", "11"]
    status, _ = await run_cli([*argv, "--no-progress", "--json", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    assert {"operations", "hit_rate", "reference", "errors", "units", "server"} <= set(report)
    assert report["units"] == {"name": "session", "started": 6, "cancelled": 0}
    assert report["errors"]["by_code"] == {}
    hits = report["hit_rate"]
    later, first = hits["groups"]["later turns"], hits["groups"]["first turn"]
    assert first["num_requests"] == 6
    # Sessions 3 to 6 start after an earlier one stored the shared prefix: each hits all of
    # its 20 full blocks, and nothing past it (the task differs).
    num_shared = SHARED_TOKENS // BLOCK_TOKENS
    assert 4 * num_shared <= first["num_hit_blocks"] <= 6 * num_shared
    assert later["blocks"] > 0.5, "later turns hit their own earlier context"
    assert set(hits["per_tier"]) == {"DRAM"}
    assert hits["per_tier"]["DRAM"] == pytest.approx(hits["blocks"])
    ops = report["operations"]
    assert ops["turn"]["count"] == hits["num_requests"]
    assert ops["lookup"]["count"] == hits["num_requests"]
    assert ops["put"]["count"] > 0
    assert ops["get"]["count"] > 0
    assert report["server"]["tiers"][0]["hits"] > 0


async def test_agent_closed_loop_stops_at_the_duration(server_factory: ServerFactory) -> None:
    server = await server_factory(store__page_bytes=512)
    argv = ["agent", *SMALL_SESSION, "--target", f"127.0.0.1:{server.port}", "--processes", "0"]
    # Sessions of 30 turns with 0.2 s think times would take 6 s; the run must end at 1.5 s.
    argv += ["--turns", "30-30", "--think-time", "0.2-0.2", "--duration", "1.5", "--no-progress"]
    status, elapsed = await run_cli(argv)
    assert status == 0
    assert elapsed < 1.5 + 3.0


async def test_agent_open_loop_stops_at_the_duration(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = await server_factory(store__page_bytes=512)
    out = tmp_path / "open.json"
    argv = ["agent", *SMALL_SESSION, "--target", f"127.0.0.1:{server.port}", "--processes", "0"]
    argv += ["--rate", "20", "--turns", "30-30", "--think-time", "0.2-0.2", "--duration", "1.5"]
    status, elapsed = await run_cli([*argv, "--no-progress", "--json", str(out)])
    assert status == 0
    assert elapsed < 1.5 + 3.0
    report = json.loads(out.read_text())
    assert report["mode"] == "open"
    assert 10 <= report["units"]["started"] <= 60  # Poisson with mean 30
    assert report["schedule_lag_ms"]["max"] < 1000


async def test_errors_are_counted_by_status_code_when_the_server_stops(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = await server_factory(store__page_bytes=512)
    out = tmp_path / "stopped.json"
    argv = ["agent", *SMALL_SESSION, "--target", f"127.0.0.1:{server.port}", "--processes", "0"]
    argv += ["--turns", "30-30", "--think-time", "0.05-0.05", "--duration", "3", "--no-progress"]
    run = asyncio.create_task(run_cli([*argv, "--json", str(out)]))
    await asyncio.sleep(1.5)
    await server.drain()
    status, elapsed = await run
    assert status == 0
    assert elapsed < 3 + 3.0
    report = json.loads(out.read_text())
    assert report["operations"]["turn"]["count"] > 0, "turns ran before the stop"
    assert report["errors"]["by_code"].get("UNAVAILABLE", 0) > 0
    assert report["errors"]["by_operation"]["turn"]["UNAVAILABLE"] > 0
    assert report["server"] is None, "no stats from a stopped server"


@pytest.mark.slow
def test_agent_command_starts_its_own_server_and_processes(tmp_path: Path) -> None:
    out = tmp_path / "agent.json"
    argv = ["agent", *SMALL_SESSION, "--duration", "2", "--processes", "2", "--concurrency", "4"]
    argv += ["--dram-bytes", "64MiB", "--no-progress", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["processes"] == 2
    assert report["hit_rate"]["groups"]["later turns"]["blocks"] > 0
    assert report["errors"]["by_code"] == {}
