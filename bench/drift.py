"""Drift in a soak: whether the daemon's health samples and the run's errors pass.

`judge_drift` is a pure function of the samples, so it is tested on synthetic series.
A soak fails on any of:

- RSS grown more than ``max_rss_growth`` from the end of warm-up to the end of the run;
- open file descriptors grown over the same span, not counting data-plane connections
  (clients' pools open those as their concurrency needs; the daemon counts them itself);
- any error, whatever its status code, or a Stats sample the daemon did not answer;
- (when a bound is given) an event-loop stall longer than ``max_loop_lag_s`` after warm-up.

Each end of the span is a window of ``window`` samples, not one reading, so that one
sample's noise does not decide: RSS compares the windows' medians, fds their minimums (a
leak raises the floor; a file held open for one SSD write does not).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HealthSample:
    """One Stats reading of the daemon, at ``t_s`` seconds since the load started."""

    t_s: float
    rss_bytes: int
    open_fds: int
    data_plane_connections: int
    loop_lag_max_us: int
    loop_lag_p99_us: int


@dataclass(frozen=True, kw_only=True)
class DriftBounds:
    warm_up_s: float
    max_rss_growth: float = 0.05  # fraction: 0.05 is 5 %
    max_loop_lag_s: float | None = None  # None: loop lag is reported, not judged
    window: int = 3  # samples at each end of the span

    def __post_init__(self) -> None:
        if self.warm_up_s < 0 or self.max_rss_growth < 0 or self.window < 1:
            raise ValueError("need warm_up_s >= 0, max_rss_growth >= 0 and window >= 1")
        if self.max_loop_lag_s is not None and self.max_loop_lag_s <= 0:
            raise ValueError(f"max_loop_lag_s must be > 0, got {self.max_loop_lag_s}")


@dataclass(frozen=True)
class Verdict:
    """What the soak concludes: ``failures`` says why it failed (empty: it passed)."""

    failures: tuple[str, ...]
    rss_start_bytes: int | None  # median RSS at the end of warm-up
    rss_end_bytes: int | None
    fds_start: int | None  # floor of open fds, less data-plane connections, by warm-up's end
    fds_end: int | None

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def rss_growth(self) -> float | None:
        if not self.rss_start_bytes or self.rss_end_bytes is None:
            return None
        return self.rss_end_bytes / self.rss_start_bytes - 1


def judge_drift(
    samples: Sequence[HealthSample],
    errors_by_code: Mapping[str, int],
    bounds: DriftBounds,
    *,
    num_unanswered: int = 0,
) -> Verdict:
    """Judge a soak from its Stats ``samples`` (in time order) and its errors by status code.

    The span starts at the last ``window`` samples taken by the end of warm-up and ends
    at the last ``window`` samples; a run too short for both windows, with at least one
    sample between them, fails as too short to judge.
    """
    failures: list[str] = []
    errors = {code: count for code, count in sorted(errors_by_code.items()) if count}
    if errors:
        listed = ", ".join(f"{code} {count}" for code, count in errors.items())
        failures.append(f"{sum(errors.values())} errors: {listed}")
    if num_unanswered:
        failures.append(f"the daemon did not answer {num_unanswered} Stats samples")

    warm = [s for s in samples if s.t_s <= bounds.warm_up_s]
    after = [s for s in samples if s.t_s > bounds.warm_up_s]
    if len(warm) < bounds.window or len(after) < bounds.window + 1:
        failures.append(
            f"too short to judge drift: {len(warm)} samples by the end of warm-up "
            f"({bounds.warm_up_s:g} s) and {len(after)} after it; need {bounds.window} "
            f"and {bounds.window + 1}"
        )
        return Verdict(tuple(failures), None, None, None, None)

    start, end = warm[-bounds.window :], after[-bounds.window :]
    rss_start = int(statistics.median(s.rss_bytes for s in start))
    rss_end = int(statistics.median(s.rss_bytes for s in end))
    if rss_end > rss_start * (1 + bounds.max_rss_growth):
        growth = rss_end / rss_start - 1 if rss_start else float("inf")
        failures.append(
            f"RSS grew {growth:.1%} after warm-up ({rss_start >> 20} -> {rss_end >> 20} MiB), "
            f"over the {bounds.max_rss_growth:.0%} allowed"
        )
    fds_start = min(s.open_fds - s.data_plane_connections for s in start)
    fds_end = min(s.open_fds - s.data_plane_connections for s in end)
    if fds_end > fds_start:
        failures.append(
            f"open fds besides data-plane connections grew after warm-up: {fds_start} -> {fds_end}"
        )
    if bounds.max_loop_lag_s is not None:
        bound_us = bounds.max_loop_lag_s * 1e6
        stalls = [s for s in after if s.loop_lag_max_us > bound_us]
        if stalls:
            worst = max(stalls, key=lambda s: s.loop_lag_max_us)
            failures.append(
                f"event-loop lag over {bounds.max_loop_lag_s * 1e3:g} ms in {len(stalls)} "
                f"samples after warm-up, the worst {worst.loop_lag_max_us / 1e3:.0f} ms "
                f"at {worst.t_s:.0f} s"
            )
    return Verdict(tuple(failures), rss_start, rss_end, fds_start, fds_end)
