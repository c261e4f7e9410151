"""Background bulk transfers at a set rate, from processes of their own.

`BulkLoad` starts `num_processes` spawned processes, each with one KVClient, that put a
batch of blocks, get it back, check it and delete it, over and over, paced so that the
bytes put and got together average `rate_bps` across the processes. A transfer is one
put or get of `transfer_bytes` (whole blocks), sent as fast as the client can; the
pacing sleeps between transfers, so the daemon sees bursts of bulk bytes, as from
prefill workers, not a trickle. Each process reports the bytes it moved and the time it
took, so the caller can print the rate actually reached next to the one asked for.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
import traceback
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from kvstore.allocator import tune_allocator
from kvstore.bench.throughput import layout_for
from kvstore.client import ClientOptions, KVClient, KVForm, Namespace

# Spawning a process imports torch: seconds on a small, busy machine.
_READY_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class BulkPlan:
    """What each load process does: `rate_bps` is its own share of the rate."""

    target: str
    rate_bps: float
    block_bytes: int
    transfer_bytes: int

    @property
    def num_blocks(self) -> int:
        return max(1, self.transfer_bytes // self.block_bytes)


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What the load processes moved together while the load ran."""

    bytes_moved: int
    elapsed_s: float  # the longest any process ran
    num_transfers: int

    @property
    def gbps(self) -> float:
        return self.bytes_moved / self.elapsed_s / 1e9 if self.elapsed_s > 0 else 0.0


class BulkLoad:
    """Load processes against `target`, moving `rate_gbps` GB/s (1e9 bytes) in total.

    with BulkLoad(target, 1.0) as load:   # processes start and connect
        load.start()                       # they begin moving bytes
        ...                                # measure something meanwhile
        result = load.stop()               # they stop and report
    """

    def __init__(
        self,
        target: str,
        rate_gbps: float,
        *,
        num_processes: int = 2,
        block_bytes: int = 1 << 20,
        transfer_bytes: int = 32 << 20,
    ) -> None:
        if not rate_gbps > 0:
            raise ValueError(f"the load's rate must be above 0 GB/s, got {rate_gbps}")
        if num_processes < 1:
            raise ValueError(f"the load needs at least one process, got {num_processes}")
        layout_for(block_bytes)  # raises for a size the benchmark geometry cannot hold
        if transfer_bytes < block_bytes:
            raise ValueError("a load transfer must hold at least one block")
        context = multiprocessing.get_context("spawn")
        self._go = context.Event()
        self._stop = context.Event()
        self._mailbox: Any = context.Queue()
        plan = BulkPlan(target, rate_gbps * 1e9 / num_processes, block_bytes, transfer_bytes)
        self._processes = [
            context.Process(
                target=_load_main,
                args=(index, plan, self._go, self._stop, self._mailbox),
                name=f"kvstore-bulk-load-{index}",
                daemon=True,
            )
            for index in range(num_processes)
        ]

    def __enter__(self) -> BulkLoad:
        for process in self._processes:
            process.start()
        try:
            for _ in self._processes:
                self._expect("ready", _READY_TIMEOUT_S)
        except BaseException:
            self._terminate()
            raise
        return self

    def start(self) -> None:
        """Every process begins moving bytes now."""
        self._go.set()

    def stop(self) -> BulkResult:
        """Stop the processes after their transfers in flight; what they moved."""
        self._stop.set()
        self._go.set()  # a load stopped before it started ends at once
        reports = [self._expect("done", _STOP_TIMEOUT_S) for _ in self._processes]
        return BulkResult(
            bytes_moved=sum(report[0] for report in reports),
            elapsed_s=max(report[1] for report in reports),
            num_transfers=sum(report[2] for report in reports),
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback_: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._go.set()
        self._terminate()

    def _expect(self, what: str, timeout_s: float) -> Any:
        try:
            kind, index, body = self._mailbox.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"a bulk-load process did not report {what!r} in time") from None
        if kind == "failed":
            raise RuntimeError(f"bulk-load process {index} failed:\n{body}")
        if kind != what:
            raise RuntimeError(f"bulk-load process {index} said {kind!r}, expected {what!r}")
        return body

    def _terminate(self) -> None:
        for process in self._processes:
            if process.pid is None:
                continue
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()


def _load_main(index: int, plan: BulkPlan, go: Any, stop: Any, mailbox: Any) -> None:
    tune_allocator()
    try:
        asyncio.run(_move(index, plan, go, stop, mailbox))
    except BaseException:
        mailbox.put(("failed", index, traceback.format_exc()))
        raise


async def _move(index: int, plan: BulkPlan, go: Any, stop: Any, mailbox: Any) -> None:
    layout = layout_for(plan.block_bytes)
    namespace = Namespace(tenant="bench", model_fingerprint="bulk-load", layout=layout)
    shape = (plan.num_blocks, layout.num_layers, *layout.layer_shape)
    source = torch.randn(shape, dtype=torch.float32).to(layout.dtype.torch_dtype)
    dest = torch.empty_like(source)
    transfer_bytes = plan.num_blocks * plan.block_bytes
    async with KVClient(plan.target, namespace, options=ClientOptions()) as client:
        await client.stats()  # connected before the clock starts
        mailbox.put(("ready", index, None))
        await asyncio.to_thread(go.wait)
        start = time.perf_counter()
        moved = transfers = cycle = 0
        while not stop.is_set():
            keys = [f"load{index}-c{cycle}-b{i}".encode() for i in range(plan.num_blocks)]
            cycle += 1
            result = await client.put_blocks(keys, source, form=KVForm.BLOCKS)
            if result.num_committed != plan.num_blocks:
                raise RuntimeError(f"a load put stored {result.num_committed} blocks")
            moved, transfers = moved + transfer_bytes, transfers + 1
            await _pace(start, moved, plan.rate_bps)
            if await client.get_into(keys, dest, form=KVForm.BLOCKS) != plan.num_blocks:
                raise RuntimeError("a load get missed blocks it had just put")
            moved, transfers = moved + transfer_bytes, transfers + 1
            await client.delete(keys)
            await _pace(start, moved, plan.rate_bps)
        elapsed = time.perf_counter() - start
        if not torch.equal(dest[-1], source[-1]):
            raise RuntimeError("a load get returned other bytes than were put")
    mailbox.put(("done", index, (moved, elapsed, transfers)))


async def _pace(start: float, moved: int, rate_bps: float) -> None:
    """Sleep until `moved` bytes are due at `rate_bps`; a load behind its rate goes on."""
    await asyncio.sleep(max(0.0, start + moved / rate_bps - time.perf_counter()))
