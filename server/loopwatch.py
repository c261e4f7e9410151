"""Event-loop lag: a probe task that sleeps a fixed period and records how late it woke.

Anything that holds the loop (a long synchronous call in a handler, a big decode, a
garbage-collection pause) delays every request the daemon serves; the probe sees it as
a late wake-up. The probe costs one wake-up per period and nothing per request. Stats
reports the longest and the 99th-percentile lag of the wake-ups in the last window.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

PROBE_PERIOD_S = 0.1
WINDOW_S = 10.0


@dataclass(frozen=True, slots=True)
class LoopLag:
    """How late the probe woke over the window: the longest and the 99th percentile."""

    max_s: float
    p99_s: float


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
        # (woke at, seconds late), oldest first; at most window_s / period_s entries.
        self._wakes: deque[tuple[float, float]] = deque()
        self._task: asyncio.Task[None] | None = None

    def record(self, woke_at: float, lag_s: float) -> None:
        """Note one wake-up `lag_s` late at `woke_at` (clock time); forget what left the window."""
        self._wakes.append((woke_at, max(0.0, lag_s)))
        self._forget_before(woke_at - self._window_s)

    def lag(self) -> LoopLag:
        """The lag over the window ending now; zero before the first wake-up."""
        self._forget_before(self._clock() - self._window_s)
        if not self._wakes:
            return LoopLag(0.0, 0.0)
        lags = sorted(lag for _, lag in self._wakes)
        # Linear interpolation between ranks, as numpy's default and the bench reports do.
        # Not the nearest rank: a stall leaves fewer than 100 wake-ups in the window, and
        # the nearest rank of fewer than 100 is always the longest, so p99 would be the max.
        position = 0.99 * (len(lags) - 1)
        below = math.floor(position)
        above = min(below + 1, len(lags) - 1)
        p99_s = lags[below] + (lags[above] - lags[below]) * (position - below)
        return LoopLag(max_s=lags[-1], p99_s=p99_s)

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
        while True:
            due = self._clock() + self._period_s
            await asyncio.sleep(self._period_s)
            woke_at = self._clock()
            self.record(woke_at, woke_at - due)
