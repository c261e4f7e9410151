"""A cluster's Stats summed over its members (kvstore.client._stats_sum): the loop-lag
fields are the worst member's, not sums."""

from __future__ import annotations

from typing import Any

from kvstore.client import StoreStats
from kvstore.client._stats_sum import sum_store_stats


def member(**fields: Any) -> StoreStats:
    counters = dict.fromkeys(StoreStats.__dataclass_fields__, 0)
    return StoreStats(**{**counters, "tiers": (), "tenants": (), "durability": None, **fields})


def test_the_wait_for_a_core_is_that_of_the_member_with_the_longest_lag() -> None:
    busy_loop = member(loop_lag_max_us=30_000, loop_lag_p99_us=900, loop_lag_max_runqueue_us=1_000)
    no_core = member(loop_lag_max_us=9_000, loop_lag_p99_us=8_000, loop_lag_max_runqueue_us=8_500)
    summed = sum_store_stats([no_core, busy_loop])
    assert (summed.loop_lag_max_us, summed.loop_lag_p99_us) == (30_000, 8_000)
    # Not the sum, nor the largest: the longest lag's own, so the two still read together.
    assert summed.loop_lag_max_runqueue_us == 1_000
