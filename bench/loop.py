"""One worker's event loop: starts units closed-loop, open-loop or on their own schedule.

`worker_main` is the entry point of each worker process (or of the one worker thread with
``processes=0``); `kvstore.bench.load` starts it and reads what it mails back:
``("ready", index, None)`` once connected, ``("progress", index, ProgressSnapshot)`` a few times
a second, then ``("done", index, WorkerResult)`` or ``("failed", index, traceback_text)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import queue
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from kvstore.allocator import tune_allocator
from kvstore.bench.workload import Payload, Recorder, UnitContext, WorkerResult, Workload
from kvstore.client import ClientOptions, KVClient, KVStoreClientError

if TYPE_CHECKING:
    from kvstore.bench.load import LoadConfig

READY_TIMEOUT_S = 120.0  # spawning a worker imports torch: seconds on a small machine
PROGRESS_PERIOD_S = 0.25


class Mailbox(Protocol):
    """A queue.Queue or a multiprocessing Queue."""

    def put(self, item: Any) -> None: ...

    def get(self, block: bool = ..., timeout: float | None = ...) -> Any: ...


class Flag(Protocol):
    """A threading.Event or a multiprocessing Event."""

    def set(self) -> None: ...

    def wait(self, timeout: float | None = ...) -> bool: ...


def worker_main(
    index: int,
    num_workers: int,
    workload: Workload,
    config: LoadConfig,
    inbox: Mailbox,
    mailbox: Mailbox,
    go: Flag,
    start_at: Any,
) -> None:
    """Entry point of a worker: wait for the target, run, mail the result or the traceback.

    The parent starts workers before its server is up (importing torch takes seconds) and sends
    the target through ``inbox``; None means the run was called off.
    """
    try:
        target = inbox.get(timeout=READY_TIMEOUT_S)
    except queue.Empty:
        return
    if target is None:
        return
    tune_allocator()
    try:
        result = asyncio.run(
            _work(index, num_workers, workload, config, target, mailbox, go, start_at)
        )
    except BaseException:
        mailbox.put(("failed", index, traceback.format_exc()))
        raise
    mailbox.put(("done", index, result))


async def _work(
    index: int,
    num_workers: int,
    workload: Workload,
    config: LoadConfig,
    target: str,
    mailbox: Mailbox,
    go: Flag,
    start_at: Any,
) -> WorkerResult:
    async with KVClient(target, workload.namespace, options=ClientOptions()) as client:
        # Connect now, so the first measured call does not pay for it. A server that is down
        # is no reason to stop: the run then counts its UNAVAILABLE errors.
        with contextlib.suppress(KVStoreClientError):
            await client.stats()
        mailbox.put(("ready", index, None))
        if not await asyncio.to_thread(go.wait, READY_TIMEOUT_S):
            raise TimeoutError("the parent never started the run")
        zero = time.perf_counter() + (start_at.value - time.time())
        recorder = Recorder(workload.unit_op, zero)
        deadline = config.duration_s if config.duration_s is not None else math.inf
        context = UnitContext(
            client=client,
            recorder=recorder,
            payload=Payload(workload.namespace.layout, seed=config.seed),
            deadline_s=deadline,
            worker_index=index,
            num_workers=num_workers,
        )
        await asyncio.sleep(max(0.0, -recorder.now()))
        reporter = asyncio.create_task(_report_progress(index, recorder, mailbox))
        try:
            await _drive(workload, config, context, _unit_indices(workload, config, context))
        finally:
            reporter.cancel()
        mailbox.put(("progress", index, recorder.snapshot()))
        return recorder.result()


def _unit_indices(workload: Workload, config: LoadConfig, context: UnitContext) -> Iterator[int]:
    limits = [x for x in (workload.num_units(), config.max_units) if x is not None]
    step, first = context.num_workers, context.worker_index
    if limits:
        return iter(range(first, min(limits), step))
    return itertools.count(first, step)


async def _drive(
    workload: Workload, config: LoadConfig, context: UnitContext, indices: Iterator[int]
) -> None:
    recorder = context.recorder
    running: set[asyncio.Task[None]] = set()

    async def run(index: int) -> None:
        recorder.num_units_started += 1
        recorder.max_unit_index = max(recorder.max_unit_index, index)
        try:
            await workload.run_unit(index, context)
        except asyncio.CancelledError:
            recorder.num_units_cancelled += 1
            raise

    if config.mode == "closed":
        concurrency = config.concurrency
        assert concurrency is not None
        share = concurrency // context.num_workers
        slots = share + (context.worker_index < concurrency % context.num_workers)

        async def slot(global_slot: int) -> None:
            # Slots start spread over the ramp-up, so that (say) agent sessions do not all
            # miss the shared prompt together at t = 0.
            await context.sleep(config.ramp_up_s * global_slot / concurrency)
            for index in indices:  # one iterator shared by the slots: each unit runs once
                if recorder.now() >= context.deadline_s:
                    return
                await run(index)

        running.update(
            asyncio.create_task(slot(context.worker_index + k * context.num_workers))
            for k in range(slots)
        )
    else:
        await _arrive(config, workload.arrival_offsets_s(), context, indices, run, running)
    await _finish(running, context.deadline_s + config.grace_s, recorder)


async def _arrive(
    config: LoadConfig,
    offsets: Sequence[float] | None,
    context: UnitContext,
    indices: Iterator[int],
    run: Callable[[int], Awaitable[None]],
    running: set[asyncio.Task[None]],
) -> None:
    """Start units at their arrival times (Poisson or the workload's own)."""
    recorder = context.recorder
    slots = asyncio.Semaphore(config.max_in_flight)
    rng = np.random.default_rng([config.seed, context.worker_index])
    arrival = 0.0

    async def run_and_release(index: int) -> None:
        try:
            await run(index)
        finally:
            slots.release()

    for index in indices:
        if config.rate is not None:
            arrival += float(rng.exponential(context.num_workers / config.rate))
        else:
            assert offsets is not None
            arrival = float(offsets[index])
        if arrival >= context.deadline_s:
            return
        await asyncio.sleep(max(0.0, arrival - recorder.now()))
        await slots.acquire()
        recorder.schedule_lag.append(max(0.0, recorder.now() - arrival))
        task = asyncio.create_task(run_and_release(index))
        running.add(task)
        task.add_done_callback(_forget_if_ok(running))


def _forget_if_ok(running: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    # Finished units leave the set so a long open-loop run does not keep every task; a failed
    # one stays so that _finish re-raises its exception.
    def forget(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is None:
            running.discard(task)

    return forget


async def _finish(running: set[asyncio.Task[None]], cutoff_s: float, recorder: Recorder) -> None:
    """Wait for the units in flight until ``cutoff_s``; cancel the rest; re-raise failures."""
    if running:
        timeout = None if math.isinf(cutoff_s) else max(0.0, cutoff_s - recorder.now())
        _, pending = await asyncio.wait(set(running), timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for task in running:
        if task.done() and not task.cancelled() and task.exception() is not None:
            task.result()


async def _report_progress(index: int, recorder: Recorder, mailbox: Mailbox) -> None:
    while True:
        await asyncio.sleep(PROGRESS_PERIOD_S)
        mailbox.put(("progress", index, recorder.snapshot()))
