"""`kvstore-bench cluster workers`: aggregate GB/s against `--workers N` and `--workers 1`.

Two `kvstore-server` supervisors run side by side, each with the same DRAM and each
registered under its own prefix of one local etcd: one with `--workers N` (N daemon
processes, each with 1/N of the DRAM), one with `--workers 1`. `clients` client
processes, each with one cluster client (`etcd://`) that stays open, then move
`total_bytes` in all, round after round and side after side:

- put: every client puts its own `total / clients` bytes of blocks; each makes its
  blocks first, then waits at a barrier for the others, so all begin together;
  aggregate GB/s = all bytes / (the last client's end - the first client's begin);
- get: the same blocks back into a tensor, compared with what was put (after the clock);
- their blocks are then deleted, untimed.

The medians over rounds are reported, and N workers' against 1 worker's. A daemon uses
about one core, so the ratio is bounded by the cores the daemons and the clients share:
on this 2-core machine the clients take their part of the same two cores.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from threading import Barrier

import torch

from kvstore.bench.cluster_report import PartResult
from kvstore.bench.local_etcd import EtcdServer
from kvstore.bench.spawn import free_port
from kvstore.bench.throughput import layout_for
from kvstore.client import KVClient, KVForm, Namespace
from kvstore.cluster.etcd import EtcdUnavailable, list_members
from kvstore.units import human_bytes

PUT, GET, DELETE = "put", "get", "delete"
_BARRIER_TIMEOUT_S = 120.0
_REGISTER_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WorkersSetup:
    workers: int = 2
    clients: int = 4
    total_bytes: int = 256 << 20
    block_bytes: int = 1 << 20
    rounds: int = 3


@dataclass(frozen=True)
class Phase:
    """One timed phase of one side: aggregate GB/s, and how far apart the clients began."""

    gbps: float
    start_spread_s: float


def measure_workers(setup: WorkersSetup) -> PartResult:
    layout_for(setup.block_bytes)  # a block size the layout cannot take fails here, early
    per_client_blocks = max(1, setup.total_bytes // setup.clients // setup.block_bytes)
    moved = per_client_blocks * setup.block_bytes * setup.clients
    # Room for one round's blocks on every worker, however the runs fall, plus slack.
    dram = 2 * moved + (64 << 20) * setup.workers
    sides = (setup.workers, 1)
    results: dict[int, dict[str, list[Phase]]] = {w: {PUT: [], GET: []} for w in sides}
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-workers-") as folder:
        etcd = EtcdServer(Path(folder) / "etcd")
        etcd.start()
        try:
            with contextlib.ExitStack() as stack:
                targets = {
                    w: stack.enter_context(
                        _supervisor(etcd, w, dram, Path(folder) / f"workers-{w}.log")
                    )
                    for w in sides
                }
                context = multiprocessing.get_context("spawn")
                manager = stack.enter_context(context.Manager())
                barrier = manager.Barrier(setup.clients)
                pool = stack.enter_context(
                    concurrent.futures.ProcessPoolExecutor(
                        max_workers=setup.clients, mp_context=context
                    )
                )
                for side in sides:  # warm-up: imports, connections, first allocations
                    _round(pool, barrier, targets[side], setup, per_client_blocks, f"w-{side}")
                for number in range(setup.rounds):
                    for side in sides:
                        tag = f"{number}-{side}"
                        put, get = _round(
                            pool, barrier, targets[side], setup, per_client_blocks, tag
                        )
                        results[side][PUT].append(put)
                        results[side][GET].append(get)
        finally:
            etcd.stop()
    return _result(setup, moved, results)


def _round(
    pool: concurrent.futures.Executor,
    barrier: Barrier,
    target: str,
    setup: WorkersSetup,
    num_blocks: int,
    tag: str,
) -> tuple[Phase, Phase]:
    phases = []
    for phase in (PUT, GET, DELETE):
        # As many tasks as processes, and each waits at the barrier: one task per process.
        futures = [
            pool.submit(
                client_phase, barrier, target, phase, tag, index, num_blocks, setup.block_bytes
            )
            for index in range(setup.clients)
        ]
        spans = [future.result() for future in futures]
        if phase == DELETE:
            continue
        moved = num_blocks * setup.block_bytes * setup.clients
        first_begin = min(begin for begin, _ in spans)
        phases.append(
            Phase(
                gbps=moved / (max(end for _, end in spans) - first_begin) / 1e9,
                start_spread_s=max(begin for begin, _ in spans) - first_begin,
            )
        )
    return phases[0], phases[1]


# -- in the client processes ----------------------------------------------------------

_loop: asyncio.AbstractEventLoop | None = None
_clients: dict[str, KVClient] = {}


def client_phase(
    barrier: Barrier,
    target: str,
    phase: str,
    tag: str,
    index: int,
    num_blocks: int,
    block_bytes: int,
) -> tuple[float, float]:
    """Run in a client process: one phase of one client's blocks, begun once every client
    has passed `barrier`; returns (begin, end) as unix times. Its client and event loop
    stay open between calls."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(
        _client_phase(barrier, target, phase, tag, index, num_blocks, block_bytes)
    )


