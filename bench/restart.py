"""`kvstore-bench restart`: how soon a restarted daemon serves, by how much its SSD holds.

For each size, block files are written straight through the SSD tier's own writer (real
headers, real per-layer checksums, chains of `--chain-blocks`), the page cache is
emptied of them (fadvise DONTNEED, per file), and `kvstore-server` is started on the
directory. Timed from the spawn:

- **serving**: the first LookupPrefix answered (blocks not yet indexed are misses);
- **indexed**: Stats counts every block on SSD and no longer names the tier recovering.

Baselines from the same run: the same spawn on an empty directory (what start-up costs
with no data); a plain sequential read of the same files, cold (what the old restart,
which read and verified every byte first, cost at least); and the whole rebuild run in
this process on its own (`kvstore.recovery.recover_index`, cold): the rebuild's cost
without the daemon around it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvstore.bench.spawn import free_port
from kvstore.bench.tiers import read_sequentially
from kvstore.checksum import ChecksumKind, checksum
from kvstore.client import ClientOptions, KVClient, TierKind
from kvstore.config import StoreConfig
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.pool import BlockPool
from kvstore.recovery import recover_index
from kvstore.tiers.blockfile import BlockFileHeader
from kvstore.tiers.ssd import SsdLocation, SsdTier
from kvstore.units import human_bytes, parse_size

# 32 layers, as Llama-class models have: the header carries 32 layer checksums.
_LAYERS, _KV_HEADS, _HEAD_DIM = 32, 1, 128
_BYTES_PER_TOKEN = 2 * _LAYERS * _KV_HEADS * _HEAD_DIM * DType.BFLOAT16.itemsize
_WRITER_THREADS = 4
_POLL_S = 0.01
_START_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class RestartRow:
    data_bytes: int  # payload bytes on SSD
    num_files: int
    file_bytes: int  # on disk, headers included
    write_s: float  # writing the dataset (not part of any ratio)
    empty_serving_s: float  # spawn → first lookup answered, empty SSD directory
    serving_s: float  # spawn → first lookup answered, this dataset
    indexed_s: float  # spawn → every block indexed
    rebuild_s: float  # recover_index alone, in this process
    sequential_read_s: float  # plain read of every file, one after another
    cache_drop: str

    @property
    def serving_over_empty(self) -> float:
        return self.serving_s / self.empty_serving_s

    @property
    def indexed_over_read(self) -> float:
        return self.indexed_s / self.sequential_read_s

    @property
    def rebuild_over_read(self) -> float:
        return self.rebuild_s / self.sequential_read_s


def add_restart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", default="64MiB", help="comma-separated payload sizes, e.g. 1GiB,8GiB"
    )
    parser.add_argument("--block-bytes", default="32KiB", help="block size (32 layers)")
    parser.add_argument("--chain-blocks", type=int, default=16, help="blocks per chain")
    parser.add_argument("--workdir", type=Path, help="where to write (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_restart(args: argparse.Namespace) -> int:
    block_bytes = parse_size(args.block_bytes)
    namespace = make_namespace(block_bytes)
    sizes = [parse_size(size) for size in args.sizes.split(",")]
    base = Path(tempfile.mkdtemp(prefix="kvstore-restart-", dir=args.workdir))
    rows = []
    try:
        free_bytes = shutil.disk_usage(base).free
        if max(sizes) * 1.1 > free_bytes:
            raise SystemExit(
                f"{human_bytes(max(sizes))} do not fit in {human_bytes(free_bytes)} free "
                f"under {base}; pass --workdir or smaller --sizes"
            )
        empty_dir = base / "empty"
        empty_serving_s = time_restart(empty_dir, namespace, 0, [])[0]
        for size in sizes:
            ssd_dir = base / "ssd"
            rows.append(measure(ssd_dir, namespace, size, args.chain_blocks, empty_serving_s))
            shutil.rmtree(ssd_dir)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
    else:
        print_rows(rows, block_bytes)
    return 0


def make_namespace(block_bytes: int) -> Namespace:
    if block_bytes % _BYTES_PER_TOKEN:
        raise SystemExit(f"--block-bytes must be a multiple of {human_bytes(_BYTES_PER_TOKEN)}")
    layout = KVLayout(
        num_layers=_LAYERS,
        num_kv_heads=_KV_HEADS,
        head_dim=_HEAD_DIM,
        dtype=DType.BFLOAT16,
        block_tokens=block_bytes // _BYTES_PER_TOKEN,
    )
    return Namespace(tenant="bench", model_fingerprint="restart", layout=layout)


def measure(
    ssd_dir: Path, namespace: Namespace, size: int, chain_blocks: int, empty_serving_s: float
) -> RestartRow:
    num_blocks = max(1, size // namespace.layout.block_bytes)
    chains = list(chain_keys(num_blocks, chain_blocks))
    start = time.perf_counter()
    write_dataset(ssd_dir, namespace, chains)
    write_s = time.perf_counter() - start
    paths = sorted(ssd_dir.glob("*/*.kvb"))
    file_bytes = sum(path.stat().st_size for path in paths)
    cache_drop = make_cold(paths)
    serving_s, indexed_s = time_restart(ssd_dir, namespace, num_blocks, chains[-1])
    make_cold(paths)
    rebuild_s = time_rebuild(ssd_dir, file_bytes)
    make_cold(paths)
    read_bytes, sequential_read_s = read_sequentially(paths)
    if read_bytes != file_bytes:
        raise RuntimeError(f"read {read_bytes} of {file_bytes} B")
    return RestartRow(
        data_bytes=num_blocks * namespace.layout.block_bytes,
        num_files=len(paths),
        file_bytes=file_bytes,
        write_s=write_s,
        empty_serving_s=empty_serving_s,
        serving_s=serving_s,
        indexed_s=indexed_s,
        rebuild_s=rebuild_s,
        sequential_read_s=sequential_read_s,
        cache_drop=cache_drop,
    )


# -- the dataset -----------------------------------------------------------------------------


def chain_keys(num_blocks: int, chain_blocks: int) -> Iterator[list[bytes]]:
    for start in range(0, num_blocks, chain_blocks):
        count = min(chain_blocks, num_blocks - start)
        yield [f"c{start // chain_blocks:07d}-{index:04d}".encode() for index in range(count)]


def write_dataset(ssd_dir: Path, namespace: Namespace, chains: list[list[bytes]]) -> None:
    """Every chain's block files, as the SSD tier writes them (one payload, reused)."""
    layout = namespace.layout
    data = os.urandom(layout.block_bytes)
    kind = ChecksumKind.XXH3_64
    checksums = tuple(
        checksum(kind, data[layer * layout.layer_bytes : (layer + 1) * layout.layer_bytes])
        for layer in range(layout.num_layers)
    )
    ssd = SsdTier(ssd_dir, 1 << 62, fsync=False)

    def write_chain(keys: list[bytes]) -> None:
        parent = b""
        for key in keys:
            header = BlockFileHeader(namespace, key, parent, kind, checksums)
            location = SsdLocation(ssd.path_for(namespace, key), ssd.file_bytes(header))
            ssd.write_block(location, header, [data])
            parent = key

    try:
        with ThreadPoolExecutor(_WRITER_THREADS) as executor:
            for _ in executor.map(write_chain, chains):
                pass
    finally:
        ssd.close()
    os.sync()


