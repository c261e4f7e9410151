"""`kvstore-bench peers`: kvstore side by side with LMCache's lm server, in one run.

Each server runs in its own process on this host; so does each client. For every block
size, kvstore (as clients use it by default, and on its TCP data plane alone) and
LMCache take turns, round by round, each putting then getting the same number of bytes
of bf16 blocks, read back and compared. LMCache's client (kvstore.bench
peer_lmcache_client, a script) runs under the Python given by `--lmcache-python`, which
must import `lmcache`; kvstore does not depend on it. Medians are reported, and each
ratio is the median of the per-round ratios, so that a change in the shared machine's
speed lands on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from kvstore.allocator import tune_allocator
from kvstore.bench.cost import CpuCost, Phase, Round, median_cpu
from kvstore.bench.spawn import child_process, free_port, log_tail, spawned_server, stop_child
from kvstore.bench.throughput import KVStoreRounds, layout_for
from kvstore.client import ClientOptions, KVClient, Namespace
from kvstore.units import human_bytes, parse_size

_CLIENT_SCRIPT = Path(__file__).with_name("peer_lmcache_client.py")
_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class PeerRow:
    block_bytes: int
    path: str  # kvstore's default path here: shm (the same-host path) or tcp
    put_gbps: float
    get_gbps: float
    tcp_put_gbps: float
    tcp_get_gbps: float
    lmcache_put_gbps: float
    lmcache_get_gbps: float
    put_ratio: float  # kvstore (default path) ÷ LMCache, median of the per-round ratios
    get_ratio: float
    tcp_put_ratio: float  # kvstore over TCP ÷ LMCache
    tcp_get_ratio: float
    put_cpu: CpuCost
    get_cpu: CpuCost
    tcp_put_cpu: CpuCost
    tcp_get_cpu: CpuCost
    lmcache_put_cpu: CpuCost
    lmcache_get_cpu: CpuCost


class LMCacheClient:
    """The client script under LMCache's Python, fed one round at a time."""

    def __init__(self, process: subprocess.Popen[str], log: IO[bytes]) -> None:
        self._process = process
        self._log = log

    def run(self, block_bytes: int, total_bytes: int) -> Round:
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        try:
            self._process.stdin.write(f"round {block_bytes} {total_bytes}\n")
            self._process.stdin.flush()
            line = self._process.stdout.readline()
        except OSError:  # its end of the pipe is gone
            line = ""
        if not line:
            raise RuntimeError(f"LMCache's client ended without an answer:\n{log_tail(self._log)}")
        answer = json.loads(line)
        gigabytes = answer["bytes"] / 1e9
        phases = [
            Phase(
                gbps=gigabytes / answer[f"{op}_s"],
                cpu=CpuCost(
                    client_s_per_gb=answer[f"{op}_client_cpu_s"] / gigabytes,
                    server_s_per_gb=answer[f"{op}_server_cpu_s"] / gigabytes,
                ),
            )
            for op in ("put", "get")
        ]
        return Round(put=phases[0], get=phases[1])


def check_lmcache_python(python: str) -> str:
    """LMCache's version under `python`; SystemExit(2) with what to do when it has none."""
    probe = [python, "-c", "import importlib.metadata as m; print(m.version('lmcache'))"]
    try:
        found = subprocess.run(probe, capture_output=True, text=True, timeout=60, check=False)
    except OSError as error:
        message = f"kvstore-bench peers: cannot run --lmcache-python {python}: {error}"
        raise SystemExit(message) from None
    if found.returncode != 0:
        raise SystemExit(
            f"kvstore-bench peers: {python} cannot import lmcache; give --lmcache-python a "
            "Python that has it (e.g. a venv with `pip install lmcache`)"
        )
    return found.stdout.strip()


@contextlib.contextmanager
def lmcache_server(python: str) -> Iterator[tuple[int, int]]:
    """LMCache's lm server on a free loopback port: (port, pid), stopped on exit."""
    port = free_port()
    command = [python, "-m", "lmcache.v1.server", "127.0.0.1", str(port), "cpu"]
    with child_process(command, None) as (process, log):
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"LMCache's lm server exited with {process.returncode}:\n{log_tail(log)}"
                )
            with contextlib.suppress(OSError), _connected(port):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("LMCache's lm server did not listen within 120 s")
            time.sleep(0.2)
        yield port, process.pid


@contextlib.contextmanager
def _connected(port: int) -> Iterator[None]:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0):
        yield


@contextlib.contextmanager
def lmcache_client(python: str, port: int, server_pid: int) -> Iterator[LMCacheClient]:
    command = [python, str(_CLIENT_SCRIPT), "127.0.0.1", str(port), str(server_pid)]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
        )
        try:
            assert process.stdout is not None
            if not process.stdout.readline():
                raise RuntimeError(f"LMCache's client did not start:\n{log_tail(log)}")
            yield LMCacheClient(process, log)
        finally:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            stop_child(process)


