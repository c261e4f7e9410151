"""The fetch-or-recompute cost model: the bandwidth meter, the prefill model, the plan."""

from __future__ import annotations

import math
import threading

import pytest
from metered_blocks import FakeClock  # tests/metered_blocks.py

from kvstore.client import BandwidthMeter, FetchPlan, PrefillModel, plan_fetch
from kvstore.client.cost import break_even_bandwidth, plan_fetch_blocks

MB = 1_000_000


# -- BandwidthMeter -------------------------------------------------------------------------


def test_meter_has_no_rate_before_a_sample() -> None:
    meter = BandwidthMeter()
    assert meter.rate() is None
    assert meter.rate(node="a") is None
    assert meter.snapshot() == {}


def test_meter_rate_is_total_bytes_over_total_seconds_while_fresh() -> None:
    meter = BandwidthMeter(min_bytes=0, clock=FakeClock())
    meter.observe(100 * MB, 1.0)
    meter.observe(300 * MB, 1.0)
    assert meter.rate() == pytest.approx(200 * MB)


def test_meter_forgets_old_samples_with_its_half_life() -> None:
    clock = FakeClock()
    meter = BandwidthMeter(half_life_s=10.0, min_bytes=0, clock=clock)
    meter.observe(100 * MB, 1.0)  # 100 MB/s
    clock.now += 10.0  # one half-life: the old sample weighs 1/2
    meter.observe(400 * MB, 1.0)  # 400 MB/s
    expected = (0.5 * 100 * MB + 400 * MB) / (0.5 + 1.0)
    assert meter.rate() == pytest.approx(expected)
    clock.now += 1000.0  # both decay alike: the ratio stays
    assert meter.rate() == pytest.approx(expected)
    clock.now += 1.0
    meter.observe(50 * MB, 1.0)  # fresh sample dominates a long-decayed past
    assert meter.rate() == pytest.approx(50 * MB, rel=1e-6)


def test_meter_keeps_nodes_and_tiers_apart_and_pools_on_request() -> None:
    meter = BandwidthMeter(min_bytes=0, clock=FakeClock())
    meter.observe(100 * MB, 1.0, node="a", tier="dram")
    meter.observe(10 * MB, 1.0, node="a", tier="ssd")
    meter.observe(300 * MB, 1.0, node="b", tier="dram")
    assert meter.rate(node="a", tier="dram") == pytest.approx(100 * MB)
    assert meter.rate(node="a", tier="ssd") == pytest.approx(10 * MB)
    assert meter.rate(node="a") == pytest.approx(55 * MB)
    assert meter.rate(tier="dram") == pytest.approx(200 * MB)
    assert meter.rate() == pytest.approx(410 * MB / 3)
    assert meter.rate(node="c") is None
    assert meter.snapshot() == {
        ("a", "dram"): pytest.approx(100 * MB),
        ("a", "ssd"): pytest.approx(10 * MB),
        ("b", "dram"): pytest.approx(300 * MB),
    }


def test_meter_pools_small_transfers_until_min_bytes() -> None:
    meter = BandwidthMeter(min_bytes=1000, clock=FakeClock())
    meter.observe(400, 0.001)
    meter.observe(400, 0.001)
    assert meter.rate() is None  # 800 bytes: below min_bytes, no sample yet
    meter.observe(400, 0.001)
    assert meter.rate() == pytest.approx(1200 / 0.003)


def test_meter_ignores_empty_transfers_and_waits_for_measurable_time() -> None:
    meter = BandwidthMeter(min_bytes=0, clock=FakeClock())
    meter.observe(0, 1.0)
    meter.observe(1000, 0.0)
    assert meter.rate() is None
    meter.observe(1000, 0.5)
    assert meter.rate() == pytest.approx(4000.0)


