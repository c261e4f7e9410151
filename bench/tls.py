"""`kvstore-bench tls`: the price of TLS on the data plane, as put and get GB/s against
plaintext in the same run.

Two daemons, each its own process with the same settings, one serving plaintext and one
TLS with a throwaway certificate (trustme) made for the run. The same client code puts
then gets the same blocks on each, over the data plane (the run fails if a transfer
took gRPC instead). Rounds take turns across the two, each turn starting with the other,
so a change in the shared machine's speed lands on both; a ratio is the median over
rounds of TLS GB/s against the plaintext GB/s of the same turn. The rounds and the timer
are the throughput bench's (`KVStoreRounds`, `kvstore.bench.cost`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
import trustme
from rich.table import Table

from kvstore.allocator import tune_allocator
from kvstore.bench.cost import Phase, Round, usable_cores
from kvstore.bench.report import emit, wide_console
from kvstore.bench.spawn import spawned_server
from kvstore.bench.throughput import KVStoreRounds, layout_for
from kvstore.bench.tls_ceiling import BareStream, StreamCertificates, StreamRound
from kvstore.client import ClientOptions, KVClient, Namespace, TLSOptions
from kvstore.units import human_bytes, parse_size
from kvstore.wire.tls import client_context

_SOURCE_SEED = 0  # both daemons get the very same bytes
PLAINTEXT, TLS = "plaintext", "TLS"


@dataclass(frozen=True)
class TLSRow:
    block_bytes: int
    round_bytes: int  # put, then got, per round and daemon
    plain_put_gbps: float  # medians over rounds
    plain_get_gbps: float
    tls_put_gbps: float
    tls_get_gbps: float
    put_ratio: float  # median over rounds of TLS / plaintext GB/s in the same turn
    get_ratio: float


@dataclass(frozen=True)
class CeilingFigures:
    """The bare stream (kvstore.bench.tls_ceiling): the ssl module alone, no kvstore code."""

    round_bytes: int
    write_bytes: int
    plain_gbps: float  # medians over rounds
    tls_gbps: float
    ratio: float  # median over rounds of TLS / plaintext GB/s in the same turn
    plain_send_cpu_s_per_gb: float
    plain_recv_cpu_s_per_gb: float
    tls_send_cpu_s_per_gb: float
    tls_recv_cpu_s_per_gb: float


@dataclass(frozen=True)
class TLSReport:
    rounds: int
    streams: int
    tls_version: str  # what the data plane negotiated
    rows: list[TLSRow]
    ceiling: CeilingFigures


def make_certificates(directory: Path) -> StreamCertificates:
    """A throwaway CA and a server certificate for 127.0.0.1, as PEM files."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    (directory / "server.pem").write_bytes(b"".join(p.bytes() for p in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(directory / "server.key"))
    return StreamCertificates(
        str(directory / "ca.pem"), str(directory / "server.pem"), str(directory / "server.key")
    )


