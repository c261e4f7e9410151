"""`kvstore-bench throughput`: put and get GB/s through the client, against plain grpcio
and a bare memcpy.

The kvstore server and the ceiling server each run in their own process; the client
moves torch tensors. For each block size, kvstore and the ceiling take turns for
`rounds` rounds of `total_bytes` each: kvstore as clients use it by default (on this
host: the same-host path, block bytes through shared memory, kvstore.wire.shm), kvstore
on its TCP data plane (`ClientOptions(shared_memory=False)`, kvstore.wire.frames),
kvstore over gRPC alone (`ClientOptions(data_plane=False)`), plain grpcio streaming
raw-bytes messages of `chunk` size (its fastest mode here) and of whole-block size, and
a bare memcpy of the same bytes in this process (kvstore.bench.memcpy), the limit of
any path that copies each byte once. Medians are reported, and each ratio is the median
of the per-round ratios.

A third line, "grpcio + copies", is plain grpcio doing only the per-byte work kvstore's
design requires on top (kvstore.bench.ceiling: a copy into or out of a preallocated
arena on the server, a copy between the message and the caller's tensor on the client,
and one checksum pass where the bytes are verified). It is the most a store built this
way can reach through Python gRPC: the ratio against it is what is left to engineering.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from kvstore.allocator import tune_allocator
from kvstore.bench.ceiling import measure_ceiling
from kvstore.bench.cost import CpuCost, Phase, Round, median_cpu, timed_phase, usable_cores
from kvstore.bench.memcpy import measure_memcpy
from kvstore.bench.nodes import add_nodes_argument, check_nodes, local_cluster
from kvstore.bench.spawn import spawned_ceiling_server, spawned_server
from kvstore.client import ClientOptions, DType, KVClient, KVForm, KVLayout, Namespace
from kvstore.cluster.members import is_cluster_target
from kvstore.enums import Durability
from kvstore.units import human_bytes, parse_size

# Llama-3-8B's KV geometry: 32 layers x 8 KV heads x 128 dims in bf16 = 128 KiB per token.
LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128
BYTES_PER_TOKEN = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2


@dataclass(frozen=True)
class ThroughputRow:
    block_bytes: int
    # the default client's data plane: "shm" (same host) or "tcp"; "cluster": a member's each
    path: str
    put_gbps: float  # kvstore as clients use it by default: shared memory on one host
    get_gbps: float
    tcp_put_gbps: float  # kvstore with ClientOptions(shared_memory=False): the TCP data plane
    tcp_get_gbps: float
    memcpy_gbps: float  # a bare memcpy of the same bytes, one thread
    memcpy_put_ratio: float  # median over rounds of kvstore / memcpy in the same round
    memcpy_get_ratio: float
    grpc_put_gbps: float  # kvstore with ClientOptions(data_plane=False)
    grpc_get_gbps: float
    grpc_put_ratio: float  # median over rounds of kvstore over gRPC / chunked grpcio
    grpc_get_ratio: float
    ceiling_put_gbps: float  # raw grpcio, chunk-sized messages
    ceiling_get_gbps: float
    whole_put_gbps: float  # raw grpcio, one message per block
    whole_get_gbps: float
    put_ratio: float  # median over rounds of kvstore / chunked grpcio in the same round
    get_ratio: float
    copies_put_gbps: float  # chunked grpcio plus kvstore's copies and checksums
    copies_get_gbps: float
    copies_put_ratio: float  # median over rounds of kvstore / grpcio + copies
    copies_get_ratio: float
    # CPU seconds per GB moved, client and server process (medians over rounds).
    put_cpu: CpuCost
    get_cpu: CpuCost
    tcp_put_cpu: CpuCost
    tcp_get_cpu: CpuCost
    memcpy_cpu: CpuCost
    grpc_put_cpu: CpuCost
    grpc_get_cpu: CpuCost
    ceiling_put_cpu: CpuCost
    ceiling_get_cpu: CpuCost
    copies_put_cpu: CpuCost
    copies_get_cpu: CpuCost


def layout_for(block_bytes: int) -> KVLayout:
    if block_bytes % BYTES_PER_TOKEN:
        raise ValueError(f"block size must be a multiple of {human_bytes(BYTES_PER_TOKEN)}")
    return KVLayout(
        num_layers=LAYERS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        dtype=DType.BFLOAT16,
        block_tokens=block_bytes // BYTES_PER_TOKEN,
    )


class KVStoreRounds:
    """Put then get `total_bytes` of `block_bytes` blocks, one round at a time, split
    over `streams` concurrent puts and gets on the client's one channel; `label` keeps
    the keys of several of these apart."""

    def __init__(
        self,
        client: KVClient,
        layout: KVLayout,
        total_bytes: int,
        streams: int = 1,
        label: str = "",
    ) -> None:
        self._client = client
        self._label = label
        self._num_blocks = max(1, total_bytes // layout.block_bytes)
        self._block_bytes = layout.block_bytes
        shape = (self._num_blocks, layout.num_layers, *layout.layer_shape)
        self.source = torch.randn(shape, dtype=torch.float32).to(torch.bfloat16)
        self._source = self.source
        self._dest = torch.empty_like(self._source)
        self._round = 0
        # What the puts' replies said their committed blocks survive, over every round.
        self.durabilities: set[Durability | None] = set()
        step = -(-self._num_blocks // max(1, streams))
        self._shares = [
            slice(first, min(self._num_blocks, first + step))
            for first in range(0, self._num_blocks, step)
        ]

    async def run(self) -> Round:
        """One put then one get, each checked against what was sent."""
        num_blocks, client, shares = self._num_blocks, self._client, self._shares
        keys = [f"{self._label}r{self._round}-b{i}".encode() for i in range(num_blocks)]
        self._round += 1
        moved = num_blocks * self._block_bytes
        committed = got = 0

        async def put_all() -> None:
            nonlocal committed
            results = await asyncio.gather(
                *(client.put_blocks(keys[s], self._source[s], form=KVForm.BLOCKS) for s in shares)
            )
            committed = sum(result.num_committed for result in results)
            self.durabilities.update(result.durability for result in results)

        async def get_all() -> None:
            nonlocal got
            counts = await asyncio.gather(
                *(client.get_into(keys[s], self._dest[s], form=KVForm.BLOCKS) for s in shares)
            )
            got = sum(counts)

        put = await timed_phase(moved, self._server_cpu, put_all)
        if committed != num_blocks:
            raise RuntimeError(f"put stored {committed} of {num_blocks} blocks")
        get = await timed_phase(moved, self._server_cpu, get_all)
        if got != num_blocks or not torch.equal(self._dest[-1], self._source[-1]):
            raise RuntimeError("get returned the wrong blocks")
        await client.delete(keys)
        return Round(put=put, get=get)

    async def _server_cpu(self) -> float:
        return (await self._client.stats()).process_cpu_us / 1e6


def _namespace(layout: KVLayout) -> Namespace:
    return Namespace(
        tenant="bench", model_fingerprint=f"throughput-{layout.block_bytes}", layout=layout
    )


@dataclass(frozen=True)
class Sweep:
    """What `kvstore-bench throughput` measures: each block size in turn."""

    block_sizes: list[int]
    total_bytes: int  # moved per round and size
    rounds: int
    chunk_bytes: int
    streams: int = 1  # concurrent puts and gets, for kvstore and plain grpcio alike
    # False measures clients on glibc's default allocator (the servers stay tuned).
    tune_client_allocator: bool = True


async def measure_size(
    target: str, ceiling_target: str, block_bytes: int, sweep: Sweep
) -> ThroughputRow:
    """kvstore and plain grpcio take turns, round by round; medians of each and of the
    per-round ratios, so a change in the shared machine's speed lands on both sides."""
    layout = layout_for(block_bytes)
    total_bytes, chunk_bytes, streams = sweep.total_bytes, sweep.chunk_bytes, sweep.streams
    options = ClientOptions(chunk_bytes=chunk_bytes, tune_allocator=sweep.tune_client_allocator)
    grpc_only = dataclasses.replace(options, data_plane=False)
    tcp_only = dataclasses.replace(options, shared_memory=False)
    namespace = _namespace(layout)
    async with (
        KVClient(target, namespace, options=options) as client,
        KVClient(target, namespace, options=tcp_only) as tcp_client,
        KVClient(target, namespace, options=grpc_only) as grpc_client,
    ):
        kvstore = KVStoreRounds(client, layout, total_bytes, streams, label="dp-")
        over_tcp = KVStoreRounds(tcp_client, layout, total_bytes, streams, label="tcp-")
        over_grpc = KVStoreRounds(grpc_client, layout, total_bytes, streams, label="grpc-")
        await kvstore.run()  # warms up both processes
        # A cluster client has a data plane per member, none of its own.
        if client.data_plane is None and not is_cluster_target(target):
            raise RuntimeError("the kvstore client did not reach the server's data plane")
        if is_cluster_target(target):
            path = "cluster"  # each member's own: shm or tcp
        else:
            path = "shm" if (client.data_plane or "").startswith("unix:") else "tcp"
        await over_tcp.run()
        await over_grpc.run()
        measure_memcpy(kvstore.source, block_bytes)
        await measure_ceiling(ceiling_target, min(total_bytes, 64 << 20), chunk_bytes)
        await measure_ceiling(ceiling_target, total_bytes, chunk_bytes, with_copies=True)
        ours: list[Round] = []
        ours_tcp: list[Round] = []
        memcpy: list[Phase] = []
        ours_grpc: list[Round] = []
        chunked: list[Round] = []
        whole: list[Round] = []
        copies: list[Round] = []
        for _ in range(sweep.rounds):
            ours.append(await kvstore.run())
            memcpy.append(measure_memcpy(kvstore.source, block_bytes))
            ours_tcp.append(await over_tcp.run())
            ours_grpc.append(await over_grpc.run())
            chunked.append(await measure_ceiling(ceiling_target, total_bytes, chunk_bytes, streams))
            whole.append(await measure_ceiling(ceiling_target, total_bytes, block_bytes, streams))
            copies.append(
                await measure_ceiling(
                    ceiling_target, total_bytes, chunk_bytes, streams, with_copies=True
                )
            )
    median = statistics.median
    return ThroughputRow(
        block_bytes=block_bytes,
        path=path,
        put_gbps=median(r.put.gbps for r in ours),
        get_gbps=median(r.get.gbps for r in ours),
        tcp_put_gbps=median(r.put.gbps for r in ours_tcp),
        tcp_get_gbps=median(r.get.gbps for r in ours_tcp),
        memcpy_gbps=median(m.gbps for m in memcpy),
        memcpy_put_ratio=median(o.put.gbps / m.gbps for o, m in zip(ours, memcpy, strict=True)),
        memcpy_get_ratio=median(o.get.gbps / m.gbps for o, m in zip(ours, memcpy, strict=True)),
        grpc_put_gbps=median(r.put.gbps for r in ours_grpc),
        grpc_get_gbps=median(r.get.gbps for r in ours_grpc),
        grpc_put_ratio=median(
            o.put.gbps / c.put.gbps for o, c in zip(ours_grpc, chunked, strict=True)
        ),
        grpc_get_ratio=median(
            o.get.gbps / c.get.gbps for o, c in zip(ours_grpc, chunked, strict=True)
        ),
        ceiling_put_gbps=median(r.put.gbps for r in chunked),
        ceiling_get_gbps=median(r.get.gbps for r in chunked),
        whole_put_gbps=median(r.put.gbps for r in whole),
        whole_get_gbps=median(r.get.gbps for r in whole),
        put_ratio=median(o.put.gbps / c.put.gbps for o, c in zip(ours, chunked, strict=True)),
        get_ratio=median(o.get.gbps / c.get.gbps for o, c in zip(ours, chunked, strict=True)),
        copies_put_gbps=median(r.put.gbps for r in copies),
        copies_get_gbps=median(r.get.gbps for r in copies),
        copies_put_ratio=median(o.put.gbps / c.put.gbps for o, c in zip(ours, copies, strict=True)),
        copies_get_ratio=median(o.get.gbps / c.get.gbps for o, c in zip(ours, copies, strict=True)),
        put_cpu=median_cpu([r.put for r in ours]),
        get_cpu=median_cpu([r.get for r in ours]),
        tcp_put_cpu=median_cpu([r.put for r in ours_tcp]),
        tcp_get_cpu=median_cpu([r.get for r in ours_tcp]),
        memcpy_cpu=median_cpu(memcpy),
        grpc_put_cpu=median_cpu([r.put for r in ours_grpc]),
        grpc_get_cpu=median_cpu([r.get for r in ours_grpc]),
        ceiling_put_cpu=median_cpu([r.put for r in chunked]),
        ceiling_get_cpu=median_cpu([r.get for r in chunked]),
        copies_put_cpu=median_cpu([r.put for r in copies]),
        copies_get_cpu=median_cpu([r.get for r in copies]),
    )


