"""`kvstore-bench tiers`: the SSD tier against its own disk, write-back puts against DRAM-only.

Two ratios, each from measurements taken in the same run:

- **SSD get / sequential read.** A dataset is written through to SSD; the server is then
  restarted on that directory, so every block lives on SSD only (DRAM is empty) and,
  with `--no-promote-on-hit`, stays there. With the page cache dropped, GetBlocks
  fetches the dataset; the baseline reads the very same block files, cold, one after
  another with plain `readinto` calls, and (for reference) one file of the same size
  written next to them. Goal: >= 0.7x. The same get with the files in the page cache
  and the same get from DRAM (before the restart) show what the get path costs
  without the disk.
- **Raw and lz4.** The SSD get runs twice, with `--ssd-compression off` and `lz4`
  (each on its own directory); the plain reads are of each run's own files, so a
  compressed dataset's baseline reads fewer bytes. **Time to first layer**: from the
  get's request to its first bytes (layer 0 of the first block), cold; its baseline
  is a cold plain read of one block file. The get reads SSD blocks as it streams, so
  the first layer should arrive within about one block's read. It is split in two:
  the same get with the files in the page cache (the get path without the disk), and
  a cold plain read of what the get reads first (block 0's header and layer 0).
- **Write-back put / DRAM-only put.** The same puts (same blocks, same bytes, more
  than DRAM holds) go to a write-back server, which must demote blocks to SSD to take
  them, and to a DRAM-only server, which drops blocks instead. A ratio near 1 means the
  SSD writes stay off the put path.

Servers run in their own processes (`kvstore.bench.spawn`); this process runs the
client and the plain reads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kvstore.allocator import tune_allocator
from kvstore.bench.spawn import spawned_server
from kvstore.bench.throughput import layout_for
from kvstore.client import KVClient, KVForm, Namespace, StoreStats, TierKind
from kvstore.tiers.blockfile import MAX_HEADER_BYTES, decode_header, stored_layer_bytes
from kvstore.units import human_bytes, parse_size

_READ_BUFFER_BYTES = 8 << 20


@dataclass(frozen=True)
class TiersReport:
    block_bytes: int
    get_bytes: int
    get_streams: int
    cache_drop: str  # how reads were made cold
    ssd_get_gbps: float  # cold: page cache dropped
    warm_ssd_get_gbps: float  # the same get with the block files in the page cache
    dram_get_gbps: float  # the same get from DRAM (before the restart)
    same_files_read_gbps: float  # the block files themselves, plain sequential reads
    one_file_read_gbps: float  # one file of the same size on the same filesystem
    first_layer_ms: float  # cold: request to the first reply (layer 0 of block 0)
    one_block_read_ms: float  # cold: a plain read of one block file
    warm_first_layer_ms: float  # the same, block files in the page cache: the get path
    head_read_ms: float  # cold: a plain read of block 0's header and layer 0: the disk
    lz4_ssd_get_gbps: float  # the same cold get, block files written with lz4
    lz4_same_files_read_gbps: float  # plain reads of the lz4 files
    lz4_first_layer_ms: float
    lz4_stored_fraction: float  # the lz4 files' bytes / the raw files' bytes
    put_bytes: int
    dram_bytes: int
    write_back_put_gbps: float
    dram_only_put_gbps: float
    write_back_demotions: int
    write_back_ssd_bytes_written: int
    dram_only_evictions: int

    @property
    def ssd_get_ratio(self) -> float:
        return self.ssd_get_gbps / self.same_files_read_gbps

    @property
    def ssd_get_vs_one_file(self) -> float:
        return self.ssd_get_gbps / self.one_file_read_gbps

    @property
    def write_back_put_ratio(self) -> float:
        return self.write_back_put_gbps / self.dram_only_put_gbps


# -- data ----------------------------------------------------------------------------------------


def make_namespace(block_bytes: int, name: str) -> Namespace:
    return Namespace(
        tenant="bench", model_fingerprint=f"tiers-{name}", layout=layout_for(block_bytes)
    )


def chains(prefix: str, num_blocks: int, chain_blocks: int) -> Iterator[list[bytes]]:
    for start in range(0, num_blocks, chain_blocks):
        count = min(chain_blocks, num_blocks - start)
        yield [f"{prefix}-{start // chain_blocks}-{index}".encode() for index in range(count)]


def source_tensor(namespace: Namespace, num_blocks: int) -> torch.Tensor:
    layout = namespace.layout
    shape = (num_blocks, layout.num_layers, *layout.layer_shape)
    return torch.randn(shape, dtype=torch.float32).to(layout.dtype.torch_dtype)


async def put_all(
    client: KVClient, keys_by_chain: list[list[bytes]], source: torch.Tensor
) -> float:
    """Put every chain (one PutBlocks each); returns the seconds it took."""
    start = time.perf_counter()
    for keys in keys_by_chain:
        result = await client.put_blocks(keys, source[: len(keys)], form=KVForm.BLOCKS)
        if result.num_committed != len(keys):
            raise RuntimeError(f"a put stored {result.num_committed} of {len(keys)} blocks")
    return time.perf_counter() - start


async def wait_for_ssd_writes(client: KVClient, nbytes: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (await client.stats()).tier(TierKind.SSD).bytes_written < nbytes:
        if time.monotonic() > deadline:
            raise RuntimeError("write-through did not finish writing the dataset in time")
        await asyncio.sleep(0.05)


# -- cold reads ------------------------------------------------------------------------------------


def make_cold(paths: list[Path]) -> str:
    """Evict `paths` from the page cache; says how (or that reads may be cached)."""
    os.sync()
    advised = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            advised += 1
        finally:
            os.close(fd)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches + fadvise(DONTNEED)"
    except OSError:
        if advised == len(paths):
            return "fadvise(DONTNEED) only (not root): clean pages of these files evicted"
        return "not dropped: reads may be cached"


def block_files(ssd_dir: Path) -> list[Path]:
    return sorted(ssd_dir.glob("*/*.kvb"))


def read_sequentially(paths: list[Path]) -> tuple[int, float]:
    """Plain reads of whole files, one after another, into one reused buffer."""
    buffer = bytearray(_READ_BUFFER_BYTES)
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while count := file.readinto(view):
                total += count
    return total, time.perf_counter() - start


def write_file(path: Path, nbytes: int) -> None:
    chunk = os.urandom(_READ_BUFFER_BYTES)
    with open(path, "wb") as file:
        for written in range(0, nbytes, len(chunk)):
            file.write(chunk[: min(len(chunk), nbytes - written)])
        file.flush()
        os.fsync(file.fileno())


# -- the two measurements --------------------------------------------------------------------


async def _get_pass(client: KVClient, keys: list[list[bytes]], dests: list[torch.Tensor]) -> float:
    """Fetch every chain, `len(dests)` GetBlocks streams at a time; returns GB/s."""
    pending = iter(keys)
    block_bytes = client.namespace.layout.block_bytes
    got = 0

    async def stream(dest: torch.Tensor) -> None:
        nonlocal got
        for chain in pending:
            served = await client.get_into(chain, dest, form=KVForm.BLOCKS)
            if served != len(chain):
                raise RuntimeError(f"served {served} of {len(chain)} blocks from SSD")
            got += served

    start = time.perf_counter()
    await asyncio.gather(*(stream(dest) for dest in dests))
    return got * block_bytes / (time.perf_counter() - start) / 1e9


async def _fill_ssd(
    target: str, namespace: Namespace, keys: list[list[bytes]], nbytes: int, rounds: int
) -> list[float]:
    """Write the dataset through to SSD; returns GB/s samples of getting it from DRAM."""
    longest = max(len(chain) for chain in keys)
    async with KVClient(target, namespace) as client:
        await put_all(client, keys, source_tensor(namespace, longest))
        await wait_for_ssd_writes(client, nbytes)
        dests = [source_tensor(namespace, longest)]
        return [await _get_pass(client, keys, dests) for _ in range(rounds)]


async def _get_all(
    target: str,
    namespace: Namespace,
    keys: list[list[bytes]],
    rounds: int,
    streams: int,
    ssd_dir: Path,
) -> tuple[list[float], list[float], str]:
    """(cold GB/s samples, page-cache-warm GB/s samples, how reads were made cold)."""
    longest = max(len(chain) for chain in keys)
    dests = [source_tensor(namespace, longest) for _ in range(streams)]
    cold, warm, how = [], [], ""
    async with KVClient(target, namespace) as client:
        for _ in range(rounds):
            how = make_cold(block_files(ssd_dir))
            cold.append(await _get_pass(client, keys, dests))
            # Again, with the files now in the page cache: what the disk itself costs.
            warm.append(await _get_pass(client, keys, dests))
        stats = await client.stats()
    if stats.tier(TierKind.DRAM).num_blocks:
        raise RuntimeError("blocks were promoted into DRAM: the get did not measure the SSD")
    return cold, warm, how


@dataclass(frozen=True)
class GetFigures:
    dram_get_gbps: float
    ssd_get_gbps: float
    warm_ssd_get_gbps: float
    same_files_read_gbps: float
    one_file_read_gbps: float
    cache_drop: str
    first_layer_ms: float
    one_block_read_ms: float
    warm_first_layer_ms: float
    head_read_ms: float
    files_bytes: int


class _FirstBytes:
    """A BlockWriter that notes when the first bytes of the get arrive, and drops them."""

    def __init__(self) -> None:
        self.first_at: float | None = None

    def write(self, block: int, layer: int, offset: int, data: memoryview | bytes) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()

    def write_run(self, first_block: int, num_blocks: int, layer: int, data: memoryview) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()


async def _first_bytes_ms(
    target: str, namespace: Namespace, keys: list[list[bytes]], ssd_dir: Path, rounds: int
) -> tuple[float, float]:
    """Milliseconds from a get's request to its first bytes (layer 0 of block 0), cold
    and with the block files in the page cache (the get path without the disk),
    medians of `rounds`; each get is read to its end. Through the client's block-writer
    path (the one the cluster client uses), which hands over bytes as they arrive, not
    whole layers. A get of another chain first opens the connections."""
    cold, warm = [], []
    async with KVClient(target, namespace) as client:
        async for _ in client._stream_to_writer(keys[-1], _FirstBytes()):
            pass
        for _ in range(rounds):
            make_cold(block_files(ssd_dir))
            cold.append(await _one_first_bytes_ms(client, keys[0], namespace))
            # The get above read the chain's files: they are in the page cache now.
            warm.append(await _one_first_bytes_ms(client, keys[0], namespace))
    return statistics.median(cold), statistics.median(warm)


async def _one_first_bytes_ms(client: KVClient, keys: list[bytes], namespace: Namespace) -> float:
    writer = _FirstBytes()
    num_layers = 0
    start = time.perf_counter()
    async for _ in client._stream_to_writer(keys, writer):
        num_layers += 1
    if writer.first_at is None or num_layers != namespace.layout.num_layers:
        raise RuntimeError("the first-layer get did not serve the chain")
    return (writer.first_at - start) * 1e3


def head_bytes(path: Path) -> int:
    """The bytes of a block file that a get reads first: its header and layer 0."""
    with open(path, "rb") as file:
        start = file.read(MAX_HEADER_BYTES)
    header, payload_offset = decode_header(start)
    return payload_offset + stored_layer_bytes(header, 0)


def read_head_ms(path: Path) -> float:
    """Milliseconds for one plain read of `path`'s first `head_bytes`, as the file is."""
    nbytes = head_bytes(path)
    make_cold([path])
    buffer = bytearray(nbytes)
    with open(path, "rb", buffering=0) as file:
        start = time.perf_counter()
        count = file.readinto(buffer)
        elapsed = time.perf_counter() - start
    if count != nbytes:
        raise RuntimeError(f"{path}: read {count} of its first {nbytes} bytes")
    return elapsed * 1e3


