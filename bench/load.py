"""The load driver: worker processes run a workload open- or closed-loop; the parent shows progress.

One Python process cannot saturate the server (the client spends CPU on framing and checksums), so
units of work are dealt round-robin to ``processes`` workers (unit ``i`` goes to worker
``i % processes``), started with the ``spawn`` method. Each worker runs one event loop with one
client. The modes:

- **closed loop** (``concurrency``): that many units in flight in total; a unit starts when another
  ends.
- **open loop** (``rate``): units arrive as a Poisson process of ``rate`` per second, whether or not
  earlier ones finished (each worker draws ``rate / processes``; the superposition is Poisson at
  ``rate``). ``max_in_flight`` per worker bounds memory; a unit that waits for a slot starts late,
  and the lateness is reported as schedule lag.
- **timed** (the workload's own arrival times, a trace's timestamps): open loop on that schedule.

Every mode stops starting units at ``duration_s`` (units check the deadline between their steps)
or after ``max_units``. Units still running ``grace_s`` after the deadline are cancelled and
counted. Workers start their clocks together once all of them have connected.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import multiprocessing
import queue
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kvstore.allocator import tune_allocator
from kvstore.bench.workload import (
    Payload,
    ProgressSnapshot,
    Recorder,
    UnitContext,
    Workload,
    WorkerResult,
)
from kvstore.client import ClientOptions, KVClient, KVStoreClientError, Namespace
from kvstore.v1 import kvstore_pb2 as pb

_READY_TIMEOUT_S = 120.0  # spawning a worker imports torch: seconds on a small machine
_PROGRESS_PERIOD_S = 0.25


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    """How to drive a workload. Exactly one of ``rate`` / ``concurrency`` may be set; with neither
    the workload's own arrival times are used."""

    processes: int = 2  # 0: one worker thread inside this process (tests, debugging)
    concurrency: int | None = None
    rate: float | None = None
    duration_s: float | None = None
    max_units: int | None = None
    max_in_flight: int = 256
    grace_s: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.processes < 0:
            raise ValueError(f"processes must be >= 0, got {self.processes}")
        if self.rate is not None and self.concurrency is not None:
            raise ValueError("give either a rate (open loop) or a concurrency (closed loop)")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number, got {self.rate}")
        for name in ("concurrency", "max_units"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration_s}")
        if self.max_in_flight < 1 or self.grace_s < 0:
            raise ValueError("max_in_flight must be >= 1 and grace >= 0")

    @property
    def mode(self) -> str:
        """ "open", "closed" or "timed"."""
        if self.rate is not None:
            return "open"
        return "closed" if self.concurrency is not None else "timed"

    @property
    def num_workers(self) -> int:
        workers = max(1, self.processes)
        # A closed loop with fewer slots than processes would leave workers idle.
        return min(workers, self.concurrency) if self.concurrency is not None else workers


@dataclass
class LoadRun:
    """What `run_load` measured: per-worker results, wall time and the server's stats around it."""

    workload: str
    unit_op: str
    mode: str
    config: LoadConfig
    target: str
    wall_s: float  # from the common start to the last worker's end
    results: list[WorkerResult]
    stats_before: pb.StatsResponse | None
    stats_after: pb.StatsResponse | None


def run_load(
    workload: Workload,
    config: LoadConfig,
    target: str,
    *,
    console: Console | None = None,
    show_progress: bool = True,
) -> LoadRun:
    """Run ``workload`` against the server at ``target``; blocks until every worker is done."""
    if config.mode == "timed" and workload.arrival_offsets_s() is None:
        raise ValueError(f"the {workload.name} workload needs a rate or a concurrency")
    if workload.num_units() is None and config.duration_s is None and config.max_units is None:
        raise ValueError(f"the {workload.name} workload needs a duration or a unit count")
    stats_before = fetch_stats(target, workload.namespace)
    workers = _Workers(config)
    progress = _ProgressBar(workload, config, console or Console(), show_progress)
    try:
        workers.start(workload, config, target)
        results, wall_s = workers.collect(progress)
    finally:
        progress.stop()
        workers.stop()
    return LoadRun(
        workload=workload.name,
        unit_op=workload.unit_op,
        mode=config.mode,
        config=config,
        target=target,
        wall_s=wall_s,
        results=results,
        stats_before=stats_before,
        stats_after=fetch_stats(target, workload.namespace),
    )


