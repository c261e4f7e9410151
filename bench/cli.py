"""`kvstore-bench`: load tests, trace replay, throughput and capacity planning."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from kvstore.bench.agent import add_agent_arguments, run_agent
from kvstore.bench.cluster_cli import add_cluster_arguments, run_cluster
from kvstore.bench.disagg.cli import add_disagg_arguments, run_disagg
from kvstore.bench.durability import add_durability_arguments, run_durability
from kvstore.bench.lookup import add_lookup_arguments, run_lookup
from kvstore.bench.lz4 import add_lz4_arguments, run_lz4
from kvstore.bench.metrics_cost import add_metrics_cost_arguments, run_metrics_cost
from kvstore.bench.peers import add_peers_arguments, run_peers
from kvstore.bench.placement_sim import add_placement_arguments, run_placement
from kvstore.bench.plan import add_plan_arguments, run_plan
from kvstore.bench.plot import add_plot_arguments, run_plot
from kvstore.bench.replay import add_trace_arguments, run_trace
from kvstore.bench.restart import add_restart_arguments, run_restart
from kvstore.bench.soak import add_soak_arguments, run_soak
from kvstore.bench.sync_lookup import add_sync_lookup_arguments, run_sync_lookup
from kvstore.bench.throughput import add_throughput_arguments, run_throughput
from kvstore.bench.tiers import add_tiers_arguments, run_tiers
from kvstore.bench.tls import add_tls_arguments, run_tls
from kvstore.bench.trace import TraceFormatError
from kvstore.bench.transfer_cost import add_transfer_cost_arguments, run_transfer_cost
from kvstore.bench.watch import add_watch_arguments, run_watch
from kvstore.bench.watch_snapshot import add_watch_snapshot_arguments, run_watch_snapshot
from kvstore.bench.wire_lz4 import add_wire_lz4_arguments, run_wire_lz4
from kvstore.client import TOKEN_ENV
from kvstore.cluster.etcd_options import ETCD_SETTINGS
from kvstore.wire.tls import CLIENT_TLS_SETTINGS

Runner = Callable[[argparse.Namespace], int]

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Runner]] = {
    "throughput": (
        "put/get GB/s over block sizes, against plain grpcio in the same run",
        add_throughput_arguments,
        run_throughput,
    ),
    "transfer-cost": (
        "a daemon's CPU per GB of TCP puts, and small gets' p50, per block size",
        add_transfer_cost_arguments,
        run_transfer_cost,
    ),
    "peers": (
        "put/get GB/s side by side with LMCache's lm server (--lmcache-python), same run",
        add_peers_arguments,
        run_peers,
    ),
    "lookup": (
        "LookupPrefix latency (p50/p99) for a long chain",
        add_lookup_arguments,
        run_lookup,
    ),
    "sync-lookup": (
        "a blocking caller's lookup from its own thread, against through a loop thread",
        add_sync_lookup_arguments,
        run_sync_lookup,
    ),
    "plan": (
        "KV bytes per token, capacity footprint, decode operational intensity, tier sizes",
        add_plan_arguments,
        run_plan,
    ),
    "agent": (
        "synthetic agent sessions whose context snowballs; lookup, get, put every turn",
        add_agent_arguments,
        run_agent,
    ),
    "soak": (
        "agent load for a long time (e.g. --duration 10m); fails on RSS, fd or error drift",
        add_soak_arguments,
        run_soak,
    ),
    "trace": (
        "replay a Mooncake JSONL trace; prefix hit rate next to the trace's own",
        add_trace_arguments,
        run_trace,
    ),
    "tiers": (
        "SSD-tier get against a plain read of the same disk; write-back put against DRAM-only",
        add_tiers_arguments,
        run_tiers,
    ),
    "lz4": (
        "SSD-tier lz4 on a real prefill's KV (fp16, bf16, fp8) and random bytes: ratio, "
        "codec GB/s, SSD put/get GB/s and capacity, raw against lz4 in the same run",
        add_lz4_arguments,
        run_lz4,
    ),
    "wire-lz4": (
        "get GB/s with lz4 on the network path off, on and auto, under a read throttle (a "
        "slow link) and unthrottled, on a real prefill's KV, narrow-range KV and random bytes",
        add_wire_lz4_arguments,
        run_wire_lz4,
    ),
    "restart": (
        "daemon restart to first served lookup and to a whole index, by SSD size; "
        "against a sequential read of the same files",
        add_restart_arguments,
        run_restart,
    ),
    "durability": (
        "put GB/s under write-back, write-through and fsync, against DRAM-only in the same run",
        add_durability_arguments,
        run_durability,
    ),
    "tls": (
        "data-plane put/get GB/s over TLS against plaintext in the same run",
        add_tls_arguments,
        run_tls,
    ),
    "cluster": (
        "N daemons as one store: hit rate and lookup latency against 1 node, --workers "
        "GB/s, a node killed under load",
        add_cluster_arguments,
        run_cluster,
    ),
    "watch": (
        "put blocks/s of small blocks with N WatchBlocks watcher processes, against none",
        add_watch_arguments,
        run_watch,
    ),
    "watch-snapshot": (
        "the loop time a WatchBlocks snapshot takes, against building its events at once",
        add_watch_snapshot_arguments,
        run_watch_snapshot,
    ),
    "metrics": (
        "lookup latency and put/get GB/s with Prometheus metrics on and scraped, against "
        "metrics off, in the same run",
        add_metrics_cost_arguments,
        run_metrics_cost,
    ),
    "plot": (
        "plot a daemon's metrics over a run from the JSONL file --scrape wrote",
        add_plot_arguments,
        run_plot,
    ),
    "placement": (
        "a trace through the cluster's placement and per-node LRUs: hit rate and balance by "
        "run length K, against one node of the same capacity",
        add_placement_arguments,
        run_placement,
    ),
    "disagg": (
        "prefill and decode workers on a real transformer: exactness check, agent-session TTFT",
        add_disagg_arguments,
        run_disagg,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, runner) in _COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        credentials = sub.add_argument_group("credentials and TLS, for a secured daemon")
        credentials.add_argument(
            "--token",
            help="bearer token for --target, for this process and the load processes it "
            "starts (default: $KVSTORE_TOKEN)",
        )
        for _, flag, variable, what in CLIENT_TLS_SETTINGS:
            credentials.add_argument(flag, help=f"{what} (default: ${variable})")
        etcd = sub.add_argument_group("a secured etcd, for an etcd:// or etcds:// --target")
        for name, flag, variable, what in ETCD_SETTINGS:
            etcd.add_argument(flag, dest=f"etcd_{name}", help=f"{what} (default: ${variable})")
        sub.set_defaults(runner=runner)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Every KVClient of this run, in this process and the ones it spawns, reads these.
    if args.token is not None:
        os.environ[TOKEN_ENV] = args.token
    for _, flag, variable, _ in CLIENT_TLS_SETTINGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            os.environ[variable] = value
    # The password stays in a file (or $KVSTORE_ETCD_PASSWORD): only its path travels.
    for name, _, variable, _ in ETCD_SETTINGS:
        value = getattr(args, f"etcd_{name}")
        if value is not None:
            os.environ[variable] = value
    runner: Runner = args.runner
    try:
        return runner(args)
    except TraceFormatError as error:  # a trace a person must fix: say where, no traceback
        print(f"kvstore-bench: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