def run_sweep(
    sweep: Sweep, *, target: str | None = None, nodes: int | None = None
) -> list[ThroughputRow]:
    """Against `target`, else a daemon started here, else (`nodes`) a local cluster of
    that many daemons sharing the same DRAM."""
    if sweep.tune_client_allocator:
        tune_allocator()  # this process runs both clients: kvstore's and the ceiling's
    dram = max(2 * sweep.total_bytes + (256 << 20), 1 << 30)
    # 1 MiB pages, or smaller ones where a block is smaller: a 128 KiB block in a 1 MiB
    # page would take eight times its bytes, and the rounds would not fit.
    page_bytes = min(1 << 20, 1 << (min(sweep.block_sizes).bit_length() - 1))
    with contextlib.ExitStack() as stack:
        if target is None and nodes is not None:
            cluster = local_cluster(
                nodes,
                total_dram_bytes=dram,
                page_bytes=page_bytes,
                server_args=["--log-level", "warning"],
            )
            target = stack.enter_context(cluster).etcd_target
        elif target is None:
            flags = ["--dram-bytes", str(dram), "--page-bytes", str(page_bytes)]
            target = stack.enter_context(spawned_server([*flags, "--log-level", "warning"]))
        ceiling_target = stack.enter_context(spawned_ceiling_server())
        return [
            asyncio.run(measure_size(target, ceiling_target, size, sweep))
            for size in sweep.block_sizes
        ]