def fetch_stats(target: str, namespace: Namespace) -> pb.StatsResponse | None:
    """The server's Stats, or None when it does not answer (stopped, unreachable)."""

    async def fetch() -> pb.StatsResponse | None:
        options = ClientOptions()
        async with KVClient(target, namespace, options=options) as client:
            try:
                return await client.stats()
            except KVStoreClientError:
                return None

    return asyncio.run(fetch())


# -- the parent's side ------------------------------------------------------------------------------


class _Mailbox(Protocol):
    def put(self, item: Any) -> None: ...

    def get(self, block: bool = ..., timeout: float | None = ...) -> Any: ...


class _Flag(Protocol):
    def set(self) -> None: ...

    def wait(self, timeout: float | None = ...) -> bool: ...


class _Cell:
    """A float shared with a worker thread (a process gets a multiprocessing.Value)."""

    value: float = 0.0


class _Workers:
    """The worker processes (or the one worker thread) and the messages they send."""

    def __init__(self, config: LoadConfig) -> None:
        self._inline = config.processes == 0
        self._count = config.num_workers
        self._threads: list[threading.Thread] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._start_at: Any
        self._mailbox: _Mailbox
        self._go: _Flag
        if self._inline:
            self._mailbox, self._go, self._start_at = queue.Queue(), threading.Event(), _Cell()
        else:
            context = multiprocessing.get_context("spawn")
            self._mailbox, self._go = context.Queue(), context.Event()
            self._start_at = context.Value("d", 0.0)

    def start(self, workload: Workload, config: LoadConfig, target: str) -> None:
        for index in range(self._count):
            args = (index, self._count, workload, config, target)
            args_all = (*args, self._mailbox, self._go, self._start_at)
            if self._inline:
                thread = threading.Thread(target=worker_main, args=args_all, daemon=True)
                self._threads.append(thread)
                thread.start()
            else:
                context = multiprocessing.get_context("spawn")
                process = context.Process(target=worker_main, args=args_all, daemon=True)
                self._processes.append(process)
                process.start()

    def collect(self, progress: _ProgressBar) -> tuple[list[WorkerResult], float]:
        ready: set[int] = set()
        results: dict[int, WorkerResult] = {}
        snapshots: dict[int, ProgressSnapshot] = {}
        started_wall: float | None = None
        ready_deadline = time.monotonic() + _READY_TIMEOUT_S
        while len(results) < self._count:
            try:
                kind, index, payload = self._mailbox.get(timeout=_PROGRESS_PERIOD_S)
            except queue.Empty:
                self._check_alive(results)
                if started_wall is None and time.monotonic() > ready_deadline:
                    raise TimeoutError("workers did not connect within the start-up timeout")
            else:
                if kind == "ready":
                    ready.add(index)
                elif kind == "progress":
                    snapshots[index] = payload
                elif kind == "done":
                    results[index] = payload
                else:
                    raise RuntimeError(f"load worker {index} failed:\n{payload}")
            if started_wall is None and len(ready) == self._count:
                started_wall = time.time() + 0.05
                self._start_at.value = started_wall
                self._go.set()
                progress.start(started_wall)
            progress.update(snapshots)
        wall_s = time.time() - started_wall if started_wall is not None else 0.0
        return [results[index] for index in range(self._count)], wall_s

    def _check_alive(self, results: dict[int, WorkerResult]) -> None:
        for index, process in enumerate(self._processes):
            if index not in results and not process.is_alive():
                # Its last message may still be in the pipe; give it a moment.
                time.sleep(0.5)
                try:
                    kind, got, payload = self._mailbox.get(timeout=1.0)
                except queue.Empty:
                    raise RuntimeError(
                        f"load worker {index} exited (code {process.exitcode}) without a result"
                    ) from None
                self._mailbox.put((kind, got, payload))
                return

    def stop(self) -> None:
        self._go.set()  # a worker still waiting to start must not wait forever
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)