async def _measure_block(
    targets: dict[str, str],
    tls: TLSOptions,
    block_bytes: int,
    round_bytes: int,
    rounds: int,
    streams: int,
) -> tuple[TLSRow, str]:
    layout = layout_for(block_bytes)
    namespace = Namespace(tenant="bench", model_fingerprint=f"tls-{block_bytes}", layout=layout)
    chunk_bytes = min(block_bytes, 1 << 20)
    # Both on the TCP data plane: on one host the same-host path would carry both.
    options = {
        PLAINTEXT: ClientOptions(chunk_bytes=chunk_bytes, shared_memory=False),
        TLS: ClientOptions(chunk_bytes=chunk_bytes, tls=tls, shared_memory=False),
    }
    async with contextlib.AsyncExitStack() as stack:
        runners: dict[str, KVStoreRounds] = {}
        clients: dict[str, KVClient] = {}
        for name in (PLAINTEXT, TLS):
            client = KVClient(targets[name], namespace, options=options[name])
            clients[name] = await stack.enter_async_context(client)
            torch.manual_seed(_SOURCE_SEED)
            runners[name] = KVStoreRounds(client, layout, round_bytes, streams)
        for name, runner in runners.items():
            before = (await clients[name].stats()).data_plane_transfers
            await runner.run()  # warms up both processes
            if (await clients[name].stats()).data_plane_transfers <= before:
                raise RuntimeError(f"{name}: the transfers went over gRPC, not the data plane")
        measured: dict[str, list[Round]] = {PLAINTEXT: [], TLS: []}
        names = list(runners)
        for number in range(rounds):
            for name in names[number % 2 :] + names[: number % 2]:
                measured[name].append(await runners[name].run())
        port = (await clients[TLS].stats()).data_plane_port
    assert tls.ca_file is not None
    host = targets[TLS].rpartition(":")[0]
    version = await asyncio.to_thread(negotiated_version, host, port, tls.ca_file)
    plain, secure = measured[PLAINTEXT], measured[TLS]
    pairs = list(zip(secure, plain, strict=True))
    return (
        TLSRow(
            block_bytes=block_bytes,
            round_bytes=max(1, round_bytes // block_bytes) * block_bytes,
            plain_put_gbps=_median([r.put for r in plain]),
            plain_get_gbps=_median([r.get for r in plain]),
            tls_put_gbps=_median([r.put for r in secure]),
            tls_get_gbps=_median([r.get for r in secure]),
            put_ratio=statistics.median(s.put.gbps / p.put.gbps for s, p in pairs),
            get_ratio=statistics.median(s.get.gbps / p.get.gbps for s, p in pairs),
        ),
        version,
    )


def negotiated_version(host: str, port: int, ca_file: str) -> str:
    """The TLS version a data-plane connection settles on (e.g. "TLSv1.3"), with the
    context the client library uses."""
    context = client_context(ca_file, None, None)
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as wrapped,
    ):
        return wrapped.version() or "unknown"


def _median(phases: list[Phase]) -> float:
    return statistics.median(phase.gbps for phase in phases)


def measure_ceiling(
    certificates: StreamCertificates, round_bytes: int, rounds: int, write_bytes: int = 1 << 20
) -> CeilingFigures:
    """Plaintext and TLS bare streams of `round_bytes` a round, taking turns like the
    daemons do; run before the daemons start, so they take no core from it."""
    measured: dict[str, list[StreamRound]] = {PLAINTEXT: [], TLS: []}
    with (
        BareStream(round_bytes, write_bytes) as plain,
        BareStream(round_bytes, write_bytes, certificates) as tls,
    ):
        streams = {PLAINTEXT: plain, TLS: tls}
        names = list(streams)
        for number in range(rounds):
            for name in names[number % 2 :] + names[: number % 2]:
                measured[name].append(streams[name].round())

    def median(name: str, field: str) -> float:
        return float(statistics.median(getattr(one, field) for one in measured[name]))

    return CeilingFigures(
        round_bytes=round_bytes,
        write_bytes=write_bytes,
        plain_gbps=median(PLAINTEXT, "gbps"),
        tls_gbps=median(TLS, "gbps"),
        ratio=statistics.median(
            s.gbps / p.gbps for s, p in zip(measured[TLS], measured[PLAINTEXT], strict=True)
        ),
        plain_send_cpu_s_per_gb=median(PLAINTEXT, "send_cpu_s_per_gb"),
        plain_recv_cpu_s_per_gb=median(PLAINTEXT, "recv_cpu_s_per_gb"),
        tls_send_cpu_s_per_gb=median(TLS, "send_cpu_s_per_gb"),
        tls_recv_cpu_s_per_gb=median(TLS, "recv_cpu_s_per_gb"),
    )


