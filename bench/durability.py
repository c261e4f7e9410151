"""`kvstore-bench durability`: the price of durability, as put GB/s against DRAM-only.

The same puts (the same blocks, byte for byte) go to daemons started as separate
processes, one per setting:

- DRAM only: no SSD tier; COMMITTED means the block is in memory.
- write-back: an SSD tier that puts never wait for; blocks reach it when DRAM passes its
  high watermark. With the default `--dram-bytes` DRAM holds two rounds, so this line
  is the price of having the tier at all (`kvstore-bench tiers` measures write-back
  puts into a DRAM they overflow).
- write-through: each put is answered once its blocks' files are renamed into place.
- write-through + fsync (`ssd_fsync`): and once each file and its directory are fsynced.

Rounds take turns across the daemons, so a change in the shared machine's speed lands
on all of them; each turn starts with the next setting, and every round starts after a
sync, so no round pays for the page cache another left dirty. Each ratio is the median
over rounds of the put's GB/s against the DRAM-only put of the same turn. The rounds,
the timer and the CPU accounting are the throughput bench's (`KVStoreRounds`,
`kvstore.bench.cost`): each round puts, then gets and compares, then deletes its
blocks, so the SSD holds at most one round. The durability column is what the puts'
replies said; a setting whose replies say less than it should is an error, not a
figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

from kvstore.allocator import tune_allocator
from kvstore.bench.cost import CpuCost, Phase, median_cpu, usable_cores
from kvstore.bench.report import emit, wide_console
from kvstore.bench.spawn import spawned_server
from kvstore.bench.throughput import KVStoreRounds, layout_for
from kvstore.client import ClientOptions, KVClient, KVLayout, Namespace, TierKind
from kvstore.enums import Durability
from kvstore.units import human_bytes, parse_size

_SOURCE_SEED = 0  # every setting puts the very same bytes


@dataclass(frozen=True)
class Setting:
    name: str
    ssd_flags: tuple[str, ...]  # empty: no SSD tier
    promised: Durability  # what every put's reply must say


DRAM_ONLY = Setting("DRAM only", (), Durability.DURABLE_IN_MEMORY)
SETTINGS = (
    DRAM_ONLY,
    Setting("write-back", ("--write-policy", "write-back"), Durability.DURABLE_IN_MEMORY),
    Setting("write-through", ("--write-policy", "write-through"), Durability.DURABLE_ON_SSD),
    Setting(
        "write-through + fsync",
        ("--write-policy", "write-through", "--ssd-fsync"),
        Durability.DURABLE_ON_SSD_FSYNCED,
    ),
)


@dataclass(frozen=True)
class DurabilityRow:
    setting: str
    durability: str  # what the puts' replies said
    put_gbps: float  # median over rounds
    ratio: float  # median over rounds of put GB/s / DRAM-only put GB/s in the same turn
    put_cpu: CpuCost  # medians over rounds, client and server
    ssd_bytes_written: int  # over the whole run, warm-up included


@dataclass(frozen=True)
class DurabilityReport:
    block_bytes: int
    round_bytes: int  # put per round and setting
    rounds: int
    streams: int
    dram_bytes: int
    ssd_dir: str
    ssd_filesystem: str
    rows: list[DurabilityRow]


@dataclass(frozen=True)
class _Run:
    """What one setting's daemon did over the run."""

    puts: list[Phase]
    durabilities: set[Durability | None]
    ssd_bytes_written: int


def filesystem_of(path: Path) -> str:
    """The type of the filesystem `path` lives on ("ext4", "tmpfs", ...), from /proc/mounts."""
    resolved = str(path.resolve())
    best, kind = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            mount_point = fields[1]
            within = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
            if within and len(mount_point) > len(best):
                best, kind = mount_point, fields[2]
    return kind


async def _measure(
    targets: dict[str, str],
    layout: KVLayout,
    round_bytes: int,
    rounds: int,
    streams: int,
    chunk_bytes: int,
) -> dict[str, _Run]:
    namespace = Namespace(
        tenant="bench", model_fingerprint=f"durability-{layout.block_bytes}", layout=layout
    )
    options = ClientOptions(chunk_bytes=chunk_bytes)
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, KVClient] = {}
        runners: dict[str, KVStoreRounds] = {}
        for setting in SETTINGS:
            client = KVClient(targets[setting.name], namespace, options=options)
            clients[setting.name] = await stack.enter_async_context(client)
            torch.manual_seed(_SOURCE_SEED)
            runners[setting.name] = KVStoreRounds(client, layout, round_bytes, streams)
        for runner in runners.values():
            await runner.run()  # warms up both processes
        puts: dict[str, list[Phase]] = {name: [] for name in runners}
        names = list(runners)
        for number in range(rounds):
            # Each turn starts with another setting, so none always follows the fsyncs.
            for name in names[number % len(names) :] + names[: number % len(names)]:
                # The disk settles first: a round pays for no other round's dirty pages.
                await asyncio.to_thread(os.sync)
                puts[name].append((await runners[name].run()).put)
        runs = {}
        for name, client in clients.items():
            stats = await client.stats()
            ssd = [tier for tier in stats.tiers if tier.tier is TierKind.SSD]
            runs[name] = _Run(
                puts=puts[name],
                durabilities=runners[name].durabilities,
                ssd_bytes_written=ssd[0].bytes_written if ssd else 0,
            )
    return runs