class _ProgressBar:
    """A rich progress bar over time (with a duration or a timed schedule) or over units."""

    def __init__(
        self, workload: Workload, config: LoadConfig, console: Console, enabled: bool
    ) -> None:
        self._unit_op = workload.unit_op
        offsets = workload.arrival_offsets_s() if config.mode == "timed" else None
        span = max(offsets, default=0.0) if offsets is not None else None
        limits = [x for x in (config.duration_s, span) if x is not None]
        self._by_time = bool(limits)
        units = [x for x in (workload.num_units(), config.max_units) if x is not None]
        self._total = min(limits) if limits else float(min(units)) if units else None
        self._started_wall: float | None = None
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[stats]}"),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task(
            f"{workload.name}: connecting", total=self._total, stats=""
        )
        self._progress.start()

    def start(self, started_wall: float) -> None:
        self._started_wall = started_wall
        self._progress.update(self._task, description="running")

    def update(self, snapshots: dict[int, ProgressSnapshot]) -> None:
        if self._started_wall is None:
            return
        elapsed = max(0.0, time.time() - self._started_wall)
        num_requests = sum(s.num_requests for s in snapshots.values())
        num_errors = sum(s.num_errors for s in snapshots.values())
        num_blocks = sum(s.num_blocks for s in snapshots.values())
        num_hits = sum(s.num_hit_blocks for s in snapshots.values())
        num_bytes = sum(s.num_bytes for s in snapshots.values())
        hit_rate = num_hits / num_blocks if num_blocks else 0.0
        stats = (
            f"{num_requests} {self._unit_op}s  {num_requests / max(elapsed, 1e-9):.1f}/s  "
            f"{num_bytes / max(elapsed, 1e-9) / 1e9:.2f} GB/s  hit {hit_rate:.1%}  "
            f"errors {num_errors}"
        )
        if self._by_time:
            completed = min(elapsed, self._total or elapsed)
        else:
            completed = float(sum(s.num_units_started for s in snapshots.values()))
        self._progress.update(self._task, completed=completed, stats=stats)

    def stop(self) -> None:
        self._progress.stop()


# -- the worker's side ------------------------------------------------------------------------------


def worker_main(
    index: int,
    num_workers: int,
    workload: Workload,
    config: LoadConfig,
    target: str,
    mailbox: _Mailbox,
    go: _Flag,
    start_at: Any,
) -> None:
    """Entry point of a worker process (or thread): run, then mail the result or the traceback."""
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
    mailbox: _Mailbox,
    go: _Flag,
    start_at: Any,
) -> WorkerResult:
    async with KVClient(target, workload.namespace, options=ClientOptions()) as client:
        try:
            await client.stats()  # connect now, so the first measured call does not pay for it
        except KVStoreClientError:
            pass  # the server may be down: the run then counts UNAVAILABLE errors
        mailbox.put(("ready", index, None))
        if not await asyncio.to_thread(go.wait, _READY_TIMEOUT_S):
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
        assert config.concurrency is not None
        share = config.concurrency // context.num_workers
        slots = share + (context.worker_index < config.concurrency % context.num_workers)

        async def slot() -> None:
            for index in indices:  # one iterator shared by the slots: each unit runs once
                if recorder.now() >= context.deadline_s:
                    return
                await run(index)

        running.update(asyncio.create_task(slot()) for _ in range(slots))
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


async def _report_progress(index: int, recorder: Recorder, mailbox: _Mailbox) -> None:
    while True:
        await asyncio.sleep(_PROGRESS_PERIOD_S)
        mailbox.put(("progress", index, recorder.snapshot()))