def measure_tls(
    workdir: Path, block_sizes: list[int], round_bytes: int, rounds: int, streams: int
) -> TLSReport:
    certificates = make_certificates(workdir)
    tls = TLSOptions(ca_file=certificates.ca_file)
    credentials = grpc.ssl_channel_credentials(Path(certificates.ca_file).read_bytes())
    dram = 2 * max(round_bytes, max(block_sizes)) + (256 << 20)
    common = ["--dram-bytes", str(dram), "--page-bytes", "1MiB", "--log-level", "warning"]
    common += ["--max-message-bytes", "8MiB"]
    tls_flags = ["--tls-cert", certificates.cert_file, "--tls-key", certificates.key_file]
    ceiling = measure_ceiling(certificates, round_bytes, rounds)
    with contextlib.ExitStack() as stack:
        targets = {
            PLAINTEXT: stack.enter_context(spawned_server(common)),
            TLS: stack.enter_context(
                spawned_server([*common, *tls_flags], credentials=credentials)
            ),
        }
        rows, version = [], "unknown"
        for block_bytes in block_sizes:
            row, version = asyncio.run(
                _measure_block(targets, tls, block_bytes, round_bytes, rounds, streams)
            )
            rows.append(row)
    return TLSReport(
        rounds=rounds, streams=streams, tls_version=version, rows=rows, ceiling=ceiling
    )


# -- the command -----------------------------------------------------------------------------


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--blocks", default="1MiB,32MiB", help="block sizes, comma-separated (multiples of 128KiB)"
    )
    parser.add_argument("--total", default="256MiB", help="bytes put (and got) per round")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (median)")
    parser.add_argument("--streams", type=int, default=1, help="concurrent puts per round")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_tls(args: argparse.Namespace) -> int:
    if args.streams < 1 or args.rounds < 1:
        raise SystemExit("--streams and --rounds must be at least 1")
    block_sizes = [parse_size(size) for size in args.blocks.split(",") if size]
    tune_allocator()
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-tls-"))
    try:
        report = measure_tls(
            workdir, block_sizes, parse_size(args.total), args.rounds, args.streams
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return emit(report, args.json, print_report)


def print_report(report: TLSReport) -> None:
    console = wide_console()
    table = Table(
        title=f"the price of TLS on the data plane ({report.tls_version}): GB/s, "
        f"{report.streams} stream(s), same run"
    )
    columns = (
        "block",
        "round",
        "put plain",
        "put TLS",
        "put ÷plain",
        "get plain",
        "get TLS",
        "get ÷plain",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for row in report.rows:
        table.add_row(
            human_bytes(row.block_bytes),
            human_bytes(row.round_bytes),
            f"{row.plain_put_gbps:.2f}",
            f"{row.tls_put_gbps:.2f}",
            f"{row.put_ratio:.2f}x",
            f"{row.plain_get_gbps:.2f}",
            f"{row.tls_get_gbps:.2f}",
            f"{row.get_ratio:.2f}x",
        )
    table.caption = f"median of {report.rounds} rounds; ÷plain is the median of per-round ratios"
    console.print(table)
    console.print(
        f"Two daemons, each its own process; client and daemons share this machine's "
        f"{usable_cores()} cores."
    )
    ceiling = report.ceiling
    bare = Table(
        title=f"the ssl module alone: a bare stream of {human_bytes(ceiling.round_bytes)} "
        f"in {human_bytes(ceiling.write_bytes)} writes, two processes, no kvstore code"
    )
    for column in ("stream", "GB/s", "send CPU-s per GB", "receive CPU-s per GB"):
        bare.add_column(column, justify="right")
    bare.add_row(
        "plaintext",
        f"{ceiling.plain_gbps:.2f}",
        f"{ceiling.plain_send_cpu_s_per_gb:.3f}",
        f"{ceiling.plain_recv_cpu_s_per_gb:.3f}",
    )
    bare.add_row(
        report.tls_version,
        f"{ceiling.tls_gbps:.2f}",
        f"{ceiling.tls_send_cpu_s_per_gb:.3f}",
        f"{ceiling.tls_recv_cpu_s_per_gb:.3f}",
    )
    bare.caption = (
        f"TLS ÷ plaintext on the bare stream: {ceiling.ratio:.2f}x (median of per-round ratios)"
    )
    console.print(bare)
    for row in report.rows:
        console.print(
            f"{human_bytes(row.block_bytes)} blocks: the data plane's TLS put moves "
            f"{row.tls_put_gbps / ceiling.tls_gbps:.2f}x and its get "
            f"{row.tls_get_gbps / ceiling.tls_gbps:.2f}x the bare TLS stream's GB/s."
        )