def make_cold(paths: list[Path]) -> str:
    """Evict these files' pages from the page cache (they are clean after os.sync)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise(DONTNEED) per file"


# -- the measurements ------------------------------------------------------------------------


def time_restart(
    ssd_dir: Path, namespace: Namespace, num_blocks: int, last_chain: list[bytes]
) -> tuple[float, float]:
    """Spawn the daemon; seconds to the first lookup answered and to a whole index."""
    port = free_port()
    command = [
        *(sys.executable, "-m", "kvstore.server.main", "--listen", f"127.0.0.1:{port}"),
        *("--ssd-dir", str(ssd_dir), "--ssd-bytes", str(1 << 50)),
        *("--dram-bytes", "64MiB", "--log-level", "warning", "--data-port", "-1"),
    ]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        # A gRPC channel opened before the port listens backs off for a second or more:
        # wait for the port itself first.
        _wait_for_port(port, start, process)
        return asyncio.run(_time_lookups(port, namespace, num_blocks, last_chain, start))
    finally:
        process.terminate()
        process.wait(timeout=60)


def _wait_for_port(port: int, start: float, process: subprocess.Popen[bytes]) -> None:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if process.poll() is not None or time.perf_counter() - start > _START_TIMEOUT_S:
            raise RuntimeError("the daemon did not start listening")
        time.sleep(_POLL_S)


async def _time_lookups(
    port: int, namespace: Namespace, num_blocks: int, last_chain: list[bytes], start: float
) -> tuple[float, float]:
    options = ClientOptions(data_plane=False)
    async with KVClient(f"127.0.0.1:{port}", namespace, options=options) as client:
        await client.lookup_keys(last_chain)
        serving_s = time.perf_counter() - start
        while True:
            ssd = (await client.stats()).tier(TierKind.SSD)
            if ssd.name == "ssd" and ssd.num_blocks == num_blocks:
                break
            if time.perf_counter() - start > _START_TIMEOUT_S:
                raise RuntimeError("the daemon did not index its SSD in time")
            await asyncio.sleep(_POLL_S)
        indexed_s = time.perf_counter() - start
        matched = (await client.lookup_keys(last_chain)).num_matched
        if matched != len(last_chain):
            raise RuntimeError(f"the last chain matched {matched} of {len(last_chain)} blocks")
    return serving_s, indexed_s


def time_rebuild(ssd_dir: Path, file_bytes: int) -> float:
    """The synchronous rebuild of every block, in this process."""
    pool = BlockPool(StoreConfig(dram_bytes=1 << 20, ssd_dir=str(ssd_dir), ssd_bytes=1 << 50))
    try:
        start = time.perf_counter()
        recover_index(pool)
        rebuild_s = time.perf_counter() - start
        indexed_bytes = pool.ssd.used_bytes if pool.ssd is not None else 0
        if indexed_bytes != file_bytes:
            raise RuntimeError(f"the rebuild indexed {indexed_bytes} of {file_bytes} B")
    finally:
        pool.close()
    return rebuild_s


def print_rows(rows: list[RestartRow], block_bytes: int) -> None:
    console = Console(width=140)
    table = Table(title=f"kvstore restart (same run; {human_bytes(block_bytes)} blocks, cold)")
    columns = (
        "SSD data",
        "files",
        "serving s",
        "÷ empty dir",
        "indexed s",
        "rebuild alone s",
        "sequential read s",
        "indexed ÷ read",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            human_bytes(row.data_bytes),
            f"{row.num_files:,}",
            f"{row.serving_s:.2f}",
            f"{row.serving_over_empty:.2f}x",
            f"{row.indexed_s:.2f}",
            f"{row.rebuild_s:.2f}",
            f"{row.sequential_read_s:.2f}",
            f"{row.indexed_over_read:.2f}x",
        )
    console.print(table)
    if rows:
        console.print(
            f"serving: spawn to the first lookup answered; empty dir: the same on an empty "
            f"SSD directory ({rows[0].empty_serving_s:.2f} s); indexed: spawn until Stats "
            f"counts every block; rebuild alone: recover_index in this process; cold: "
            f"{rows[0].cache_drop}."
        )
