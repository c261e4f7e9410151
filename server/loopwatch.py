"""Event-loop lag: a probe task that sleeps a fixed period and records how late it woke.

Anything that holds the loop (a long synchronous call in a handler, a big decode, a
garbage-collection pause) delays every request the daemon serves; the probe sees it as
a late wake-up. The probe costs two wake-ups per period and nothing per request. Stats
reports the longest and the 99th-percentile lag of the wake-ups in the last window.

A wake-up is late for one of two reasons: the loop was busy (a callback held it), or
its thread was ready to run but waited for a core (on a machine whose cores are all
busy, the kernel runs other threads first). Where Linux says how long a thread has
waited for a core (/proc/thread-self/schedstat), the probe reads it from shortly before
each wake-up is due until it wakes: Stats then also says how much of the longest lag
that wait could explain (at most the lag; waits just before the due time count too), so
a stall of the loop is told apart from a machine short of cores without a profiler.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

PROBE_PERIOD_S = 0.1
WINDOW_S = 10.0
# The last share of each period over which the probe counts its thread's wait for a core.
_RUNQUEUE_SPAN = 0.1


@dataclass(frozen=True, slots=True)
class LoopLag:
    """How late the probe woke over the window: the longest and the 99th percentile;
    and of the longest, the time the loop's thread waited for a core (0 where unknown)."""

    max_s: float
    p99_s: float
    max_runqueue_s: float = 0.0


class ThreadRunqueue:
    """The calling thread's total time spent waiting for a core, as the kernel counts it
    (/proc/thread-self/schedstat); `read` is None where it does not (not Linux, or no
    schedstat). Open it on the thread to watch; `close` it."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def read(self) -> float | None:
        """Seconds waited for a core since the thread started, or None."""
        if self._fd is None:
            return None
        # "cpu_time_ns runqueue_wait_ns timeslices"; pread re-reads the live values.
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LoopWatch:
    """Keeps the probe's lags of the last `window_s`; `start` runs the probe on the loop.

    `clock` is injectable so the window and percentile arithmetic can be tested without
    sleeping; the probe itself must use the loop's own notion of time passing, so it reads
    the same clock around a real `asyncio.sleep`.
    """

    def __init__(
        self,
        *,
        period_s: float = PROBE_PERIOD_S,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < period_s <= window_s:
            raise ValueError(f"need 0 < period_s <= window_s, got {period_s}, {window_s}")
        self._period_s = period_s
        self._window_s = window_s
        self._clock = clock
        # (woke at, seconds late, of which waiting for a core), oldest first; at most
        # window_s / period_s entries.
        self._wakes: deque[tuple[float, float, float]] = deque()
        self._task: asyncio.Task[None] | None = None

    def record(self, woke_at: float, lag_s: float, runqueue_s: float = 0.0) -> None:
        """Note one wake-up `lag_s` late at `woke_at` (clock time), of which the loop's
        thread waited `runqueue_s` for a core; forget what left the window."""
        lag_s = max(0.0, lag_s)
        # The wait is read over the whole sleep, so it may exceed the lag: at most all of it.
        self._wakes.append((woke_at, lag_s, min(max(0.0, runqueue_s), lag_s)))
        self._forget_before(woke_at - self._window_s)

    def lag(self) -> LoopLag:
        """The lag over the window ending now; zero before the first wake-up."""
        self._forget_before(self._clock() - self._window_s)
        if not self._wakes:
            return LoopLag(0.0, 0.0)
        lags = sorted(lag for _, lag, _ in self._wakes)
        _, _, max_runqueue_s = max(self._wakes, key=lambda wake: wake[1])
        # Linear interpolation between ranks, as numpy's default and the bench reports do.
        # Not the nearest rank: a stall leaves fewer than 100 wake-ups in the window, and
        # the nearest rank of fewer than 100 is always the longest, so p99 would be the max.
        position = 0.99 * (len(lags) - 1)
        below = math.floor(position)
        above = min(below + 1, len(lags) - 1)
        p99_s = lags[below] + (lags[above] - lags[below]) * (position - below)
        return LoopLag(max_s=lags[-1], p99_s=p99_s, max_runqueue_s=max_runqueue_s)

    def start(self) -> None:
        """Run the probe on the running loop until `stop`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._probe(), name="kvstore-loopwatch"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _forget_before(self, cutoff: float) -> None:
        while self._wakes and self._wakes[0][0] < cutoff:
            self._wakes.popleft()

    async def _probe(self) -> None:
        # Opened here, on the loop's thread: the file names the thread that opens it.
        runqueue = ThreadRunqueue()
        try:
            while True:
                due = self._clock() + self._period_s
                at_start = runqueue.read()
                # The wait is read from shortly before the wake-up is due, so that waits
                # earlier in the period, which delayed nothing, are left out; unless
                # that first wake-up was itself late, and the stall began before it.
                await asyncio.sleep(self._period_s * (1 - _RUNQUEUE_SPAN))
                before = runqueue.read() if self._clock() < due else at_start
                await asyncio.sleep(max(0.0, due - self._clock()))
                woke_at = self._clock()
                after = runqueue.read()
                waited = 0.0 if before is None or after is None else after - before
                self.record(woke_at, woke_at - due, waited)
        finally:
            runqueue.close()
