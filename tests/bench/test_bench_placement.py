"""`kvstore-bench placement`: a trace through the cluster's placement and per-node LRUs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kvstore.bench.cli import main
from kvstore.bench.placement_sim import chain_keys, simulate


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