def _rows(runs: dict[str, _Run]) -> list[DurabilityRow]:
    baseline = runs[DRAM_ONLY.name].puts
    rows = []
    for setting in SETTINGS:
        run = runs[setting.name]
        if run.durabilities != {setting.promised}:
            said = sorted(str(durability) for durability in run.durabilities)
            raise RuntimeError(
                f"{setting.name}: the puts' replies said {said}, not only "
                f"{setting.promised.name}: this daemon does not keep the promise measured"
            )
        rows.append(
            DurabilityRow(
                setting=setting.name,
                durability=setting.promised.name,
                put_gbps=statistics.median(phase.gbps for phase in run.puts),
                ratio=statistics.median(
                    phase.gbps / base.gbps for phase, base in zip(run.puts, baseline, strict=True)
                ),
                put_cpu=median_cpu(run.puts),
                ssd_bytes_written=run.ssd_bytes_written,
            )
        )
    return rows


def measure_durability(
    workdir: Path,
    block_bytes: int,
    round_bytes: int,
    rounds: int,
    streams: int,
    chunk_bytes: int,
    dram_bytes: int | None,
) -> DurabilityReport:
    """Start one daemon per setting (SSD directories under `workdir`) and measure."""
    layout = layout_for(block_bytes)
    dram = dram_bytes if dram_bytes is not None else 2 * round_bytes + (256 << 20)
    common = ["--dram-bytes", str(dram), "--page-bytes", "1MiB", "--log-level", "warning"]
    with contextlib.ExitStack() as stack:
        targets = {}
        for number, setting in enumerate(SETTINGS):
            ssd = ["--ssd-dir", str(workdir / f"ssd-{number}")] if setting.ssd_flags else []
            flags = [*common, *ssd, *setting.ssd_flags]
            targets[setting.name] = stack.enter_context(spawned_server(flags))
        runs = asyncio.run(_measure(targets, layout, round_bytes, rounds, streams, chunk_bytes))
    num_blocks = max(1, round_bytes // block_bytes)
    return DurabilityReport(
        block_bytes=block_bytes,
        round_bytes=num_blocks * block_bytes,
        rounds=rounds,
        streams=streams,
        dram_bytes=dram,
        ssd_dir=str(workdir),
        ssd_filesystem=filesystem_of(workdir),
        rows=_rows(runs),
    )


# -- the command -----------------------------------------------------------------------------


def add_durability_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block", default="1MiB", help="block size (a multiple of 128KiB)")
    parser.add_argument("--total", default="256MiB", help="bytes put per round and setting")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (median)")
    parser.add_argument("--streams", type=int, default=1, help="concurrent puts per round")
    parser.add_argument("--chunk", default="1MiB", help="stream message payload size")
    parser.add_argument(
        "--dram-bytes",
        default=None,
        help="each daemon's DRAM, at least --total (default: room for two rounds, so "
        "write-back never demotes during a put)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the SSD directories go (default: the temp dir); put it on the disk "
        "whose price you want",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_durability(args: argparse.Namespace) -> int:
    if args.streams < 1 or args.rounds < 1:
        raise SystemExit("--streams and --rounds must be at least 1")
    round_bytes = parse_size(args.total)
    dram_bytes = parse_size(args.dram_bytes) if args.dram_bytes else None
    if dram_bytes is not None and dram_bytes < round_bytes:
        raise SystemExit(
            "--dram-bytes must hold a round (--total): the DRAM-only daemon would drop "
            "blocks of the round before its get checks them"
        )
    tune_allocator()
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-durability-", dir=args.dir))
    try:
        report = measure_durability(
            workdir,
            block_bytes=parse_size(args.block),
            round_bytes=round_bytes,
            rounds=args.rounds,
            streams=args.streams,
            chunk_bytes=parse_size(args.chunk),
            dram_bytes=dram_bytes,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return emit(report, args.json, print_report)


def print_report(report: DurabilityReport) -> None:
    console = wide_console()
    table = Table(
        title=f"the price of durability: put GB/s, {human_bytes(report.block_bytes)} blocks, "
        f"{human_bytes(report.round_bytes)} a round, {report.streams} stream(s), same run"
    )
    for column in ("setting", "reply says", "put GB/s", "÷DRAM only", "CPU s/GB", "SSD written"):
        table.add_column(column, justify="left" if column in ("setting", "reply says") else "right")
    for row in report.rows:
        table.add_row(
            row.setting,
            row.durability,
            f"{row.put_gbps:.2f}",
            f"{row.ratio:.2f}x",
            f"{row.put_cpu.client_s_per_gb:.2f} / {row.put_cpu.server_s_per_gb:.2f}",
            human_bytes(row.ssd_bytes_written),
        )
    table.caption = (
        f"median of {report.rounds} rounds; ÷DRAM only is the median of per-round ratios; "
        f"CPU s/GB is client / server process time per GB put"
    )
    console.print(table)
    console.print(
        f"Each daemon is its own process with {human_bytes(report.dram_bytes)} of DRAM; SSD "
        f"directories were under {report.ssd_dir} ({report.ssd_filesystem}). Client and daemons "
        f"share this machine's {usable_cores()} cores."
    )
