"""Pacing: how long a put or get may wait on its client, and how long it may run.

Both transports (kvstore.server.servicer for gRPC, kvstore.server.dataplane for the TCP
data plane) run each transfer inside one `TransferPacing`, and tell it, as the
transfer goes, whose turn it is:

- `waiting()`: the client's. A put waits for its next message, a get for the client
  to take the message being sent. Past `limits.stream_idle_timeout_s` the transfer
  is cut, whatever deadline the client asked for.
- `receiving()`: a data-plane frame has begun to arrive. It must arrive whole within
  `limits.frame_timeout_s`, so a sender that trickles bytes is cut off. (gRPC hands
  the server whole messages only, so there a trickled message is a wait.)
- `working()`: the server's own (decoding, checksums, room in DRAM, SSD reads). That
  is no client's doing, so only the deadline applies.

The whole transfer must end within the client's deadline, capped at
`limits.max_transfer_s`. A cut cancels the transfer's task, so the transfer's own
cleanup frees what it held (kvstore.server.transfer), and `StreamCut` comes out of
the `async with`; kvstore.server.status answers it DEADLINE_EXCEEDED.

Timers are lazy: a phase change only reads the clock, and the one timer is moved
only when a phase must end sooner than it would fire, so a stream of megabyte
messages costs a clock read per message, not a timer.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TypeVar

from kvstore.server.config import Limits

T = TypeVar("T")


class StreamCut(Exception):
    """The server cut a put or get: it waited on its client too long, a frame trickled,
    or it ran past its deadline. Answered DEADLINE_EXCEEDED."""


class TransferPacing:
    """One transfer's deadline and phases; use as `async with` around the transfer.

    `requested_s` is the deadline the client asked for (None: none, as a gRPC call
    without one); the transfer gets at most `limits.max_transfer_s`. `what` names the
    transfer in the messages ("put", "get").
    """

    def __init__(self, limits: Limits, what: str, requested_s: float | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle_s = limits.stream_idle_timeout_s
        self._frame_s = limits.frame_timeout_s
        self._max_s = limits.max_transfer_s
        self.what = what
        self._requested_s = requested_s
        self._deadline = asyncio.timeout(self.transfer_s)
        # The current phase's limit and start (loop time); None while working.
        self._phase_s: float | None = None
        self._phase_since = 0.0
        self._phase_setting = ""
        # Time the current frame has spent arriving (receiving phases only: the server's
        # own work between two reads of one frame is not the client's).
        self._frame_used_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._cut_message: str | None = None

    @property
    def transfer_s(self) -> float:
        """The transfer's deadline in seconds from its start: the client's, capped."""
        if self._requested_s is None:
            return self._max_s
        return min(self._requested_s, self._max_s)

    def set_deadline(self, requested_s: float) -> None:
        """The client's deadline, once known (a data-plane DEADLINE frame), from now."""
        self._requested_s = requested_s
        self._deadline.reschedule(self._loop.time() + self.transfer_s)

    async def __aenter__(self) -> TransferPacing:
        await self._deadline.__aenter__()
        return self

    async def __aexit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._phase_s = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            await self._deadline.__aexit__(error_type, error, traceback)
        except TimeoutError:
            raise StreamCut(self._cut_message or self._deadline_message()) from None

    # -- phases ---------------------------------------------------------------------

    def waiting(self) -> None:
        """The transfer now waits on its client."""
        self._end_receiving()
        self._enter(self._idle_s, "stream_idle_timeout_s")

    def receiving(self) -> None:
        """A data-plane frame has begun to arrive."""
        self._end_receiving()
        self._frame_used_s = 0.0
        self._enter(self._frame_s, "frame_timeout_s")

    def receiving_rest(self) -> None:
        """More of the frame that began to arrive at the last `receiving` (a PUT_TAIL's
        tail, read in steps after its message was checked): the frame's time so far
        counts, and the server's work in between does not."""
        self._end_receiving()
        self._enter(self._frame_s, "frame_timeout_s", since=self._loop.time() - self._frame_used_s)

    def working(self) -> None:
        """The server works on the transfer; only the deadline applies."""
        self._end_receiving()
        self._phase_s = None

    def _end_receiving(self) -> None:
        if self._phase_s is not None and self._phase_setting == "frame_timeout_s":
            self._frame_used_s = self._loop.time() - self._phase_since

    async def received(self, messages: AsyncIterator[T]) -> AsyncIterator[T]:
        """`messages` (a put's, over gRPC), the waits for each one paced; the server's
        time with a message, between two waits, does not count."""
        self.waiting()
        async for message in messages:
            self.working()
            yield message
            self.waiting()
        self.working()

    def _enter(self, limit_s: float, setting: str, since: float | None = None) -> None:
        start = self._loop.time() if since is None else since
        self._phase_s, self._phase_since, self._phase_setting = limit_s, start, setting
        ends = start + limit_s
        if ends < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._arm(ends)

    def _arm(self, when: float) -> None:
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        """The timer: cut the transfer if its phase has run out, else wait for the end."""
        self._timer, self._timer_at = None, math.inf
        limit_s = self._phase_s
        if limit_s is None:
            return  # working: the next wait or frame arms the timer again
        ends = self._phase_since + limit_s
        now = self._loop.time()
        if now < ends:
            self._arm(ends)
            return
        self._cut_message = self._phase_message(limit_s)
        self._deadline.reschedule(now)  # cancels the transfer's task at once

    def _phase_message(self, limit_s: float) -> str:
        if self._phase_setting == "frame_timeout_s":
            return (
                f"a data-plane frame of the {self.what} did not arrive whole within "
                f"{limit_s:g} s of its first byte (the server's limits.frame_timeout_s); "
                "send each frame in one go"
            )
        return (
            f"the {self.what} waited on its client for {limit_s:g} s with no progress "
            f"(the server's limits.stream_idle_timeout_s), and the server cut it"
        )

    def _deadline_message(self) -> str:
        seconds = self.transfer_s
        if self._requested_s is not None and self._requested_s <= self._max_s:
            return f"the {self.what} did not finish within its deadline of {seconds:g} s"
        return (
            f"the {self.what} did not finish within {seconds:g} s, the server's limit on "
            f"one transfer (limits.max_transfer_s)"
        )