@pytest.mark.parametrize(
    ("nbytes", "seconds"), [(-1, 1.0), (10, -0.1), (10, math.nan), (10, math.inf)]
)
def test_meter_rejects_bad_samples(nbytes: int, seconds: float) -> None:
    meter = BandwidthMeter()
    with pytest.raises(ValueError, match="nbytes >= 0 and seconds >= 0"):
        meter.observe(nbytes, seconds)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"half_life_s": 0.0}, "half_life_s must be a positive number"),
        ({"half_life_s": -1.0}, "half_life_s must be a positive number"),
        ({"min_bytes": -1}, "min_bytes must be >= 0"),
    ],
)
def test_meter_rejects_bad_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BandwidthMeter(**kwargs)  # type: ignore[arg-type]


def test_meter_is_safe_across_threads() -> None:
    meter = BandwidthMeter(min_bytes=0)

    def feed(node: str) -> None:
        for _ in range(2000):
            meter.observe(1000, 0.001, node=node)
            meter.rate()

    threads = [threading.Thread(target=feed, args=(f"n{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Every sample is 1 MB/s; any decay applies to bytes and seconds alike.
    assert meter.rate() == pytest.approx(1e6)
    assert set(meter.snapshot()) == {(f"n{i}", "") for i in range(4)}


# -- PrefillModel ---------------------------------------------------------------------------


def test_prefill_seconds_is_fixed_plus_linear() -> None:
    model = PrefillModel(tokens_per_s=1000.0, fixed_s=0.01)
    assert model.seconds(0) == pytest.approx(0.01)
    assert model.seconds(500) == pytest.approx(0.51)
    assert model.marginal_seconds(500) == pytest.approx(0.5)


def test_prefill_measured_and_from_flops() -> None:
    assert PrefillModel.measured(2048, 0.5).tokens_per_s == pytest.approx(4096.0)
    model = PrefillModel.from_flops(flops_per_token=2e9, flops_per_s=4e14)
    assert model.tokens_per_s == pytest.approx(2e5)


@pytest.mark.parametrize(
    ("tokens_per_s", "fixed_s"), [(0.0, 0.0), (-5.0, 0.0), (math.inf, 0.0), (10.0, -1.0)]
)
def test_prefill_rejects_bad_rates(tokens_per_s: float, fixed_s: float) -> None:
    with pytest.raises(ValueError, match=r"tokens_per_s must be a positive|fixed_s must be >= 0"):
        PrefillModel(tokens_per_s=tokens_per_s, fixed_s=fixed_s)


def test_prefill_measured_rejects_nothing_measured() -> None:
    with pytest.raises(ValueError, match="num_tokens > 0 and seconds > 0"):
        PrefillModel.measured(0, 1.0)
    with pytest.raises(ValueError, match="num_tokens > 0 and seconds > 0"):
        PrefillModel.measured(100, 0.0)
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
        PrefillModel(tokens_per_s=1.0).seconds(-1)


# -- plan_fetch -----------------------------------------------------------------------------

# 1 MB blocks of 100 tokens at 10 000 tokens/s: recomputing a block takes 10 ms, so the
# break-even bandwidth is 1 MB / 10 ms = 100 MB/s.
BLOCK = {"block_bytes": 1 * MB, "block_tokens": 100}
PREFILL = PrefillModel(tokens_per_s=10_000.0, fixed_s=0.05)


def test_break_even_is_bytes_per_token_times_prefill_rate() -> None:
    assert break_even_bandwidth(**BLOCK, prefill=PREFILL) == pytest.approx(100 * MB)


def test_plan_fetches_the_whole_match_above_break_even() -> None:
    plan = plan_fetch(
        num_matched_blocks=8, **BLOCK, bandwidth_bytes_per_s=200 * MB, prefill=PREFILL
    )
    assert plan == FetchPlan(
        8,
        pytest.approx(0.04),
        pytest.approx(0.08),
        "fetch",
        pytest.approx(0.04),
        pytest.approx(0.08),
    )
    assert plan.saved_s == pytest.approx(0.04)


def test_plan_recomputes_below_break_even() -> None:
    plan = plan_fetch(num_matched_blocks=8, **BLOCK, bandwidth_bytes_per_s=50 * MB, prefill=PREFILL)
    assert plan.num_load_blocks == 0
    assert (plan.fetch_s, plan.recompute_s) == (0.0, 0.0)
    assert plan.reason.startswith("recompute: fetching 8 block(s) takes 160 ms")
    assert plan.match_fetch_s == pytest.approx(0.16)
    assert plan.match_recompute_s == pytest.approx(0.08)


def test_plan_at_break_even_fetches_since_it_is_no_slower() -> None:
    plan = plan_fetch(
        num_matched_blocks=3, **BLOCK, bandwidth_bytes_per_s=100 * MB, prefill=PREFILL
    )
    assert plan.num_load_blocks == 3


def test_plan_with_overhead_recomputes_small_matches_and_fetches_large_ones() -> None:
    # At 200 MB/s each block saves 5 ms; a 12 ms overhead pays off from 3 blocks on.
    common = {**BLOCK, "bandwidth_bytes_per_s": 200 * MB, "prefill": PREFILL}
    decisions = [
        plan_fetch(num_matched_blocks=n, per_fetch_overhead_s=0.012, **common).num_load_blocks
        for n in range(6)
    ]
    assert decisions == [0, 0, 0, 3, 4, 5]
    assert plan_fetch(num_matched_blocks=3, per_fetch_overhead_s=0.012, **common).fetch_s == (
        pytest.approx(0.027)
    )


def test_plan_without_a_bandwidth_recomputes_and_says_why() -> None:
    plan = plan_fetch(num_matched_blocks=4, **BLOCK, bandwidth_bytes_per_s=None, prefill=PREFILL)
    assert plan.num_load_blocks == 0
    assert plan.reason == "recompute: no bandwidth sample and no configured prior"
    assert plan.match_fetch_s is None


def test_plan_names_the_bandwidth_source() -> None:
    plan = plan_fetch(
        num_matched_blocks=2,
        **BLOCK,
        bandwidth_bytes_per_s=1000 * MB,
        prefill=PREFILL,
        bandwidth_source="configured prior",
    )
    assert plan.reason == "fetch (configured prior bandwidth)"


def test_plan_of_a_miss_loads_nothing() -> None:
    plan = plan_fetch(num_matched_blocks=0, **BLOCK, bandwidth_bytes_per_s=1e9, prefill=PREFILL)
    assert plan == FetchPlan(0, 0.0, 0.0, "recompute: nothing matched")


def test_plan_blocks_loads_a_fast_head_and_recomputes_a_slow_tail() -> None:
    # Two DRAM blocks at 1 GB/s, then SSD blocks at 20 MB/s (50 ms a block against 10 ms).
    plan = plan_fetch_blocks(
        block_bandwidths=[1000 * MB, 1000 * MB, 20 * MB, 20 * MB], **BLOCK, prefill=PREFILL
    )
    assert plan.num_load_blocks == 2
    assert plan.reason == "fetch prefix: 2 of 4 blocks"
    assert plan.fetch_s == pytest.approx(0.002)
    assert plan.recompute_s == pytest.approx(0.02)


def test_plan_blocks_stops_at_an_unknown_rate() -> None:
    plan = plan_fetch_blocks(
        block_bandwidths=[1000 * MB, None, 1000 * MB], **BLOCK, prefill=PREFILL
    )
    assert plan.num_load_blocks == 1
    assert plan.match_fetch_s is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_matched_blocks": -1}, "num_matched_blocks must be an int >= 0"),
        ({"block_bytes": 0}, "block_bytes must be an int >= 1"),
        ({"block_tokens": 0}, "block_tokens must be an int >= 1"),
        ({"bandwidth_bytes_per_s": 0.0}, "a bandwidth must be positive"),
        ({"bandwidth_bytes_per_s": -5.0}, "a bandwidth must be positive"),
        ({"per_fetch_overhead_s": -0.1}, "per_fetch_overhead_s must be >= 0"),
    ],
)
def test_plan_rejects_bad_input(kwargs: dict[str, float], message: str) -> None:
    arguments: dict[str, object] = {
        "num_matched_blocks": 2,
        **BLOCK,
        "bandwidth_bytes_per_s": 100 * MB,
        "prefill": PREFILL,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        plan_fetch(**arguments)  # type: ignore[arg-type]
