"""Byte work (a put's checksums and its copy into the arena, a same-host get's copy into
the client's buffer) on a thread of its own, beside the event loop.

Under load on a small machine the loop's thread waits for a core more than it runs: a
lookup then waits, however short the loop's steps, while the thread that would answer
it is not scheduled. The less CPU that thread burns, the more readily the kernel gives
it a core when a request wakes it; so the bulk bytes, most of its CPU, go to this
worker, and the loop runs only requests and bookkeeping. The copies and the checksums
of large buffers let go of the GIL, so the worker and the loop run at once.

Work below `min_bytes` runs inline: handing it over would cost more than it does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# The least work, in bytes, that goes to the worker (about 10-20 us of copying).
OFFLOAD_MIN_BYTES = 256 << 10
THREAD_NAME = "kvstore-bytes"


class ByteWorker:
    """One thread for the daemon's byte work, shared by every transfer; `close` it."""

    def __init__(self, min_bytes: int = OFFLOAD_MIN_BYTES) -> None:
        if min_bytes < 0:
            raise ValueError(f"min_bytes must be 0 or more, got {min_bytes}")
        self.min_bytes = min_bytes
        # One thread: on a small machine a second would compete with the loop for cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
        self.num_offloaded = 0  # works that ran on the thread, for tests

    async def run(self, work: Callable[[], T], nbytes: int) -> T:
        """`work()`, on the worker if it moves at least `min_bytes`, inline otherwise.

        A cancelled caller still waits for its work to end before the cancellation goes
        on: the work reads and writes memory (reserved pages, pinned views, a client's
        buffer) that the caller frees as it unwinds.
        """
        if nbytes < self.min_bytes:
            return work()
        self.num_offloaded += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, work)
        cancelled = False
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                if future.cancelled():  # the executor shut down before it started
                    raise
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
        return future.result()

    def close(self) -> None:
        """Wait for the work already handed over; no more may be."""
        self._executor.shutdown(wait=True)
