"""TEMPORARY stand-in for kvstore.client.cost (branch cost), deleted once main has it.

Same interface: PrefillModel(tokens_per_s, fixed_s), plan_fetch(...) -> FetchPlan.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillModel:
    tokens_per_s: float
    fixed_s: float = 0.0


@dataclass(frozen=True)
class FetchPlan:
    num_load_blocks: int
    fetch_s: float
    recompute_s: float
    reason: str


def plan_fetch(
    *,
    num_matched_blocks: int,
    block_bytes: int,
    block_tokens: int,
    bandwidth_bytes_per_s: float | None,
    prefill: PrefillModel | None,
    per_fetch_overhead_s: float = 0.0,
) -> FetchPlan:
    if num_matched_blocks == 0:
        return FetchPlan(0, 0.0, 0.0, "miss")
    if bandwidth_bytes_per_s is None or prefill is None:
        return FetchPlan(num_matched_blocks, 0.0, 0.0, "no measure yet: fetch")
    fetch_s = per_fetch_overhead_s + num_matched_blocks * block_bytes / bandwidth_bytes_per_s
    recompute_s = num_matched_blocks * block_tokens / prefill.tokens_per_s
    if fetch_s <= recompute_s:
        return FetchPlan(num_matched_blocks, fetch_s, recompute_s, "fetch is faster")
    return FetchPlan(0, fetch_s, recompute_s, "recompute is faster")
