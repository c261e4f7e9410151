"""`kvstore-bench placement`: a trace through the cluster's placement and per-node LRUs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kvstore.bench.cli import main
from kvstore.bench.placement_sim import chain_keys, draw_members, owners_of, simulate
from kvstore.cluster.placement import Placement


def shared_prompt_trace(path: Path, num_requests: int = 300) -> Path:
    """Conversations that all start with block 0, as the Mooncake conversation trace's do,
    each turn extending its conversation's previous one."""
    rng = random.Random(5)
    next_id, conversations = 1, []
    with path.open("w") as out:
        for _ in range(num_requests):
            if not conversations or rng.random() < 0.3:
                conversations.append([0])
            chain = rng.choice(conversations)
            chain.extend(range(next_id, next_id + rng.randint(1, 4)))
            next_id = max(chain) + 1
            record = {
                "timestamp": 0,
                "input_length": len(chain) * 512,
                "output_length": 10,
                "hash_ids": chain,
            }
            out.write(json.dumps(record) + "\n")
    return path


def test_with_ample_capacity_the_cluster_hits_exactly_as_one_node(tmp_path: Path) -> None:
    trace = shared_prompt_trace(tmp_path / "t.jsonl")
    chains = [chain_keys(json.loads(line)["hash_ids"]) for line in trace.read_text().splitlines()]
    unique = len({key for keys in chains for key in keys})
    for run_blocks in (1, 4, 16):
        result = simulate(chains, 3, run_blocks, capacity_blocks=unique * 3)
        assert result.one_node_hit_rate > 0.5
        assert result.cluster_hit_rate == result.one_node_hit_rate
        assert 1 / 3 <= result.largest_share <= 1


def test_under_eviction_long_runs_pile_onto_the_prompts_owner(tmp_path: Path) -> None:
    trace = shared_prompt_trace(tmp_path / "t.jsonl")
    chains = [chain_keys(json.loads(line)["hash_ids"]) for line in trace.read_text().splitlines()]
    unique = len({key for keys in chains for key in keys})
    short = simulate(chains, 3, 1, capacity_blocks=unique // 4)
    long = simulate(chains, 3, 64, capacity_blocks=unique // 4)
    assert long.largest_share > short.largest_share
    assert short.gap_points > long.gap_points


def test_each_chains_first_block_alone_spreads_what_follows_the_shared_prompt(
    tmp_path: Path,
) -> None:
    trace = shared_prompt_trace(tmp_path / "t.jsonl")
    chains = [chain_keys(json.loads(line)["hash_ids"]) for line in trace.read_text().splitlines()]
    unique = len({key for keys in chains for key in keys})
    for draw in range(3):
        before = simulate(chains, 3, 16, capacity_blocks=unique // 4, draw=draw, root_with_run=True)
        alone = simulate(chains, 3, 16, capacity_blocks=unique // 4, draw=draw)
        # Runs of 16 from the shared block 0: its owner stores most conversations' starts.
        assert before.busiest_store_share > 0.5
        assert alone.busiest_store_share < before.busiest_store_share
        assert alone.largest_share < before.largest_share
        assert alone.gap_points > before.gap_points


def test_the_model_places_as_the_client_does() -> None:
    members = draw_members(3)
    placement = Placement(members, 4)
    keys = chain_keys(list(range(40)))
    assert owners_of(placement, keys) == [
        run.owner.node_id for run in placement.runs(keys) for _ in range(run.start, run.stop)
    ]
    assert owners_of(placement, keys)[:2] == [
        placement.owner(keys[0]).node_id,
        placement.owner(keys[1]).node_id,
    ]
    before = owners_of(placement, keys, root_with_run=True)
    first_start = next(i for i in range(1, len(keys)) if placement.is_run_start(keys[i]))
    assert set(before[:first_start]) == {placement.owner(keys[0]).node_id}


def test_draws_name_the_nodes_differently_and_only_full_blocks_are_chained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.jsonl"
    # 1,000 tokens: one full block of 512 and a partial one, which is never stored.
    lines = [
        {"timestamp": 0, "input_length": 1000, "output_length": 1, "hash_ids": [0, i]}
        for i in range(1, 40)
    ]
    trace.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["placement", str(trace), "--run-blocks", "1", "--capacity", "2", "--draws", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 unique full blocks" in out
    assert "3 draws of node ids" in out
    assert "+0.00 [+0.00, +0.00]" in out  # block 0 hits on its owner, whichever it is
    assert {m.node_id for m in draw_members(3, 1)}.isdisjoint(m.node_id for m in draw_members(3, 2))
    with pytest.raises(SystemExit, match="--draws"):
        main([*argv[:-1], "0"])


def test_the_command_prints_a_row_per_capacity_and_k(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = shared_prompt_trace(tmp_path / "t.jsonl", num_requests=60)
    assert main(["placement", str(trace), "--run-blocks", "1,4", "--capacity", "2,0.5"]) == 0
    out = capsys.readouterr().out
    assert "3 nodes hit %" in out
    assert out.count("2x (") == 2
    assert out.count("0.5x (") == 2
    with pytest.raises(SystemExit, match="--run-blocks"):
        main(["placement", str(trace), "--run-blocks", "0"])