def measure_ssd_get(
    workdir: Path,
    block_bytes: int,
    get_bytes: int,
    chain_blocks: int,
    rounds: int,
    streams: int,
    compression: str = "off",
) -> GetFigures:
    namespace = make_namespace(block_bytes, "ssd-get")
    num_blocks = max(1, get_bytes // block_bytes)
    keys = list(chains("g", num_blocks, chain_blocks))
    ssd_dir = workdir / f"ssd-get-{compression}"
    common = [
        *("--ssd-dir", str(ssd_dir), "--page-bytes", "1MiB", "--log-level", "warning"),
        *("--ssd-compression", compression),
    ]
    dram = str(num_blocks * block_bytes + (64 << 20))
    with spawned_server(
        [*common, "--dram-bytes", dram, "--write-policy", "write-through"]
    ) as target:
        from_dram = asyncio.run(
            _fill_ssd(target, namespace, keys, num_blocks * block_bytes, rounds)
        )
    # A restart leaves every block on SSD only; without promotion it stays there.
    with spawned_server([*common, "--dram-bytes", dram, "--no-promote-on-hit"]) as target:
        cold, warm, how = asyncio.run(_get_all(target, namespace, keys, rounds, streams, ssd_dir))
        first_layer_ms, warm_first_layer_ms = asyncio.run(
            _first_bytes_ms(target, namespace, keys, ssd_dir, rounds)
        )

    # The same bytes, read the plain way: the block files in the order the get read them.
    by_key = {path.stem: path for path in block_files(ssd_dir)}
    files = [by_key[key.hex()] for chain in keys for key in chain]
    one_file = workdir / "sequential.bin"
    write_file(one_file, sum(path.stat().st_size for path in files))
    file_samples, one_samples, block_samples, head_samples = [], [], [], []
    for _ in range(rounds):
        make_cold(files)
        nbytes, seconds = read_sequentially(files)
        file_samples.append(nbytes / seconds / 1e9)
        make_cold([one_file])
        nbytes, seconds = read_sequentially([one_file])
        one_samples.append(nbytes / seconds / 1e9)
        make_cold(files[:1])
        block_samples.append(read_sequentially(files[:1])[1] * 1e3)
        head_samples.append(read_head_ms(files[0]))
    return GetFigures(
        first_layer_ms=first_layer_ms,
        one_block_read_ms=statistics.median(block_samples),
        warm_first_layer_ms=warm_first_layer_ms,
        head_read_ms=statistics.median(head_samples),
        files_bytes=sum(path.stat().st_size for path in files),
        dram_get_gbps=statistics.median(from_dram),
        ssd_get_gbps=statistics.median(cold),
        warm_ssd_get_gbps=statistics.median(warm),
        same_files_read_gbps=statistics.median(file_samples),
        one_file_read_gbps=statistics.median(one_samples),
        cache_drop=how,
    )


async def _put_rounds(
    target: str, namespace: Namespace, put_bytes: int, chain_blocks: int, rounds: int
) -> tuple[list[float], StoreStats]:
    block_bytes = namespace.layout.block_bytes
    num_blocks = max(1, put_bytes // block_bytes)
    source = source_tensor(namespace, chain_blocks)
    samples = []
    async with KVClient(target, namespace) as client:
        await put_all(client, list(chains("warm", chain_blocks, chain_blocks)), source)
        for round_index in range(rounds):
            keys = list(chains(f"p{round_index}", num_blocks, chain_blocks))
            seconds = await put_all(client, keys, source)
            samples.append(num_blocks * block_bytes / seconds / 1e9)
        stats = await client.stats()
    return samples, stats


def measure_puts(
    workdir: Path, block_bytes: int, put_bytes: int, dram_bytes: int, chain_blocks: int, rounds: int
) -> tuple[float, float, StoreStats, StoreStats]:
    """(write-back put GB/s, DRAM-only put GB/s, and each server's Stats afterwards)."""
    common = ["--dram-bytes", str(dram_bytes), "--page-bytes", "1MiB", "--log-level", "warning"]
    namespace = make_namespace(block_bytes, "put")
    ssd_flags = ["--ssd-dir", str(workdir / "ssd-put"), "--write-policy", "write-back"]
    with spawned_server([*common, *ssd_flags]) as target:
        write_back, write_back_stats = asyncio.run(
            _put_rounds(target, namespace, put_bytes, chain_blocks, rounds)
        )
    with spawned_server(common) as target:
        dram_only, dram_stats = asyncio.run(
            _put_rounds(target, namespace, put_bytes, chain_blocks, rounds)
        )
    return (
        statistics.median(write_back),
        statistics.median(dram_only),
        write_back_stats,
        dram_stats,
    )


# -- the command -----------------------------------------------------------------------------


def add_tiers_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block", default="1MiB", help="block size (a multiple of 128KiB)")
    parser.add_argument("--get-bytes", default="256MiB", help="dataset fetched from SSD")
    parser.add_argument("--put-bytes", default="384MiB", help="bytes put per round")
    parser.add_argument(
        "--dram-bytes", default="128MiB", help="DRAM of the put servers (less than --put-bytes)"
    )
    parser.add_argument("--chain-blocks", type=int, default=32, help="blocks per put and get")
    parser.add_argument("--streams", type=int, default=1, help="concurrent GetBlocks streams")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (median)")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the SSD directories and the baseline file go (default: the temp dir)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_tiers(args: argparse.Namespace) -> int:
    tune_allocator()
    block_bytes = parse_size(args.block)
    get_bytes, put_bytes = parse_size(args.get_bytes), parse_size(args.put_bytes)
    dram_bytes = parse_size(args.dram_bytes)
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-tiers-", dir=args.dir))
    try:
        gets = measure_ssd_get(
            workdir, block_bytes, get_bytes, args.chain_blocks, args.rounds, args.streams
        )
        lz4_gets = measure_ssd_get(
            workdir, block_bytes, get_bytes, args.chain_blocks, args.rounds, args.streams, "lz4"
        )
        write_back, dram_only, wb_stats, dram_stats = measure_puts(
            workdir, block_bytes, put_bytes, dram_bytes, args.chain_blocks, args.rounds
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = TiersReport(
        block_bytes=block_bytes,
        get_bytes=get_bytes // block_bytes * block_bytes,
        get_streams=args.streams,
        cache_drop=gets.cache_drop,
        ssd_get_gbps=gets.ssd_get_gbps,
        warm_ssd_get_gbps=gets.warm_ssd_get_gbps,
        dram_get_gbps=gets.dram_get_gbps,
        same_files_read_gbps=gets.same_files_read_gbps,
        one_file_read_gbps=gets.one_file_read_gbps,
        first_layer_ms=gets.first_layer_ms,
        one_block_read_ms=gets.one_block_read_ms,
        warm_first_layer_ms=gets.warm_first_layer_ms,
        head_read_ms=gets.head_read_ms,
        lz4_ssd_get_gbps=lz4_gets.ssd_get_gbps,
        lz4_same_files_read_gbps=lz4_gets.same_files_read_gbps,
        lz4_first_layer_ms=lz4_gets.first_layer_ms,
        lz4_stored_fraction=lz4_gets.files_bytes / gets.files_bytes,
        put_bytes=put_bytes // block_bytes * block_bytes,
        dram_bytes=dram_bytes,
        write_back_put_gbps=write_back,
        dram_only_put_gbps=dram_only,
        write_back_demotions=wb_stats.tier(TierKind.DRAM).demotions,
        write_back_ssd_bytes_written=wb_stats.tier(TierKind.SSD).bytes_written,
        dram_only_evictions=dram_stats.tier(TierKind.DRAM).evictions,
    )
    if args.json:
        print(
            json.dumps(
                asdict(report)
                | {
                    "ssd_get_ratio": report.ssd_get_ratio,
                    "ssd_get_vs_one_file": report.ssd_get_vs_one_file,
                    "write_back_put_ratio": report.write_back_put_ratio,
                    "first_layer_vs_one_block_read": report.first_layer_ms
                    / report.one_block_read_ms,
                },
                indent=2,
            )
        )
        return 0
    print_report(report, workdir.parent)
    return 0


def print_report(report: TiersReport, where: Path) -> None:
    console = Console(width=110)
    table = Table(title=f"kvstore tiers (same run; {human_bytes(report.block_bytes)} blocks)")
    for column in ("measurement", "GB/s", "baseline", "baseline GB/s", "ratio"):
        table.add_column(
            column, justify="left" if column in ("measurement", "baseline") else "right"
        )
    table.add_row(
        f"get {human_bytes(report.get_bytes)} from SSD only, cold, {report.get_streams} stream(s)",
        f"{report.ssd_get_gbps:.2f}",
        "read of the same block files",
        f"{report.same_files_read_gbps:.2f}",
        f"{report.ssd_get_ratio:.2f}x",
    )
    table.add_row(
        "",
        "",
        "read of one file of that size",
        f"{report.one_file_read_gbps:.2f}",
        f"{report.ssd_get_vs_one_file:.2f}x",
    )
    table.add_row(
        "  first bytes (layer 0 of block 0), ms, cold",
        f"{report.first_layer_ms:.1f}",
        "read of one block file (ms)",
        f"{report.one_block_read_ms:.1f}",
        f"{report.first_layer_ms / report.one_block_read_ms:.2f}x",
    )
    table.add_row(
        "    the same, files in page cache (the get path alone)",
        f"{report.warm_first_layer_ms:.1f}",
        "read of its header + layer 0, cold (ms)",
        f"{report.head_read_ms:.1f}",
        f"{report.warm_first_layer_ms / report.head_read_ms:.2f}x",
    )
    table.add_row(
        f"same get, lz4 files ({report.lz4_stored_fraction:.0%} of the raw bytes), cold",
        f"{report.lz4_ssd_get_gbps:.2f}",
        "read of the same lz4 files",
        f"{report.lz4_same_files_read_gbps:.2f}",
        f"{report.lz4_ssd_get_gbps / report.lz4_same_files_read_gbps:.2f}x",
    )
    table.add_row(
        "",
        "",
        "the raw get above",
        f"{report.ssd_get_gbps:.2f}",
        f"{report.lz4_ssd_get_gbps / report.ssd_get_gbps:.2f}x",
    )
    table.add_row(
        "  first bytes (layer 0 of block 0), ms, lz4, cold",
        f"{report.lz4_first_layer_ms:.1f}",
        "read of one block file (ms)",
        f"{report.one_block_read_ms:.1f}",
        f"{report.lz4_first_layer_ms / report.one_block_read_ms:.2f}x",
    )
    table.add_row(
        "  same get, files in page cache",
        f"{report.warm_ssd_get_gbps:.2f}",
        "(the get path without the disk)",
        "",
        "",
    )
    table.add_row(
        "  same get from DRAM",
        f"{report.dram_get_gbps:.2f}",
        "(before the restart)",
        "",
        "",
    )
    table.add_row(
        f"put {human_bytes(report.put_bytes)}, write-back",
        f"{report.write_back_put_gbps:.2f}",
        "the same puts, DRAM only",
        f"{report.dram_only_put_gbps:.2f}",
        f"{report.write_back_put_ratio:.2f}x",
    )
    console.print(table)
    console.print(
        f"cold reads: {report.cache_drop}; files under {where}. "
        f"DRAM {human_bytes(report.dram_bytes)} on both put servers: write-back demoted "
        f"{report.write_back_demotions} blocks ({human_bytes(report.write_back_ssd_bytes_written)}"
        f" written to SSD), DRAM-only evicted {report.dram_only_evictions}."
    )
