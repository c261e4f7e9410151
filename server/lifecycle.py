"""Serving, then draining for shutdown: the one lifecycle both transports share.

Once `start_draining` is called, gRPC and the data plane refuse new work with the same
UNAVAILABLE answer (`Draining`, mapped in kvstore.server.status), and lookup streams
that wait for their next request end at once. Work in flight is left to finish.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

DRAINING_MESSAGE = "server is draining for shutdown; retry elsewhere"


class Draining(Exception):
    """New work refused because the server is draining; answered UNAVAILABLE."""

    def __init__(self) -> None:
        super().__init__(DRAINING_MESSAGE)


class Lifecycle:
    def __init__(self) -> None:
        self._draining = False
        # Tasks waiting, between requests, inside `idle_wait`: a drain cancels them.
        self._idle_tasks: set[asyncio.Task[object]] = set()

    @property
    def draining(self) -> bool:
        return self._draining

    def start_draining(self) -> None:
        """Refuse new work from now on, and end the tasks that wait idle."""
        self._draining = True
        for task in list(self._idle_tasks):
            task.cancel()

    def refuse_if_draining(self) -> None:
        if self._draining:
            raise Draining()

    def idle_wait(self) -> IdleWait:
        """A `with` block for awaiting the next request: a drain meanwhile cancels the
        wait, and the block raises `Draining` instead of the cancellation."""
        task = asyncio.current_task()
        assert task is not None, "idle_wait runs inside a task"
        return IdleWait(self, task)


class IdleWait:
    """See `Lifecycle.idle_wait`. A class, not a generator: it runs once per request."""

    __slots__ = ("_lifecycle", "_task")

    def __init__(self, lifecycle: Lifecycle, task: asyncio.Task[object]) -> None:
        self._lifecycle = lifecycle
        self._task = task

    def __enter__(self) -> None:
        self._lifecycle._idle_tasks.add(self._task)

    def __exit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._lifecycle._idle_tasks.discard(self._task)
        # A cancellation while not draining is the caller going away: let it through.
        if error_type is asyncio.CancelledError and self._lifecycle.draining:
            raise Draining() from None
