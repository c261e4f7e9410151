"""Weighted rendezvous placement over runs (kvstore.cluster.placement): deterministic,
balanced by weight, and when a member joins or leaves, only the runs it wins or held
move. The keys are seeded, so every count here is the same on every run."""

from __future__ import annotations

import itertools
import random
import zlib

import pytest

from kvstore.cluster.members import Member
from kvstore.cluster.placement import Placement, Run, member_weight

NUM_RUNS = 30_000


def member(node_id: str, dram_bytes: int = 1 << 30) -> Member:
    return Member(
        node_id=node_id,
        address=f"{node_id}:50051",
        data_port=0,
        capacity_bytes={"dram": dram_bytes},
    )


def run_keys(seed: int, count: int = NUM_RUNS) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(count)]


def shares(placement: Placement, keys: list[bytes]) -> dict[str, float]:
    counts = {m.node_id: 0 for m in placement.members}
    for key in keys:
        counts[placement.owner(key).node_id] += 1
    return {node: count / len(keys) for node, count in counts.items()}


def test_a_chains_root_is_a_run_alone_and_the_rest_is_cut_at_run_start_keys() -> None:
    placement = Placement([member("a"), member("b"), member("c")], run_blocks=4)
    keys = run_keys(1, 400)
    runs = placement.runs(keys)
    assert runs[0].start == 0
    assert runs[-1].stop == len(keys)
    for before, after in itertools.pairwise(runs):
        assert before.stop == after.start
    starts = [run.start for run in runs]
    assert starts == [0, 1] + [i for i in range(2, len(keys)) if zlib.crc32(keys[i]) % 4 == 0]
    assert runs[0].stop == 1  # the root alone, whatever its key
    for run in runs:
        assert run.owner == placement.owner(keys[run.start])
    # About run_blocks long on average, not a fixed length.
    assert len(runs) == pytest.approx(len(keys) / 4, rel=0.25)
    assert len({run.stop - run.start for run in runs}) > 3
    # Another client, members listed in another order, computes the same owners.
    again = Placement([member("c"), member("a"), member("b")], run_blocks=4)
    assert [run.owner.node_id for run in again.runs(keys)] == [r.owner.node_id for r in runs]
    assert placement.runs([]) == []
    assert placement.runs(keys[:1]) == [(0, 1, placement.owner(keys[0]))]


def test_a_root_that_is_a_run_start_key_is_still_alone() -> None:
    placement = Placement([member(name) for name in "abc"], run_blocks=4)
    keys = next(
        keys for seed in range(100) if placement.is_run_start((keys := run_keys(seed, 50))[0])
    )
    runs = placement.runs(keys)
    assert [(run.start, run.stop) for run in runs[:2]] == [(0, 1), (1, runs[1].stop)]
    assert runs[1].owner == placement.owner(keys[1])


def owners_per_block(runs: list[Run]) -> list[Member]:
    return [run.owner for run in runs for _ in range(run.start, run.stop)]


def test_a_tail_is_cut_where_the_whole_chain_is() -> None:
    placement = Placement([member(name) for name in "abc"], run_blocks=4)
    keys = run_keys(7, 200)
    owner_of = owners_per_block(placement.runs(keys))
    # After the root, the tail starts a run of its own: no owner to ask for.
    assert owners_per_block(placement.runs(keys[1:], tail=True)) == owner_of[1:]
    for cut in (2, 5, 37, 101, 199):
        tail = keys[cut:]
        lead = placement.lead_blocks(tail)
        assert all(not placement.is_run_start(key) for key in tail[:lead])
        assert lead == len(tail) or placement.is_run_start(tail[lead])
        # The lead continues the parent's run, so its owner is the parent's.
        tail_runs = placement.runs(tail, tail=True, lead_owner=owner_of[cut - 1])
        assert owners_per_block(tail_runs) == owner_of[cut:]
    with pytest.raises(ValueError, match="tail=True"):
        placement.runs(keys[5:], lead_owner=owner_of[4])


