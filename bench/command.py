"""Command-line plumbing shared by the load commands (`agent`, `trace`): flags, the server, output.

Unless ``--target`` names a running server (or a cluster: ``etcd://HOST:PORT/PREFIX``,
``cluster://H1:P1,H2:P2``), the command starts its own `kvstore-server` on a free loopback port
(sized by ``--dram-bytes``, pages fitted to the block size) and stops it afterwards; with
``--nodes N`` it starts a local etcd and N daemons sharing that size instead (kvstore.bench.nodes).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from kvstore.bench.load import LoadConfig, LoadDriver, LoadRun
from kvstore.bench.nodes import add_nodes_argument, check_nodes, local_cluster
from kvstore.bench.presets import ModelPreset, get_preset, preset_names
from kvstore.bench.report import build_report, merge_results, print_report
from kvstore.bench.scrape import AUTO, Scraper, add_scrape_arguments
from kvstore.bench.spawn import free_port, spawned_server
from kvstore.bench.workload import Workload, page_bytes_for, parse_scale, scaled_layout
from kvstore.client import KVLayout
from kvstore.units import human_bytes, parse_size

N = TypeVar("N", int, float)
_COUNT_SUFFIXES = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_count(text: str) -> int:
    """'4096', '8K' or '1M' (binary: 8K = 8192) -> a non-negative count."""
    body, suffix = text.strip(), ""
    if body and body[-1].lower() in _COUNT_SUFFIXES:
        body, suffix = body[:-1], body[-1].lower()
    try:
        value = int(body) * _COUNT_SUFFIXES[suffix]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a count (e.g. 4096, 128K)"
        ) from error
    if value < 0:
        raise argparse.ArgumentTypeError(f"a count cannot be negative: {text!r}")
    return value


_SECONDS_PER_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_seconds(text: str) -> float:
    """'90', '90s', '10m' or '1.5h' -> seconds."""
    body, unit = text.strip().lower(), "s"
    if body and body[-1] in _SECONDS_PER_UNIT:
        body, unit = body[:-1], body[-1]
    try:
        return float(body) * _SECONDS_PER_UNIT[unit]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a duration (e.g. 90, 90s, 10m)"
        ) from error


def parse_range(text: str, kind: Callable[[str], N]) -> tuple[N, N]:
    """'10-30' -> (10, 30); '5' -> (5, 5)."""
    low, _, high = text.partition("-")
    try:
        return kind(low), kind(high or low)
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise SystemExit(
            f"kvstore-bench: cannot read {text!r} as a range LOW-HIGH: {error}"
        ) from None


def add_model_arguments(parser: argparse.ArgumentParser, *, scale: str, block_tokens: int) -> None:
    group = parser.add_argument_group("model and bytes")
    group.add_argument(
        "--preset", default="Llama-3-8B", help=f"KV bytes per token of: {', '.join(preset_names())}"
    )
    group.add_argument(
        "--scale",
        default=scale,
        help=f"fraction of the preset's bytes per token to move, e.g. 1/64 (default {scale})",
    )
    group.add_argument(
        "--layers",
        type=int,
        help="layers per block (default: the preset's, fewer if --scale leaves under 4 B per "
        "token and layer); fewer layers = fewer messages per block",
    )
    group.add_argument(
        "--block-tokens",
        type=int,
        default=block_tokens,
        help=f"tokens per block (default {block_tokens})",
    )


def model_layout(args: argparse.Namespace) -> tuple[ModelPreset, KVLayout]:
    preset = get_preset(args.preset)
    layout = scaled_layout(
        preset, parse_scale(args.scale), args.block_tokens, num_layers=args.layers
    )
    return preset, layout


def add_load_arguments(
    parser: argparse.ArgumentParser,
    *,
    duration: float | None,
    concurrency: int | None,
    ramp_up: float = 0.0,
) -> None:
    """Load shape, server and output flags; ``concurrency`` is the default with no ``--rate``."""
    load = parser.add_argument_group("load")
    load.add_argument("--processes", type=int, default=2, help="client processes (0: in this one)")
    load.add_argument(
        "--concurrency",
        type=int,
        help="closed loop: units in flight in all"
        + (f" (default {concurrency} without --rate)" if concurrency else ""),
    )
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    load.add_argument(
        "--duration",
        type=parse_seconds,
        default=duration,
        help="seconds (or 10m, 1h); no unit starts later"
        + (f" (default {duration:g})" if duration else ""),
    )
    load.add_argument(
        "--ramp-up",
        type=float,
        default=ramp_up,
        help=f"closed loop: spread the first starts over S seconds (default {ramp_up:g})",
    )
    load.add_argument("--max-in-flight", type=int, default=256, help="open loop, per process")
    load.add_argument(
        "--grace", type=float, default=10.0, help="seconds units may finish after the deadline"
    )
    load.add_argument("--seed", type=int, help="seed of the run's token streams (default: random)")
    load.set_defaults(default_concurrency=concurrency)
    server = parser.add_argument_group("server")
    server.add_argument(
        "--target",
        help="HOST:PORT of a running server, or a cluster: etcd://HOST:PORT/PREFIX or "
        "cluster://H1:P1,H2:P2 (default: start one)",
    )
    add_nodes_argument(server)
    server.add_argument(
        "--dram-bytes",
        default="4GiB",
        help="DRAM tier of the started server, split among --nodes (default 4GiB)",
    )
    server.add_argument("--page-bytes", help="its page size (default: fitted to the block size)")
    server.add_argument("--eviction-policy", choices=["lru", "lfu", "session"])
    server.add_argument(
        "--server-args",
        default="",
        help="more kvstore-server flags for the started server, e.g. '--ssd-dir /tmp/kv'",
    )
    server.add_argument("--server-log", type=Path, help="append the started server's log here")
    output = parser.add_argument_group("output")
    output.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    output.add_argument("--plot", type=Path, metavar="PATH.png", help="latency and hit-rate plot")
    output.add_argument("--no-progress", action="store_true", help="no live progress bar")
    add_scrape_arguments(output)


def load_config_from_args(
    args: argparse.Namespace, *, seed: int, max_units: int | None = None
) -> LoadConfig:
    concurrency = args.concurrency
    if concurrency is None and args.rate is None:
        concurrency = args.default_concurrency
    return LoadConfig(
        processes=args.processes,
        concurrency=concurrency,
        rate=args.rate,
        duration_s=args.duration,
        max_units=max_units,
        max_in_flight=args.max_in_flight,
        grace_s=args.grace,
        ramp_up_s=args.ramp_up,
        seed=seed,
    )


@contextlib.contextmanager
def server_for(args: argparse.Namespace, layout: KVLayout, console: Console) -> Iterator[str]:
    """The target: ``--target``, or a server (``--nodes``: a cluster) started here for the run."""
    nodes = check_nodes(args, args.command if "command" in args else "load")
    if args.target:
        yield args.target
        return
    page_bytes = args.page_bytes or str(page_bytes_for(layout.block_bytes))
    policy = ["--eviction-policy", args.eviction_policy] if args.eviction_policy else []
    more_flags = [*policy, *shlex.split(args.server_args)]
    if nodes is not None:
        if getattr(args, "scrape", None) == AUTO:
            raise SystemExit(
                "kvstore-bench: a bare --scrape scrapes the one daemon started here; with "
                "--nodes give one node's URL (--scrape http://HOST:PORT/metrics) or drop --nodes"
            )
        console.print(
            f"starting etcd and {nodes} kvstore-server daemons: dram "
            f"{human_bytes(parse_size(args.dram_bytes))} in all, "
            f"{human_bytes(parse_size(page_bytes))} pages; blocks of "
            f"{human_bytes(layout.block_bytes)}"
        )
        with local_cluster(
            nodes,
            total_dram_bytes=parse_size(args.dram_bytes),
            page_bytes=parse_size(page_bytes),
            server_args=["--log-level", "warning", *more_flags],
            log_path=args.server_log,
        ) as cluster:
            yield cluster.etcd_target
        return
    flags = ["--dram-bytes", args.dram_bytes, "--page-bytes", page_bytes, "--log-level", "warning"]
    flags += more_flags
    if getattr(args, "scrape", None) == AUTO:
        metrics_port = free_port()
        flags += ["--metrics-port", str(metrics_port)]
        args.scrape = f"http://127.0.0.1:{metrics_port}/metrics"
    console.print(
        f"starting kvstore-server: dram {human_bytes(parse_size(args.dram_bytes))} in "
        f"{human_bytes(parse_size(page_bytes))} pages; blocks of "
        f"{human_bytes(layout.block_bytes)} ({layout.block_tokens} tokens x "
        f"{layout.bytes_per_token} B/token)"
    )
    with spawned_server(flags, log_path=args.server_log) as target:
        yield target


@contextlib.contextmanager
def scraping(args: argparse.Namespace, console: Console) -> Iterator[Scraper | None]:
    """Scrape `--scrape`'s endpoint while the block runs (enter it after `server_for`,
    which points a bare `--scrape` at the daemon it starts); None without `--scrape`."""
    url = getattr(args, "scrape", None)
    if url is None:
        yield None
        return
    if url == AUTO:
        raise SystemExit(
            "kvstore-bench: --scrape with --target needs the daemon's metrics URL: "
            "--scrape http://HOST:PORT/metrics (started with kvstore-server --metrics-port)"
        )
    with Scraper(url, args.scrape_out, args.scrape_interval) as scraper:
        yield scraper
    console.print(
        f"wrote {scraper.num_scrapes} scrapes of {url} to {args.scrape_out}"
        + (f" ({scraper.num_failed} failed)" if scraper.num_failed else "")
        + f"; plot them: kvstore-bench plot {args.scrape_out}"
    )


def run_command(
    args: argparse.Namespace,
    workload: Workload,
    config: LoadConfig,
    *,
    settings: dict[str, Any],
    reference: Callable[[LoadRun], dict[str, tuple[float, float]]] | None = None,
) -> int:
    """Start or find the server, run the load, print the report, write JSON and the plot."""
    console = Console()
    driver = LoadDriver(workload, config, console=console, show_progress=not args.no_progress)
    # The workers start first: they import torch while the server starts.
    with (
        driver,
        server_for(args, workload.namespace.layout, console) as target,
        scraping(args, console),
    ):
        run = driver.run(target)
    report = build_report(run, settings=settings, reference=reference(run) if reference else None)
    print_report(report, console)
    if args.json:
        report.write_json(args.json)
        console.print(f"wrote {args.json}")
    if args.plot:
        from kvstore.bench.plot import write_plot  # matplotlib is optional and slow to import

        write_plot(merge_results(run.results), report, args.plot)
        console.print(f"wrote {args.plot}")
    return 0
