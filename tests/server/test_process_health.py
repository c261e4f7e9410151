"""The daemon's process health in Stats: RSS, open fds and event-loop lag.

The lag arithmetic (window, percentile) is tested on a LoopWatch fed by a fake clock;
the real probe is tested on a real server whose event loop is held by CPU work, and
its wait for a core on a loop whose thread shares one CPU with a spinning process.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from kvstore.client import KVClient, Namespace, StoreStats
from kvstore.server import RunningServer
from kvstore.server.loopwatch import LoopLag, LoopWatch, ThreadRunqueue
from kvstore.server.procstat import open_fds, rss_bytes

ConnectPeer = Callable[[RunningServer], Awaitable[Any]]  # tests/server/conftest.py
Poll = Callable[..., Awaitable[None]]
has_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
has_schedstat = pytest.mark.skipif(
    ThreadRunqueue().read() is None, reason="needs /proc/thread-self/schedstat"
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the lag arithmetic ------------------------------------------------------------------------


def test_no_wake_up_yet_is_no_lag() -> None:
    assert LoopWatch(clock=FakeClock()).lag() == LoopLag(0.0, 0.0)


def test_max_and_p99_over_the_wake_ups_in_the_window() -> None:
    clock = FakeClock()
    watch = LoopWatch(period_s=0.1, window_s=10.0, clock=clock)
    # 100 wake-ups 0..99 ms late, one every 0.1 s: the window is full.
    for late_ms in range(100):
        clock.now += 0.1
        watch.record(clock.now, late_ms / 1000)
    lag = watch.lag()
    assert lag.max_s == pytest.approx(0.099)
    assert lag.p99_s == pytest.approx(0.09801)  # 98.01 % of the way from the least to the most


def test_a_stall_leaves_the_window_after_window_s() -> None:
    clock = FakeClock()
    watch = LoopWatch(period_s=0.1, window_s=10.0, clock=clock)
    watch.record(clock.now, 2.5)  # one long stall
    for _ in range(50):
        clock.now += 0.1
        watch.record(clock.now, 0.001)
    assert watch.lag().max_s == pytest.approx(2.5)
    clock.now += 5.1  # the stall is now 10.1 s old; the small lags are not all gone
    lag = watch.lag()
    assert lag.max_s == pytest.approx(0.001)
    assert lag.p99_s == pytest.approx(0.001)
    clock.now += 20  # nothing recorded for longer than the window
    assert watch.lag() == LoopLag(0.0, 0.0)


def test_one_stall_among_fewer_than_100_wake_ups_is_not_the_p99() -> None:
    clock = FakeClock()
    watch = LoopWatch(period_s=0.1, window_s=10.0, clock=clock)
    for _ in range(90):
        clock.now += 0.1
        watch.record(clock.now, 0.002)
    watch.record(clock.now + 0.5, 0.5)
    clock.now += 0.5
    lag = watch.lag()
    assert lag.max_s == pytest.approx(0.5)
    # 91 wake-ups: rank 0.99 * 90 = 89.1 lies 0.1 of the way from 2 ms to the stall.
    assert lag.p99_s == pytest.approx(0.002 + 0.1 * 0.498)


def test_early_wake_ups_count_as_no_lag() -> None:
    clock = FakeClock()
    watch = LoopWatch(clock=clock)
    watch.record(clock.now, -0.002)
    assert watch.lag() == LoopLag(0.0, 0.0)


@pytest.mark.parametrize(("period_s", "window_s"), [(0.0, 10.0), (-1.0, 10.0), (2.0, 1.0)])
def test_a_period_must_fit_the_window(period_s: float, window_s: float) -> None:
    with pytest.raises(ValueError, match="period_s"):
        LoopWatch(period_s=period_s, window_s=window_s)


def test_the_wait_for_a_core_is_that_of_the_longest_lag_and_at_most_all_of_it() -> None:
    clock = FakeClock()
    watch = LoopWatch(period_s=0.1, window_s=10.0, clock=clock)
    watch.record(clock.now, 0.002, 0.002)
    clock.now += 0.1
    watch.record(clock.now, 0.050, 0.010)  # the longest: 10 ms of its 50 ms waiting
    clock.now += 0.1
    watch.record(clock.now, 0.003, 0.003)
    assert watch.lag().max_s == pytest.approx(0.050)
    assert watch.lag().max_runqueue_s == pytest.approx(0.010)
    clock.now += 0.1
    # Waits read over more than the lag (just before it was due) are cut to the lag.
    watch.record(clock.now, 0.080, 0.200)
    assert watch.lag().max_runqueue_s == pytest.approx(0.080)
    clock.now += 0.1
    watch.record(clock.now, -0.001, 0.004)  # early: no lag, no wait counted
    assert min(runqueue for _, _, runqueue in watch._wakes) == 0.0


@has_schedstat
async def test_a_loop_that_holds_its_thread_is_not_counted_as_waiting_for_a_core() -> None:
    """A blocking call on the loop (its thread asleep, not ready to run) is the loop's
    own stall: the probe's lag holds next to no wait for a core."""
    watch = LoopWatch(period_s=0.01, window_s=10.0)
    watch.start()
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # noqa: ASYNC251 - the point: the loop is held, its thread sleeps
        await asyncio.sleep(0.05)
    finally:
        await watch.stop()
    lag = watch.lag()
    assert lag.max_s >= 0.3 - 0.01
    assert lag.max_runqueue_s < lag.max_s / 2, lag


