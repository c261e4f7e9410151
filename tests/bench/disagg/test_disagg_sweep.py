"""`kvstore-bench disagg sweep`: a real daemon process per throttled rate, the tiny model."""

from __future__ import annotations

import json
import math

import pytest

from kvstore.bench.disagg.cli import main
from kvstore.bench.disagg.sweep import SweepPoint, measured_crossover
from kvstore.client._vllm_scheduler import REMEASURE_BYTES
from kvstore.server.throttle import BURST_S


def point(rate: float, fetch_s: float, no_store_s: float) -> SweepPoint:
    return SweepPoint(
        rate_bytes_per_s=rate,
        measured_bytes_per_s=rate,
        fetch_ttft_s=fetch_s,
        no_store_ttft_s=no_store_s,
        planned_ttft_s=min(fetch_s, no_store_s),
        planned_over_no_store=min(fetch_s, no_store_s) / no_store_s,
        planned_match_s=0.001,
        num_load_blocks=0,
        decision="recompute",
        plan_tokens_per_s=1000.0,
    )


def test_crossover_interpolates_in_log_rate_where_fetch_starts_winning() -> None:
    points = [point(4e6, 0.05, 0.10), point(1e6, 0.30, 0.10), point(2e6, 0.15, 0.10)]
    crossover, note = measured_crossover(points)
    # Fetch loses by 50 ms at 2 MB/s and wins by 50 ms at 4 MB/s: halfway in log(rate).
    assert crossover == pytest.approx(math.sqrt(2e6 * 4e6))
    assert note == "between 2.0 MB/s and 4.0 MB/s"


def test_no_crossover_inside_the_rates_says_on_which_side_it_is() -> None:
    assert measured_crossover([point(1e6, 0.1, 0.2), point(2e6, 0.1, 0.2)]) == (
        None,
        "fetch won at every rate: the crossover is below the lowest rate",
    )
    assert measured_crossover([point(1e6, 0.3, 0.2)])[0] is None


@pytest.mark.slow
def test_the_sweep_reports_every_rate_and_a_finite_positive_break_even(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 9 blocks of 8 KiB: one load is past the meter's 64 KiB floor, so it is one sample.
    argv = ["sweep", "--model", "tiny", "--prompt-tokens", "160", "--repeats", "1"]
    argv += ["--factors", "0.5,4", "--threads", "1", "--device", "cpu", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "tiny"
    assert report["num_matched_blocks"] == (160 - 1) // report["block_tokens"]
    predicted = report["predicted_break_even_bytes_per_s"]
    assert math.isfinite(predicted)
    assert predicted > 0
    # Equal to the cost model's formula over the measured prefill rate.
    expected = report["block_bytes"] * report["prefill_tokens_per_s"] / report["block_tokens"]
    assert predicted == pytest.approx(expected)
    in_sweep = report["in_sweep_break_even_bytes_per_s"]
    assert math.isfinite(in_sweep)
    assert in_sweep > 0
    rates = [p["rate_bytes_per_s"] for p in report["points"]]
    assert rates == pytest.approx([0.5 * predicted, 4 * predicted])
    for entry in report["points"]:
        assert entry["fetch_ttft_s"] > 0
        assert entry["no_store_ttft_s"] > 0
        assert entry["planned_ttft_s"] > 0
        assert entry["planned_over_no_store"] > 0
        assert 0 < entry["planned_match_s"] < entry["planned_ttft_s"]
        # The connector's meter saw each daemon's throttled loads, and never beat the throttle
        # by more than the bucket's burst allows: a load of L bytes from a bucket of B
        # takes at least (L - B) / rate. A load within the burst has no such bound (at 4x
        # the break-even rate, 5 ms of burst outweigh these 72 KiB), so only the loads
        # larger than it are held to one, with room for timing.
        rate = entry["rate_bytes_per_s"]
        assert entry["measured_bytes_per_s"] is not None
        smallest_load = min(REMEASURE_BYTES, report["num_matched_blocks"] * report["block_bytes"])
        burst = rate * BURST_S
        if smallest_load > 2 * burst:
            bound = rate * smallest_load / (smallest_load - burst)
            assert entry["measured_bytes_per_s"] < 1.5 * bound
        assert entry["decision"].startswith(("fetch", "recompute"))
        assert (entry["num_load_blocks"] > 0) == entry["decision"].startswith("fetch")
    assert report["crossover_note"]


def test_the_sweep_refuses_a_target_it_cannot_throttle(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--target", "127.0.0.1:1", "--model", "tiny"]) == 2
    assert "spawns its own daemons" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--rates", "fast"), ("--rates", "0"), ("--factors", "-1"), ("--factors", "x")],
)
def test_bad_sweep_options_are_rejected(flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["sweep", flag, value])
    assert caught.value.code == 2
