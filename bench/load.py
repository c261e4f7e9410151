"""The load driver: worker processes run a workload open- or closed-loop; the parent shows progress.

One Python process cannot saturate the server (the client spends CPU on framing and checksums), so
units of work are dealt round-robin to ``processes`` workers (unit ``i`` goes to worker
``i % processes``), started with the ``spawn`` method. Each worker runs one event loop with one
client. The modes:

- **closed loop** (``concurrency``): that many units in flight in total; a unit starts when another
  ends. With ``ramp_up_s`` the slots' first units start spread over that time.
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
import math
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kvstore.bench.loop import PROGRESS_PERIOD_S, READY_TIMEOUT_S, Flag, Mailbox, worker_main
from kvstore.bench.workload import ProgressSnapshot, WorkerResult, Workload
from kvstore.client import ClientOptions, KVClient, KVStoreClientError, Namespace, StoreStats


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
    ramp_up_s: float = 0.0  # closed loop: slot k of n first starts at k / n of this
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
        if self.max_in_flight < 1 or self.grace_s < 0 or self.ramp_up_s < 0:
            raise ValueError("max_in_flight must be >= 1, grace and ramp-up >= 0")

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
    unit_name: str
    unit_op: str
    mode: str
    config: LoadConfig
    target: str
    wall_s: float  # from the common start to the last worker's end
    results: list[WorkerResult]
    stats_before: StoreStats | None
    stats_after: StoreStats | None
    started_at: float = 0.0  # unix time of the common start (0.0: the run never started)


class LoadDriver:
    """Worker processes for one run, started early, since their imports take seconds.

    with LoadDriver(workload, config) as driver:   # workers start importing now
        with spawned_server(...) as target:         # meanwhile the server starts
            run = driver.run(target)
    """

    def __init__(
        self,
        workload: Workload,
        config: LoadConfig,
        *,
        console: Console | None = None,
        show_progress: bool = True,
    ) -> None:
        if config.mode == "timed" and workload.arrival_offsets_s() is None:
            raise ValueError(f"the {workload.name} workload needs a rate or a concurrency")
        if workload.num_units() is None and config.duration_s is None and config.max_units is None:
            raise ValueError(f"the {workload.name} workload needs a duration or a unit count")
        self._workload = workload
        self._config = config
        self._console = console or Console()
        self._show_progress = show_progress
        self._workers = _Workers(config)

    def __enter__(self) -> LoadDriver:
        self._workers.start(self._workload, self._config)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._workers.stop()

    def run(self, target: str) -> LoadRun:
        """Run against the server at ``target``; blocks until every worker is done. Once only."""
        workload = self._workload
        stats_before = fetch_stats(target, workload.namespace)
        progress = _ProgressBar(workload, self._config, self._console, self._show_progress)
        try:
            self._workers.send_target(target)
            results, started_at, wall_s = self._workers.collect(progress)
        finally:
            progress.stop()
        return LoadRun(
            workload=workload.name,
            unit_name=workload.unit_name,
            unit_op=workload.unit_op,
            mode=self._config.mode,
            config=self._config,
            target=target,
            wall_s=wall_s,
            results=results,
            stats_before=stats_before,
            stats_after=fetch_stats(target, workload.namespace),
            started_at=started_at,
        )


def run_load(
    workload: Workload,
    config: LoadConfig,
    target: str,
    *,
    console: Console | None = None,
    show_progress: bool = True,
) -> LoadRun:
    """Run ``workload`` against the server at ``target``; blocks until every worker is done."""
    with LoadDriver(workload, config, console=console, show_progress=show_progress) as driver:
        return driver.run(target)


def fetch_stats(target: str, namespace: Namespace) -> StoreStats | None:
    """The server's Stats, or None when it does not answer (stopped, unreachable)."""

    async def fetch() -> StoreStats | None:
        options = ClientOptions()
        async with KVClient(target, namespace, options=options) as client:
            try:
                return await client.stats()
            except KVStoreClientError:
                return None

    return asyncio.run(fetch())


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
        self._inbox: Mailbox
        self._mailbox: Mailbox
        self._go: Flag
        self._target_sent = False
        if self._inline:
            self._inbox, self._mailbox = queue.Queue(), queue.Queue()
            self._go, self._start_at = threading.Event(), _Cell()
        else:
            context = multiprocessing.get_context("spawn")
            self._inbox, self._mailbox = context.Queue(), context.Queue()
            self._go, self._start_at = context.Event(), context.Value("d", 0.0)

    def start(self, workload: Workload, config: LoadConfig) -> None:
        for index in range(self._count):
            args = (index, self._count, workload, config)
            args_all = (*args, self._inbox, self._mailbox, self._go, self._start_at)
            if self._inline:
                thread = threading.Thread(target=worker_main, args=args_all, daemon=True)
                self._threads.append(thread)
                thread.start()
            else:
                context = multiprocessing.get_context("spawn")
                process = context.Process(target=worker_main, args=args_all, daemon=True)
                self._processes.append(process)
                process.start()

    def send_target(self, target: str) -> None:
        for _ in range(self._count):
            self._inbox.put(target)
        self._target_sent = True

    def collect(self, progress: _ProgressBar) -> tuple[list[WorkerResult], float, float]:
        """Every worker's result, the common start (unix time) and the wall time since it."""
        ready: set[int] = set()
        results: dict[int, WorkerResult] = {}
        snapshots: dict[int, ProgressSnapshot] = {}
        started_wall: float | None = None
        ready_deadline = time.monotonic() + READY_TIMEOUT_S
        while len(results) < self._count:
            try:
                kind, index, payload = self._mailbox.get(timeout=PROGRESS_PERIOD_S)
            except queue.Empty:
                self._check_alive(results)
                if started_wall is None and time.monotonic() > ready_deadline:
                    raise TimeoutError(
                        "workers did not connect within the start-up timeout"
                    ) from None
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
        return [results[index] for index in range(self._count)], started_wall or 0.0, wall_s

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
        if not self._target_sent:
            for _ in range(self._count):
                self._inbox.put(None)  # the run was called off before it began
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