async def _client_phase(
    barrier: Barrier,
    target: str,
    phase: str,
    tag: str,
    index: int,
    num_blocks: int,
    block_bytes: int,
) -> tuple[float, float]:
    layout = layout_for(block_bytes)
    if target not in _clients:
        namespace = Namespace(tenant="bench", model_fingerprint="cluster-workers", layout=layout)
        _clients[target] = await KVClient(target, namespace).__aenter__()
    client = _clients[target]
    prefix = f"{tag}/{index}/".encode()
    keys = [
        hashlib.blake2b(prefix + str(i).encode(), digest_size=16).digest()
        for i in range(num_blocks)
    ]
    source = _blocks(
        layout.num_layers, tuple(layout.layer_shape), layout.dtype.torch_dtype, num_blocks, prefix
    )
    dest = torch.empty_like(source) if phase == GET else None
    barrier.wait(_BARRIER_TIMEOUT_S)  # nothing else runs on this loop meanwhile
    begin = time.time()
    if phase == PUT:
        result = await client.put_blocks(keys, source, form=KVForm.BLOCKS)
        end = time.time()
        if result.num_committed != num_blocks:
            raise RuntimeError(f"client {index}: put stored {result.num_committed} of {num_blocks}")
    elif phase == GET:
        assert dest is not None
        got = await client.get_into(keys, dest, form=KVForm.BLOCKS)
        end = time.time()
        # Compared as bytes: random bytes as bf16 include NaNs, which equal nothing.
        if got != num_blocks or not torch.equal(dest.view(torch.uint8), source.view(torch.uint8)):
            raise RuntimeError(f"client {index}: get returned {got} of {num_blocks} or wrong bytes")
    else:
        await client.delete(keys)
        end = time.time()
    return begin, end


def _blocks(
    num_layers: int, layer_shape: tuple[int, ...], dtype: torch.dtype, num_blocks: int, seed: bytes
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(
        int.from_bytes(hashlib.blake2b(seed, digest_size=8).digest(), "little") >> 1
    )
    shape = (num_blocks, num_layers, *layer_shape)
    nbytes = (
        num_blocks
        * num_layers
        * torch.Size(layer_shape).numel()
        * torch.empty((), dtype=dtype).element_size()
    )
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


# -- the supervisors ------------------------------------------------------------------


def _free_ports(count: int) -> int:
    """A port P such that P .. P+count-1 are free now (a supervisor's workers take P+i)."""
    for _ in range(100):
        base = free_port()
        try:
            with contextlib.ExitStack() as stack:
                for offset in range(count):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError(f"found no {count} consecutive free ports")


@contextlib.contextmanager
def _supervisor(etcd: EtcdServer, workers: int, dram_bytes: int, log_path: Path) -> Iterator[str]:
    """`kvstore-server --workers N` registered under its own prefix; yields its etcd://
    target once all N have registered. SIGTERM at the end (the workers drain)."""
    port = _free_ports(workers)
    target = etcd.url(f"workers-{workers}")
    command = [
        sys.executable,
        "-m",
        "kvstore.server.main",
        "--workers",
        str(workers),
        "--listen",
        f"127.0.0.1:{port}",
        "--advertise",
        f"127.0.0.1:{port}",
        "--cluster",
        target,
        "--dram-bytes",
        str(dram_bytes),
        "--page-bytes",
        "1MiB",
        "--drain-grace-s",
        "2",
        "--log-level",
        "warning",
    ]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=os.environ.copy()
        )
    try:
        deadline = time.monotonic() + _REGISTER_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"kvstore-server --workers {workers} exited ({process.returncode}): "
                    + log_path.read_text(errors="replace")[-2000:]
                )
            with contextlib.suppress(EtcdUnavailable):
                if len(asyncio.run(list_members(target))) == workers:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"--workers {workers}: not all registered in {_REGISTER_TIMEOUT_S:.0f}s"
                )
            time.sleep(0.2)
        yield target
    finally:
        process.terminate()
        try:
            process.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the table ------------------------------------------------------------------------


def _result(
    setup: WorkersSetup, moved: int, results: dict[int, dict[str, list[Phase]]]
) -> PartResult:
    median = statistics.median
    gbps = {
        side: {op: median(p.gbps for p in phases) for op, phases in ops.items()}
        for side, ops in results.items()
    }
    ratio = {op: gbps[setup.workers][op] / gbps[1][op] for op in (PUT, GET)}
    spread = max(
        p.start_spread_s for ops in results.values() for phases in ops.values() for p in phases
    )
    rows = [
        [f"--workers {side}", f"{gbps[side][PUT]:.3f}", f"{gbps[side][GET]:.3f}"]
        for side in (1, setup.workers)
    ]
    rows.append([f"{setup.workers} ÷ 1", f"{ratio[PUT]:.2f}x", f"{ratio[GET]:.2f}x"])
    cores = len(os.sched_getaffinity(0))
    notes = [
        f"{setup.clients} client processes move {human_bytes(moved)} in all per round in "
        f"{human_bytes(setup.block_bytes)} blocks; median of {setup.rounds} rounds; "
        "every daemon and client its own process",
        f"this machine: {cores} usable cores, shared by the daemons and the clients; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end",
        f"clients began at most {spread * 1000:.0f} ms apart (after a barrier; counted in)",
    ]
    return PartResult(
        part="workers",
        title=f"aggregate GB/s, kvstore-server --workers {setup.workers} vs --workers 1",
        columns=["server", "put GB/s", "get GB/s"],
        rows=rows,
        data={
            "workers": setup.workers,
            "clients": setup.clients,
            "bytes_per_round": moved,
            "block_bytes": setup.block_bytes,
            "rounds": setup.rounds,
            "gbps": {str(side): ops for side, ops in gbps.items()},
            "ratio": ratio,
            "rounds_gbps": {
                str(side): {op: [p.gbps for p in phases] for op, phases in ops.items()}
                for side, ops in results.items()
            },
            "usable_cores": cores,
            "load_average": list(os.getloadavg()),
        },
        notes=notes,
    )
