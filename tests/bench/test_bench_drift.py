"""The soak's drift verdict (kvstore.bench.drift) on synthetic Stats series."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kvstore.bench.drift import DriftBounds, HealthSample, judge_drift

MiB = 1 << 20
BOUNDS = DriftBounds(warm_up_s=10.0, max_rss_growth=0.05, window=3)


def series(
    rss_mib: Sequence[float],
    *,
    fds: Sequence[int] | None = None,
    connections: Sequence[int] | None = None,
    lag_ms: Sequence[float] | None = None,
    period_s: float = 2.0,
) -> list[HealthSample]:
    """One sample every ``period_s`` from t = 0; fds 40 and lag 1 ms unless given."""
    count = len(rss_mib)
    return [
        HealthSample(
            t_s=index * period_s,
            rss_bytes=int(rss_mib[index] * MiB),
            open_fds=fds[index] if fds else 40,
            data_plane_connections=connections[index] if connections else 8,
            loop_lag_max_us=int((lag_ms[index] if lag_ms else 1.0) * 1000),
            loop_lag_p99_us=1000,
        )
        for index in range(count)
    ]


def test_a_flat_series_with_no_errors_passes() -> None:
    verdict = judge_drift(series([300.0] * 20), {}, BOUNDS)
    assert verdict.passed, verdict.failures
    assert verdict.rss_growth == 0.0
    assert (verdict.fds_start, verdict.fds_end) == (32, 32)


def test_growth_during_warm_up_is_not_drift() -> None:
    # RSS doubles while the arena is first touched, then stays.
    rss = [100.0, 150.0, 200.0, 250.0, 300.0, 300.0] + [301.0] * 14
    assert judge_drift(series(rss), {}, BOUNDS).passed


def test_rss_grown_over_five_percent_after_warm_up_fails() -> None:
    # Ends at 322, 324, 326 MiB: the median of the last window is 324, +8.0 %.
    rss = [300.0] * 6 + [300.0 + 2 * i for i in range(14)]
    verdict = judge_drift(series(rss), {}, BOUNDS)
    assert not verdict.passed
    (failure,) = verdict.failures
    assert "RSS grew 8.0% after warm-up (300 -> 324 MiB)" in failure
    assert verdict.rss_growth == pytest.approx(24 / 300, rel=1e-3)


def test_rss_grown_under_the_bound_passes() -> None:
    rss = [300.0] * 6 + [300.0 + i for i in range(14)]  # ends at 313 MiB: +4.3 %
    assert judge_drift(series(rss), {}, BOUNDS).passed


def test_one_high_rss_sample_at_the_end_is_noise_not_drift() -> None:
    rss = [300.0] * 19 + [400.0]
    assert judge_drift(series(rss), {}, BOUNDS).passed


def test_open_fds_that_keep_rising_fail() -> None:
    fds = [40] * 6 + [40 + i for i in range(14)]
    verdict = judge_drift(series([300.0] * 20, fds=fds), {}, BOUNDS)
    assert verdict.failures == (
        "open fds besides data-plane connections grew after warm-up: 32 -> 43",
    )


def test_a_file_held_open_for_a_moment_is_no_leak() -> None:
    fds = [40] * 17 + [41, 40, 42]  # SSD writes in flight at two of the last samples
    assert judge_drift(series([300.0] * 20, fds=fds), {}, BOUNDS).passed


def test_more_data_plane_connections_are_no_leak() -> None:
    # A client pool that opens its fifth connection late: both counts rise together.
    fds = [40] * 10 + [41] * 10
    connections = [8] * 10 + [9] * 10
    assert judge_drift(series([300.0] * 20, fds=fds, connections=connections), {}, BOUNDS).passed


def test_any_error_fails_and_is_listed_by_code() -> None:
    errors = {"UNAVAILABLE": 1, "RESOURCE_EXHAUSTED": 3, "NOT_FOUND": 0}
    verdict = judge_drift(series([300.0] * 20), errors, BOUNDS)
    assert verdict.failures == ("4 errors: RESOURCE_EXHAUSTED 3, UNAVAILABLE 1",)


def test_stats_the_daemon_did_not_answer_fail() -> None:
    verdict = judge_drift(series([300.0] * 20), {}, BOUNDS, num_unanswered=2)
    assert verdict.failures == ("the daemon did not answer 2 Stats samples",)


def test_loop_lag_is_judged_after_warm_up_only_when_bounded() -> None:
    lag = [900.0] + [5.0] * 12 + [250.0] + [5.0] * 6  # a start-up stall, then one at 26 s
    samples = series([300.0] * 20, lag_ms=lag)
    assert judge_drift(samples, {}, BOUNDS).passed
    bounded = DriftBounds(warm_up_s=10.0, max_loop_lag_s=0.2)
    (failure,) = judge_drift(samples, {}, bounded).failures
    assert (
        failure == "event-loop lag over 200 ms in 1 samples after warm-up, the worst 250 ms at 26 s"
    )
    assert judge_drift(samples, {}, DriftBounds(warm_up_s=10.0, max_loop_lag_s=0.3)).passed


def test_a_run_too_short_to_judge_fails() -> None:
    verdict = judge_drift(series([300.0] * 7), {}, BOUNDS)  # 6 by warm-up's end, 1 after
    (failure,) = verdict.failures
    assert failure.startswith("too short to judge drift: 6 samples by the end of warm-up")
    assert verdict.rss_growth is None


def test_every_failure_is_reported_together() -> None:
    rss = [300.0] * 6 + [400.0] * 14
    fds = [40] * 6 + [50] * 14
    verdict = judge_drift(series(rss, fds=fds), {"INTERNAL": 1}, BOUNDS, num_unanswered=1)
    assert len(verdict.failures) == 4


@pytest.mark.parametrize(
    "fields",
    [
        {"warm_up_s": -1.0},
        {"warm_up_s": 1.0, "max_rss_growth": -0.1},
        {"warm_up_s": 1.0, "window": 0},
        {"warm_up_s": 1.0, "max_loop_lag_s": 0.0},
    ],
)
def test_bounds_are_validated(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must be|need"):
        DriftBounds(**fields)  # type: ignore[arg-type]
