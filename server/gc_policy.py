"""The daemon's garbage collection: full collections kept off the request path.

CPython's full (generation-2) collection walks every container object the process
holds, on the thread that allocated, which here is the event loop. A daemon's index is
several such objects a block, so while 200,000 blocks were stored the walks held the
loop for up to 0.2-0.3 s (`kvstore-bench lookup --under-load 1 --resident-blocks
200000`, against a daemon run with `--gc-freeze-interval-s 0`). CPython
starts one whenever the objects promoted since the last reach a quarter of the old
ones: each time the index grows by a quarter, and each time eviction has turned a
quarter of it over.

`GcPolicy` turns CPython's automatic full collections off and, every
`freeze_interval_s`, moves what survives a young collection into the permanent
generation (`gc.freeze`): the young collections go on as before and walk only the
objects made since, whatever the index holds. Reference counting still frees a frozen
object that dies outside a reference cycle (an evicted block: the index unlinks parents
and children). A cycle that dies after it was frozen waits for the full collection this
policy runs every `full_interval_s` (unfreeze, collect, freeze again), whose pause and
finds are logged; 0 runs none.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time

logger = logging.getLogger("kvstore.server.gc")
# A generation-2 threshold no count of generation-1 collections reaches.
_NEVER = 2**31 - 1


class _Collector:
    """The process's collector settings while policies run: the first to start saves
    CPython's thresholds, the last to stop gives them back and thaws (several daemons
    may share a process, as in tests)."""

    running = 0
    saved_thresholds: tuple[int, int, int] = gc.get_threshold()

    @classmethod
    def take(cls) -> None:
        if not cls.running:
            cls.saved_thresholds = gc.get_threshold()
            young, middle = cls.saved_thresholds[:2]
            gc.set_threshold(young, middle, _NEVER)
        cls.running += 1

    @classmethod
    def give_back(cls) -> None:
        cls.running -= 1
        if not cls.running:
            gc.set_threshold(*cls.saved_thresholds)
            gc.unfreeze()


class GcPolicy:
    """No automatic full collections; survivors frozen every `freeze_interval_s`; a
    full collection every `full_interval_s` (0: never). The collector is the process's:
    CPython's settings come back when the last policy in the process stops."""

    def __init__(self, freeze_interval_s: float, full_interval_s: float) -> None:
        if freeze_interval_s <= 0:
            raise ValueError("freeze_interval_s must be above 0 (turn the policy off instead)")
        self.freeze_interval_s = freeze_interval_s
        self.full_interval_s = full_interval_s
        self.num_freezes = 0
        self.num_full_collections = 0
        self.last_full_collection_s = 0.0  # the pause of the last full collection
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Stop the automatic full collections, freeze what start-up made (modules, the
        recovered index), and keep freezing."""
        _Collector.take()
        self.freeze()
        self._task = asyncio.create_task(self._run(), name="kvstore-gc")

    async def stop(self) -> None:
        """Stop freezing, and hand the frozen objects back to the collector."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            _Collector.give_back()

    def freeze(self) -> None:
        """Collect the young generations, then move every survivor out of the collector's
        walks: young garbage cycles are gone first, so few are frozen."""
        gc.collect(1)
        gc.freeze()
        self.num_freezes += 1

    def collect_all(self) -> int:
        """A full collection of everything, frozen objects included; returns how many
        objects it found unreachable. Holds the loop for as long as it walks."""
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self.num_full_collections += 1
        self.last_full_collection_s = time.perf_counter() - started
        logger.info(
            "full garbage collection: %d unreachable objects in %.0f ms",
            found,
            self.last_full_collection_s * 1000,
        )
        return found

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_full = loop.time()
        while True:
            await asyncio.sleep(self.freeze_interval_s)
            if self.full_interval_s > 0 and loop.time() - last_full >= self.full_interval_s:
                self.collect_all()
                last_full = loop.time()
            else:
                self.freeze()
