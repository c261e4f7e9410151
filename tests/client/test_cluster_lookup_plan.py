"""A cluster lookup's plan and merge (kvstore.client._cluster_lookup): each owner asked
for its spans' keys once, the prefix ending at the earliest block some owner lacks, each
block's tier from its owner, and a plan kept per chain until the placement changes."""

from __future__ import annotations

import random

from kvstore.client._cluster_lookup import LookupPlans, merge_answers, plan_lookup
from kvstore.client._results import PrefixMatch
from kvstore.cluster.members import Member
from kvstore.cluster.placement import Placement
from kvstore.enums import TierKind

BLOCK_TOKENS = 16


def member(node_id: str) -> Member:
    return Member(node_id=node_id, address=f"{node_id}:50051", data_port=0, capacity_bytes={})


def chain(seed: int, length: int = 200) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(length)]


THREE = Placement([member("a"), member("b"), member("c")], run_blocks=4)


def answer(keys: list[bytes], tiers: list[TierKind], *, root: bool = False) -> PrefixMatch:
    return PrefixMatch(
        keys=keys,
        num_matched=len(tiers),
        tiers=tuple(tiers),
        block_tokens=BLOCK_TOKENS,
        first_is_chain_root=root,
    )


def answers_for(
    plan_keys: list[list[bytes]], held: list[list[TierKind]], root: bool = True
) -> list[PrefixMatch | None]:
    return [
        answer(keys, tiers, root=root and index == 0)
        for index, (keys, tiers) in enumerate(zip(plan_keys, held, strict=True))
    ]


def by_position(keys: list[bytes], stored: dict[int, TierKind]) -> list[list[TierKind]]:
    """What each owner of the plan answers when the blocks at `stored` are held: the
    tiers of the leading blocks of its keys that are stored."""
    plan = plan_lookup(THREE, keys)
    positions: list[list[int]] = [[] for _ in plan.owners]
    for span, index in zip(plan.spans, plan.span_owner, strict=True):
        positions[index] += range(span.start, span.stop)
    held: list[list[TierKind]] = []
    for owned in positions:
        tiers: list[TierKind] = []
        for position in owned:
            if position not in stored:
                break
            tiers.append(stored[position])
        held.append(tiers)
    return held


def test_each_owner_is_asked_for_its_spans_keys_back_to_back_in_chain_order() -> None:
    keys = chain(1)
    plan = plan_lookup(THREE, keys)
    assert len(plan.owners) == 3
    assert plan.owners[0].member == plan.spans[0].owner  # the first span's owner first
    for index, owner in enumerate(plan.owners):
        spans = [span for span, at in zip(plan.spans, plan.span_owner, strict=True) if at == index]
        assert all(span.owner == owner.member for span in spans)
        assert owner.keys == [key for span in spans for key in keys[span.start : span.stop]]
    assert sorted(key for owner in plan.owners for key in owner.keys) == sorted(keys)


def test_the_prefix_ends_at_the_earliest_block_some_owner_lacks() -> None:
    keys = chain(2)
    for stored_length in (0, 1, 2, 5, 17, 63, 150, 199, 200):
        stored = dict.fromkeys(range(stored_length), TierKind.DRAM)
        plan = plan_lookup(THREE, keys)
        owner_keys = [owner.keys for owner in plan.owners]
        match = merge_answers(plan, keys, answers_for(owner_keys, by_position(keys, stored)), 16)
        assert match.num_matched == stored_length
        assert match.tiers == (TierKind.DRAM,) * stored_length
        assert match.first_is_chain_root == (stored_length > 0)


def test_a_block_missing_on_one_owner_ends_the_prefix_though_later_ones_are_held() -> None:
    keys = chain(3)
    plan = plan_lookup(THREE, keys)
    owner_keys = [owner.keys for owner in plan.owners]
    for hole in (0, 1, 40, 120, 199):
        stored = {position: TierKind.DRAM for position in range(len(keys)) if position != hole}
        held = by_position(keys, stored)
        match = merge_answers(plan, keys, answers_for(owner_keys, held), BLOCK_TOKENS)
        assert match.num_matched == hole


def test_a_failed_owner_holds_nothing() -> None:
    keys = chain(4)
    plan = plan_lookup(THREE, keys)
    owner_keys = [owner.keys for owner in plan.owners]
    held = by_position(keys, dict.fromkeys(range(len(keys)), TierKind.DRAM))
    for failed in range(3):
        answers = answers_for(owner_keys, held)
        answers[failed] = None
        match = merge_answers(plan, keys, answers, BLOCK_TOKENS)
        first_of_failed = next(
            span.start for span, at in zip(plan.spans, plan.span_owner, strict=True) if at == failed
        )
        assert match.num_matched == first_of_failed
        assert match.first_is_chain_root == (failed != 0)


def test_each_blocks_tier_comes_from_its_owners_answer() -> None:
    keys = chain(5)
    plan = plan_lookup(THREE, keys)
    owner_keys = [owner.keys for owner in plan.owners]
    rng = random.Random(6)
    kinds = [TierKind.DRAM, TierKind.SSD]
    stored = {position: rng.choice(kinds) for position in range(150)}
    match = merge_answers(plan, keys, answers_for(owner_keys, by_position(keys, stored)), 16)
    assert match.num_matched == 150
    assert match.tiers == tuple(stored[position] for position in range(150))


def test_a_plan_is_kept_per_chain_and_made_again_under_a_new_placement() -> None:
    plans = LookupPlans(kept=2)
    keys = chain(7)
    first = plans.plan(THREE, keys)
    assert plans.plan(THREE, list(keys)) is first  # the same keys in another list
    changed = list(keys)
    changed[100] = b"x" * 32
    assert plans.plan(THREE, changed) is not first  # other keys, another plan
    after_a_join = Placement([*THREE.members, member("d")], run_blocks=4)
    replanned = plans.plan(after_a_join, keys)
    assert replanned is not first
    assert list(replanned.spans) == after_a_join.spans(keys)
    assert len(replanned.owners) == 4
    assert len(plans) == 1  # the old placement's plans were dropped with it


def test_only_the_last_chains_plans_are_kept() -> None:
    plans = LookupPlans(kept=2)
    chains = [chain(seed, 20) for seed in (10, 11, 12)]
    kept = [plans.plan(THREE, keys) for keys in chains]
    assert len(plans) == 2
    assert plans.plan(THREE, chains[2]) is kept[2]
    assert plans.plan(THREE, chains[0]) is not kept[0]  # the oldest was dropped