async def measure_size(
    target: str, lmcache: LMCacheClient, block_bytes: int, total_bytes: int, rounds: int
) -> PeerRow:
    layout = layout_for(block_bytes)
    namespace = Namespace(tenant="bench", model_fingerprint=f"peers-{block_bytes}", layout=layout)
    options = ClientOptions()
    tcp_only = dataclasses.replace(options, shared_memory=False)
    async with (
        KVClient(target, namespace, options=options) as client,
        KVClient(target, namespace, options=tcp_only) as tcp_client,
    ):
        ours = KVStoreRounds(client, layout, total_bytes, label="default-")
        over_tcp = KVStoreRounds(tcp_client, layout, total_bytes, label="tcp-")
        await ours.run()  # warm-ups: connections, buffers, the servers' arenas
        await over_tcp.run()
        await asyncio.to_thread(lmcache.run, block_bytes, total_bytes)
        path = "shm" if (client.data_plane or "").startswith("unix:") else "tcp"
        default: list[Round] = []
        tcp: list[Round] = []
        peer: list[Round] = []

        async def lmcache_round() -> Round:
            return await asyncio.to_thread(lmcache.run, block_bytes, total_bytes)

        sides: list[tuple[Callable[[], Awaitable[Round]], list[Round]]] = [
            (ours.run, default),
            (over_tcp.run, tcp),
            (lmcache_round, peer),
        ]
        for index in range(rounds):
            # The order turns each round, so that no store always follows the same one.
            for offset in range(len(sides)):
                run, into = sides[(index + offset) % len(sides)]
                into.append(await run())
    median = statistics.median

    def ratio(mine: list[Round], op: str) -> float:
        pairs = zip(mine, peer, strict=True)
        phases = [(a.put, b.put) if op == "put" else (a.get, b.get) for a, b in pairs]
        return median(kv.gbps / lm.gbps for kv, lm in phases)

    return PeerRow(
        block_bytes=block_bytes,
        path=path,
        put_gbps=median(r.put.gbps for r in default),
        get_gbps=median(r.get.gbps for r in default),
        tcp_put_gbps=median(r.put.gbps for r in tcp),
        tcp_get_gbps=median(r.get.gbps for r in tcp),
        lmcache_put_gbps=median(r.put.gbps for r in peer),
        lmcache_get_gbps=median(r.get.gbps for r in peer),
        put_ratio=ratio(default, "put"),
        get_ratio=ratio(default, "get"),
        tcp_put_ratio=ratio(tcp, "put"),
        tcp_get_ratio=ratio(tcp, "get"),
        put_cpu=median_cpu([r.put for r in default]),
        get_cpu=median_cpu([r.get for r in default]),
        tcp_put_cpu=median_cpu([r.put for r in tcp]),
        tcp_get_cpu=median_cpu([r.get for r in tcp]),
        lmcache_put_cpu=median_cpu([r.put for r in peer]),
        lmcache_get_cpu=median_cpu([r.get for r in peer]),
    )


def add_peers_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lmcache-python",
        required=True,
        help="a Python that imports lmcache: it runs LMCache's lm server and its client",
    )
    parser.add_argument("--block-sizes", default="1MiB,32MiB", help="multiples of 128KiB")
    parser.add_argument("--total", default="512MiB", help="bytes moved per round and size")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (median)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_peers(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        raise SystemExit("kvstore-bench peers: --rounds must be at least 1")
    sizes = [parse_size(part) for part in args.block_sizes.split(",")]
    for size in sizes:
        layout_for(size)  # a size kvstore's layout cannot take is refused before any start
    total = parse_size(args.total)
    version = check_lmcache_python(args.lmcache_python)
    tune_allocator()
    dram = max(2 * total + (256 << 20), 1 << 30)
    flags = ["--dram-bytes", str(dram), "--page-bytes", str(1 << 20), "--log-level", "warning"]
    with (
        spawned_server(flags) as target,
        lmcache_server(args.lmcache_python) as (port, pid),
        lmcache_client(args.lmcache_python, port, pid) as lmcache,
    ):
        rows = [asyncio.run(measure_size(target, lmcache, s, total, args.rounds)) for s in sizes]
    if args.json:
        print(json.dumps({"lmcache": version, "rows": [asdict(row) for row in rows]}, indent=2))
        return 0
    print(
        f"kvstore and LMCache {version}'s lm server, one host, separate processes; "
        f"{human_bytes(total)} per round, median of {args.rounds} rounds; GB/s, and CPU "
        "s/GB as client / server"
    )
    print("block  op   kvstore(path)  ÷LMCache  TCP    ÷LMCache  LMCache  | CPU: kvstore  TCP  LM")
    for row in rows:
        for op in ("put", "get"):
            cpu = [getattr(row, f"{prefix}{op}_cpu") for prefix in ("", "tcp_", "lmcache_")]
            print(
                f"{human_bytes(row.block_bytes):>6} {op}  "
                f"{getattr(row, f'{op}_gbps'):5.2f} ({row.path})  "
                f"{getattr(row, f'{op}_ratio'):5.2f}x   "
                f"{getattr(row, f'tcp_{op}_gbps'):5.2f}  "
                f"{getattr(row, f'tcp_{op}_ratio'):5.2f}x   "
                f"{getattr(row, f'lmcache_{op}_gbps'):5.2f}    | "
                + "  ".join(f"{c.client_s_per_gb:.2f}/{c.server_s_per_gb:.2f}" for c in cpu)
            )
    print(
        "LMCache's lm server acknowledges no PUT: its put ends at an EXIST of the last key, "
        "which it answers after every PUT before it on the connection."
    )
    return 0