def add_throughput_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--block-sizes",
        default="1MiB,32MiB",
        help="comma-separated block sizes (multiples of 128KiB)",
    )
    parser.add_argument("--total", default="512MiB", help="bytes moved per round and size")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (median)")
    parser.add_argument(
        "--streams",
        type=int,
        default=1,
        help="concurrent streams per put and get, for kvstore and plain grpcio alike",
    )
    parser.add_argument("--chunk", default="1MiB", help="stream message payload size")
    parser.add_argument(
        "--untuned-clients",
        action="store_true",
        help="leave this process's allocator at glibc's defaults, as a worker with "
        "ClientOptions(tune_allocator=False) runs; both clients run here, the servers "
        "stay tuned",
    )
    parser.add_argument(
        "--target",
        help="HOST:PORT of a running server, or a cluster: etcd://HOST:PORT/PREFIX or "
        "cluster://H1:P1,H2:P2 (default: start one)",
    )
    add_nodes_argument(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_throughput(args: argparse.Namespace) -> int:
    if args.streams < 1:
        raise SystemExit("--streams must be at least 1")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    nodes = check_nodes(args, "throughput")
    rows = run_sweep(
        Sweep(
            block_sizes=[parse_size(part) for part in args.block_sizes.split(",")],
            total_bytes=parse_size(args.total),
            rounds=args.rounds,
            chunk_bytes=parse_size(args.chunk),
            streams=args.streams,
            tune_client_allocator=not args.untuned_clients,
        ),
        target=args.target,
        nodes=nodes,
    )
    if args.json:
        print(
            json.dumps(
                [asdict(row) for row in rows],
                indent=2,
            )
        )
        return 0
    streams = f", {args.streams} streams each" if args.streams > 1 else ""
    untuned = ", clients on glibc's default allocator" if args.untuned_clients else ""
    table = Table(
        title=f"kvstore put/get vs memcpy and plain grpcio, GB/s (same run, one host, "
        f"separate processes{streams}{untuned})"
    )
    _add_op_rows(
        table,
        [
            "kvstore",
            "÷memcpy",
            "÷grpcio",
            "TCP",
            "gRPC-only",
            "÷grpcio",
            "grpcio",
            "whole",
            "+copies",
            "memcpy",
        ],
        rows,
        lambda line: [
            f"{line.gbps:.2f} ({line.path})",
            f"{line.memcpy_ratio:.2f}x",
            f"{line.ratio:.2f}x",
            f"{line.tcp_gbps:.2f}",
            f"{line.grpc_gbps:.2f}",
            f"{line.grpc_ratio:.2f}x",
            f"{line.plain_gbps:.2f}",
            f"{line.whole_gbps:.2f}",
            f"{line.copies_gbps:.2f}",
            f"{line.memcpy_gbps:.2f}",
        ],
    )
    table.caption = (
        "kvstore: as clients use it by default (shm: block bytes through shared memory, "
        "the same-host path; tcp: its TCP data plane); TCP: "
        "ClientOptions(shared_memory=False); gRPC-only: ClientOptions(data_plane=False); "
        "grpcio: plain grpcio, raw 1-message-per-chunk; whole: plain grpcio, one message "
        "per block; +copies: plain grpcio plus the copies and checksum a gRPC store needs; "
        "memcpy: one bare copy of the same bytes, one thread. Each ÷ is the column to "
        "its left over memcpy or grpcio in the same round"
    )
    console = Console(width=max(Console().width, 170))  # wide tables; piped output too
    console.print(table)
    console.print(_cpu_table(rows))
    cores = usable_cores()
    console.print(
        f"CPU s/GB is client + server process time (all threads) per GB moved. Both share "
        f"this machine's {cores} cores, so cores / total s/GB bounds each line's GB/s "
        f'("bound"); on separate machines the larger side sets the bound instead.'
    )
    return 0


@dataclass(frozen=True)
class _Line:
    """One operation's figures from a row, for the tables."""

    gbps: float
    path: str
    memcpy_ratio: float
    tcp_gbps: float
    memcpy_gbps: float
    ratio: float
    grpc_gbps: float
    grpc_ratio: float
    plain_gbps: float
    whole_gbps: float
    copies_gbps: float
    cpu: CpuCost
    tcp_cpu: CpuCost
    memcpy_cpu: CpuCost
    grpc_cpu: CpuCost
    plain_cpu: CpuCost


def _line(row: ThroughputRow, op: str) -> _Line:
    """The figures of `op` ("put" or "get") in `row`."""

    def field(name: str) -> Any:
        return getattr(row, name.format(op=op))

    return _Line(
        gbps=field("{op}_gbps"),
        path=row.path,
        memcpy_ratio=field("memcpy_{op}_ratio"),
        tcp_gbps=field("tcp_{op}_gbps"),
        memcpy_gbps=row.memcpy_gbps,
        ratio=field("{op}_ratio"),
        grpc_gbps=field("grpc_{op}_gbps"),
        grpc_ratio=field("grpc_{op}_ratio"),
        plain_gbps=field("ceiling_{op}_gbps"),
        whole_gbps=field("whole_{op}_gbps"),
        copies_gbps=field("copies_{op}_gbps"),
        cpu=field("{op}_cpu"),
        tcp_cpu=field("tcp_{op}_cpu"),
        memcpy_cpu=row.memcpy_cpu,
        grpc_cpu=field("grpc_{op}_cpu"),
        plain_cpu=field("ceiling_{op}_cpu"),
    )


def _cpu_table(rows: list[ThroughputRow]) -> Table:
    table = Table(title="CPU seconds per GB moved (client / server), and the GB/s it allows")
    _add_op_rows(
        table,
        ["kvstore", "bound", "TCP", "bound", "gRPC-only", "bound", "grpcio", "bound", "÷grpcio"],
        rows,
        lambda line: [
            *_cpu_cells(line.cpu),
            *_cpu_cells(line.tcp_cpu),
            *_cpu_cells(line.grpc_cpu),
            *_cpu_cells(line.plain_cpu),
            f"{line.cpu.total_s_per_gb / line.plain_cpu.total_s_per_gb:.2f}x",
        ],
    )
    memcpy = ", ".join(
        f"{human_bytes(row.block_bytes)} {row.memcpy_cpu.client_s_per_gb:.3f}" for row in rows
    )
    table.caption = f"memcpy of the same bytes, one thread, CPU s/GB: {memcpy}"
    return table


def _add_op_rows(
    table: Table,
    columns: list[str],
    rows: list[ThroughputRow],
    cells: Callable[[_Line], list[str]],
) -> None:
    """Columns block, op and `columns`; a row per block size and operation."""
    for column in ("block", "op", *columns):
        table.add_column(column, justify="right")
    for row in rows:
        for op in ("put", "get"):
            table.add_row(human_bytes(row.block_bytes), op, *cells(_line(row, op)))


def _cpu_cells(cost: CpuCost) -> tuple[str, str]:
    return (
        f"{cost.client_s_per_gb:.2f} / {cost.server_s_per_gb:.2f}",
        f"{cost.bound_gbps():.2f}",
    )