def test_the_next_blocks_of_chains_that_share_a_root_go_to_their_own_owners() -> None:
    # 600 chains of one shared root and their own blocks after it: the root's owner gets
    # the root and its share of the rest, not each chain's first blocks on top.
    placement = Placement([member(name) for name in "abc"], run_blocks=4)
    root = run_keys(10, 1)
    counts = {name: 0 for name in "abc"}
    for chain in range(600):
        keys = root + run_keys(2000 + chain, 6)
        runs = placement.runs(keys)
        assert runs[1].start == 1
        assert runs[1].owner == placement.owner(keys[1])
        for run in runs[1:]:
            counts[run.owner.node_id] += run.stop - run.start
    for count in counts.values():
        assert count / sum(counts.values()) == pytest.approx(1 / 3, abs=0.05)


def test_conversations_that_share_a_prompt_spread_over_the_members() -> None:
    # 500 conversations of 14 blocks, all starting with the same 2-block prompt: the
    # prompt's owner takes its share and the few blocks of each before its first run
    # start (about run_blocks - 1), not all of them, as runs cut by position would.
    placement = Placement([member(name) for name in "abc"], run_blocks=4)
    prompt = run_keys(8, 2)
    counts = {name: 0 for name in "abc"}
    for conversation in range(500):
        keys = prompt + run_keys(1000 + conversation, 12)
        for run in placement.runs(keys):
            counts[run.owner.node_id] += run.stop - run.start
    shares_seen = [count / sum(counts.values()) for count in counts.values()]
    assert max(shares_seen) < 0.6
    assert min(shares_seen) > 0.2


def test_equal_members_share_runs_equally() -> None:
    placement = Placement([member(name) for name in "abc"])
    for share in shares(placement, run_keys(2)).values():
        assert share == pytest.approx(1 / 3, abs=0.02)


def test_shares_follow_dram_capacity() -> None:
    members = [member("a", 1 << 30), member("b", 2 << 30), member("c", 1 << 30)]
    measured = shares(Placement(members), run_keys(3))
    assert measured["a"] == pytest.approx(0.25, abs=0.02)
    assert measured["b"] == pytest.approx(0.50, abs=0.02)
    assert measured["c"] == pytest.approx(0.25, abs=0.02)
    assert member_weight(Member("x", "x:1", 0, {})) == 1.0


def test_a_joining_member_takes_about_one_nth_and_no_run_moves_between_others() -> None:
    keys = run_keys(4)
    before = Placement([member(name) for name in "abc"])
    after = Placement([member(name) for name in "abcd"])
    moved = [key for key in keys if before.owner(key) != after.owner(key)]
    assert all(after.owner(key).node_id == "d" for key in moved)
    assert len(moved) / len(keys) == pytest.approx(1 / 4, abs=0.02)


def test_a_leaving_member_gives_up_only_its_own_runs() -> None:
    keys = run_keys(5)
    before = Placement([member(name) for name in "abcd"])
    after = Placement([member(name) for name in "abd"])
    for key in keys:
        if before.owner(key).node_id != "c":
            assert after.owner(key) == before.owner(key)


def test_a_long_chain_spreads_over_every_member() -> None:
    placement = Placement([member(name) for name in "abc"], run_blocks=8)
    owners = {run.owner.node_id for run in placement.runs(run_keys(6, 64 * 8))}
    assert owners == {"a", "b", "c"}


def test_bad_placements_are_refused() -> None:
    with pytest.raises(ValueError, match="run_blocks"):
        Placement([member("a")], run_blocks=0)
    with pytest.raises(ValueError, match="node id"):
        Placement([member("a"), member("a")])
    with pytest.raises(LookupError, match="no members"):
        Placement([]).owner(b"key")


def test_spans_join_neighbouring_runs_of_one_owner_and_keep_every_blocks_owner() -> None:
    placement = Placement([member(name) for name in "abc"], run_blocks=4)
    keys = run_keys(9, 300)
    for tail, lead_owner in ((False, None), (True, None), (True, member("b"))):
        chain = keys[3:] if tail else keys
        runs = placement.runs(chain, tail=tail, lead_owner=lead_owner)
        spans = placement.spans(chain, tail=tail, lead_owner=lead_owner)
        per_block = [run.owner.node_id for run in runs for _ in range(run.start, run.stop)]
        assert [s.owner.node_id for s in spans for _ in range(s.start, s.stop)] == per_block
        assert all(a.owner != b.owner for a, b in itertools.pairwise(spans))
        assert len(spans) < len(runs)
    assert len(Placement([member("a")], run_blocks=4).spans(keys)) == 1
    assert placement.spans([]) == []
