"""`kvstore-bench cluster PART`: what running N daemons as one store costs and keeps.

Parts (each prints a table; `--json PATH` writes every part's figures):

- `hits`: a trace's prefix hit rate on N nodes against 1 node of the same DRAM, ample
  and under eviction (kvstore.bench.cluster_hits);
- `lookup`: a 1,000-key chain's lookup p50/p99 on N nodes against 1
  (kvstore.bench.cluster_lookup);
- `workers`: aggregate put and get GB/s from several client processes against
  `kvstore-server --workers 2` and `--workers 1` (kvstore.bench.cluster_workers);
- `failover`: agent load on N nodes, one killed with SIGKILL mid-run; hit rate and
  errors per interval, and how long etcd takes to drop the node
  (kvstore.bench.cluster_failover);
- `all`: each of them in turn.

Every daemon, etcd and load generator runs in a process of its own; ratios compare
figures measured in the same run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from kvstore.bench.cluster_failover import FailoverSetup, measure_failover
from kvstore.bench.cluster_hits import HitsSetup, measure_hits
from kvstore.bench.cluster_lookup import LookupSetup, measure_lookup
from kvstore.bench.cluster_report import PartResult, print_part, write_json
from kvstore.bench.cluster_workers import WorkersSetup, measure_workers
from kvstore.bench.command import parse_seconds
from kvstore.bench.trace_sample import CONVERSATION_SAMPLE
from kvstore.units import parse_size

PARTS = ("hits", "lookup", "workers", "failover")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("part", choices=[*PARTS, "all"], help="what to measure")
    parser.add_argument("--nodes", type=int, default=3, help="daemons of the cluster (default 3)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures as JSON")
    hits = parser.add_argument_group("hits")
    hits.add_argument(
        "--trace",
        type=Path,
        default=CONVERSATION_SAMPLE,
        help="Mooncake JSONL trace to replay (default: the sample in bench/data; e.g. "
        "../shared/traces/conversation_trace.jsonl for the whole trace)",
    )
    hits.add_argument("--max-requests", type=int, help="replay only the first N requests")
    hits.add_argument(
        "--scale",
        default=HitsSetup.scale,
        help=f"of Llama-3-8B's KV bytes per token (default {HitsSetup.scale}: 4 KiB blocks)",
    )
    hits.add_argument(
        "--processes", type=int, default=1, help="load processes (0: a thread of this one)"
    )
    lookup = parser.add_argument_group("lookup")
    lookup.add_argument("--keys", type=int, default=1000, help="blocks in the chain")
    lookup.add_argument("--iterations", type=int, default=1000, help="timed lookups per case")
    workers = parser.add_argument_group("workers")
    workers.add_argument("--workers", type=int, default=2, help="against --workers 1 (default 2)")
    workers.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    workers.add_argument(
        "--total", default="256MiB", help="bytes put, then got, per round, by all clients"
    )
    workers.add_argument("--block-bytes", default="1MiB", help="block size (default 1MiB)")
    workers.add_argument("--rounds", type=int, default=3, help="rounds per side (median)")
    failover = parser.add_argument_group("failover")
    failover.add_argument(
        "--duration", type=parse_seconds, default=40.0, help="seconds of load (default 40)"
    )
    failover.add_argument(
        "--kill-after",
        type=parse_seconds,
        default=15.0,
        help="SIGKILL a node this long into the load (default 15)",
    )
    failover.add_argument(
        "--interval", type=parse_seconds, default=2.5, help="seconds per row (default 2.5)"
    )
    failover.add_argument("--lease-ttl", type=int, default=3, help="the daemons' etcd lease, s")
    failover.add_argument(
        "--load-processes", type=int, default=2, help="agent load processes (default 2)"
    )
    failover.add_argument(
        "--concurrency", type=int, default=6, help="agent sessions in flight (default 6)"
    )


def _measurements(args: argparse.Namespace) -> dict[str, Callable[[], PartResult]]:
    return {
        "hits": lambda: measure_hits(
            HitsSetup(
                trace=args.trace,
                max_requests=args.max_requests,
                nodes=args.nodes,
                scale=args.scale,
                processes=args.processes,
            )
        ),
        "lookup": lambda: measure_lookup(
            LookupSetup(nodes=args.nodes, keys=args.keys, iterations=args.iterations)
        ),
        "workers": lambda: measure_workers(
            WorkersSetup(
                workers=args.workers,
                clients=args.clients,
                total_bytes=parse_size(args.total),
                block_bytes=parse_size(args.block_bytes),
                rounds=args.rounds,
            )
        ),
        "failover": lambda: measure_failover(
            FailoverSetup(
                nodes=args.nodes,
                duration_s=args.duration,
                kill_after_s=args.kill_after,
                interval_s=args.interval,
                lease_ttl_s=args.lease_ttl,
                processes=args.load_processes,
                concurrency=args.concurrency,
            )
        ),
    }


def _check(args: argparse.Namespace) -> None:
    problems = []
    if args.nodes < 2:
        problems.append(f"--nodes must be at least 2 (a cluster against 1 node), got {args.nodes}")
    if args.workers < 2:
        problems.append(f"--workers must be at least 2 (compared with 1), got {args.workers}")
    for name in ("keys", "iterations", "clients", "rounds"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1")
    if args.part in ("failover", "all") and not 0 < args.kill_after < args.duration:
        problems.append("--kill-after must be inside the run: 0 < --kill-after < --duration")
    if args.part in ("hits", "all") and not args.trace.is_file():
        problems.append(f"--trace {args.trace}: no such file")
    if problems:
        raise SystemExit("kvstore-bench cluster: " + "; ".join(problems))


def run_cluster(args: argparse.Namespace) -> int:
    _check(args)
    console = Console(width=max(Console().width, 110))
    measurements = _measurements(args)
    parts = PARTS if args.part == "all" else (args.part,)
    results = []
    for part in parts:
        console.print(f"[bold]cluster {part}[/bold]: running ...")
        result = measurements[part]()
        print_part(result, console)
        results.append(result)
    if args.json:
        settings = {key: value for key, value in vars(args).items() if key != "runner"}
        write_json(results, args.json, settings)
        console.print(f"wrote {args.json}")
    return 0