@has_schedstat
async def test_a_loop_thread_sharing_its_core_shows_its_wait_for_one() -> None:
    """Pinned to one CPU with a process that spins there, the loop's thread runs about
    half the time it is ready to: of a lag while it computes, much is the wait."""
    cpu = min(os.sched_getaffinity(0))
    spinner = await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass")
    before = os.sched_getaffinity(0)  # this thread's own (Linux: per thread)
    watch = LoopWatch(period_s=0.01, window_s=10.0)
    try:
        os.sched_setaffinity(spinner.pid, {cpu})
        os.sched_setaffinity(0, {cpu})
        watch.start()
        await asyncio.sleep(0.05)
        _spin_cpu(0.4)  # 0.4 s of the wall clock, of which the spinner takes its share
        await asyncio.sleep(0.05)
    finally:
        await watch.stop()
        os.sched_setaffinity(0, before)
        spinner.kill()
        await spinner.wait()
    lag = watch.lag()
    assert lag.max_s >= 0.4 - 0.01
    # An even split would be half; a quarter leaves room for the kernel's choices.
    assert lag.max_runqueue_s >= lag.max_s / 4, lag
    assert lag.max_runqueue_s <= lag.max_s


async def test_the_probe_records_how_late_it_woke() -> None:
    watch = LoopWatch(period_s=0.01, window_s=10.0)
    watch.start()
    try:
        await asyncio.sleep(0.05)
        # Hold this loop, as a long synchronous handler would: the probe wakes late.
        _spin_cpu(0.3)
        await asyncio.sleep(0.05)
    finally:
        await watch.stop()
    # The probe was due at most one period into the spin, and woke after it.
    assert watch.lag().max_s >= 0.3 - 0.01


# -- through Stats -----------------------------------------------------------------------------


@pytest.fixture
async def client(target: str, make_namespace: Callable[[], Namespace]) -> AsyncIterator[KVClient]:
    """Stats go over gRPC whatever the transport: one client, not one per transport."""
    async with KVClient(target, make_namespace()) as stats_client:
        yield stats_client


@has_proc
def test_rss_and_fds_of_this_process_are_read_from_proc() -> None:
    assert rss_bytes() > 10 << 20  # Python with torch imported
    before = open_fds()
    read_end, write_end = os.pipe()
    try:
        assert open_fds() == before + 2
    finally:
        os.close(read_end)
        os.close(write_end)
    assert open_fds() == before


@has_proc
async def test_stats_reports_rss_and_fds_and_fds_rise_with_data_plane_connections(
    server: RunningServer, client: KVClient, connect_peer: ConnectPeer, poll: Poll
) -> None:
    before = await client.stats()
    assert before.rss_bytes > 10 << 20
    assert before.open_fds > 0
    peers = [await connect_peer(server) for _ in range(3)]

    async def accepted() -> bool:
        return (await client.stats()).data_plane_connections >= before.data_plane_connections + 3

    await poll(accepted)
    during = await client.stats()
    # The server runs in this process, so each connection is two fds here: both its ends.
    assert during.open_fds >= before.open_fds + 6
    for peer in peers:
        peer.close()

    async def released() -> bool:
        return (await client.stats()).open_fds <= during.open_fds - 6

    await poll(released)


async def test_stats_shows_a_stall_of_the_servers_event_loop(
    client: KVClient,
) -> None:
    """The server shares this test's event loop: CPU work here holds the loop it serves
    from, exactly as a handler that computes for that long would."""
    await client.stats()
    await asyncio.sleep(0.25)  # a few probe wake-ups, so the stall is not the first
    stall_s = 0.6
    _spin_cpu(stall_s)
    stats: StoreStats = await client.stats()
    # The probe sleeps 100 ms: it was due at most that far into the stall.
    assert stats.loop_lag_max_us >= (stall_s - 0.1) * 1e6
    assert stats.loop_lag_p99_us <= stats.loop_lag_max_us
    assert 0 <= stats.loop_lag_max_runqueue_us <= stats.loop_lag_max_us


def _spin_cpu(seconds: float) -> None:
    end = time.monotonic() + seconds
    total = 0
    while time.monotonic() < end:
        total += sum(range(1000))
