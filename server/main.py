"""`kvstore-server`: run the daemon (or N workers), or print a running daemon's stats.

kvstore-server [--config FILE] [--listen HOST:PORT] [--dram-bytes 4GiB] ...
kvstore-server stats [--target HOST:PORT] [--json]
kvstore-server cluster status --cluster etcd://HOST:PORT/PREFIX [--json] [--etcd-ca ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from kvstore.cluster.etcd_options import ETCD_SETTINGS, EtcdOptions
from kvstore.errors import InvalidRequest
from kvstore.server.cluster_status import run_cluster_status
from kvstore.server.config import add_config_arguments, config_from_args
from kvstore.server.workers import configure_logging, run_daemon, supervise, worker_configs
from kvstore.units import human_bytes
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire.tls import CLIENT_TLS_SETTINGS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stats"]:
        return _stats_main(argv[1:])
    if argv[:2] == ["cluster", "status"]:
        return _cluster_status_main(argv[2:])
    parser = argparse.ArgumentParser(
        prog="kvstore-server",
        description="Serve the kvstore KV-cache pool (with --workers N, as N daemon "
        "processes registered in --cluster). `kvstore-server stats` prints a running "
        "server's stats; `kvstore-server cluster status` lists a cluster's members.",
    )
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        configs = worker_configs(config) if config.workers > 1 else []
    except InvalidRequest as error:
        parser.error(str(error))
    except OSError as error:  # no free port on the listen host for the workers
        parser.error(f"cannot choose ports for the workers on {config.listen}: {error}")
    configure_logging(config.log_level, worker_index=None)
    if configs:
        return supervise(config, configs)
    return run_daemon(config)


def _add_caller_arguments(parser: argparse.ArgumentParser) -> None:
    """--json, --timeout, --token and the TLS flags of the commands that call daemons."""
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    parser.add_argument(
        "--token", help="bearer token for a daemon that authenticates (default: $KVSTORE_TOKEN)"
    )
    for _, flag, variable, what in CLIENT_TLS_SETTINGS:
        parser.add_argument(flag, help=f"{what} (default: ${variable})")


def _caller_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    token = args.token if args.token is not None else os.environ.get("KVSTORE_TOKEN")
    return (("authorization", f"Bearer {token}"),) if token else ()


def _cluster_status_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kvstore-server cluster status",
        description="Each member registered in etcd: address, capacity, use, health, lease.",
    )
    parser.add_argument(
        "--cluster", required=True, help="etcd://HOST:PORT[,HOST:PORT...]/PREFIX (etcds:// for TLS)"
    )
    _add_caller_arguments(parser)
    etcd = parser.add_argument_group("a secured etcd")
    for name, flag, variable, what in ETCD_SETTINGS:
        etcd.add_argument(flag, dest=f"etcd_{name}", help=f"{what} (default: ${variable})")
    args = parser.parse_args(argv)
    try:
        channel_for = _channel_factory(args)
        overrides = {name: getattr(args, f"etcd_{name}") for name, _, _, _ in ETCD_SETTINGS}
        etcd_options = EtcdOptions.from_environment(overrides=overrides)
    except OSError as error:
        parser.error(f"cannot read a TLS file: {error}")
    except ValueError as error:
        parser.error(str(error))
    return run_cluster_status(args, channel_for, _caller_metadata(args), etcd_options)


def _stats_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kvstore-server stats")
    parser.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT")
    _add_caller_arguments(parser)
    args = parser.parse_args(argv)
    metadata = _caller_metadata(args)
    try:
        channel = _channel_factory(args)(args.target)
    except OSError as error:
        parser.error(f"cannot read a TLS file: {error}")
    with channel:
        try:
            stats = pb_grpc.KVStoreStub(channel).Stats(
                pb.StatsRequest(), timeout=args.timeout, metadata=metadata
            )
        except grpc.RpcError as error:
            print(f"kvstore-server stats: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(
            json.dumps(
                json_format.MessageToDict(stats, always_print_fields_with_no_presence=True),
                indent=2,
            )
        )
    else:
        print_stats(stats, Console())
    return 0


def _channel_factory(args: argparse.Namespace) -> Callable[[str], grpc.Channel]:
    """Channels to daemons: TLS where any TLS flag (or variable) is set. Reads the
    files now (OSError if one cannot be read)."""
    settings = {}
    for _, flag, variable, _ in CLIENT_TLS_SETTINGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        settings[flag] = value if value is not None else os.environ.get(variable) or None
    if not any(settings.values()):

        def plain(target: str) -> grpc.Channel:
            return grpc.insecure_channel(target)

        return plain

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(settings["--tls-ca"]),
        private_key=read(settings["--tls-key"]),
        certificate_chain=read(settings["--tls-cert"]),
    )
    name = settings["--tls-server-name"]
    options = [("grpc.ssl_target_name_override", name)] if name else []

    def secure(target: str) -> grpc.Channel:
        return grpc.secure_channel(target, credentials, options=options)

    return secure


def _rate(bytes_per_s: int) -> str:
    return f"{bytes_per_s / 1e6:g} MB/s"


def print_stats(stats: pb.StatsResponse, console: Console) -> None:
    table = Table(title="kvstore tiers")
    for column in (
        "tier",
        "used / capacity",
        "blocks",
        "hits",
        "misses",
        "evictions",
        "promotions",
        "demotions",
        "read",
        "written",
        "errors",
    ):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for tier in stats.tiers:
        table.add_row(
            tier.name
            + (" (degraded)" if tier.degraded else "")
            + (f" (reads {_rate(tier.read_bytes_per_s)})" if tier.read_bytes_per_s else ""),
            f"{human_bytes(tier.used_bytes)} / {human_bytes(tier.capacity_bytes)}",
            str(tier.num_blocks),
            str(tier.hits),
            str(tier.misses),
            str(tier.evictions),
            str(tier.promotions),
            str(tier.demotions),
            human_bytes(tier.bytes_read),
            human_bytes(tier.bytes_written),
            str(tier.errors),
        )
    console.print(table)
    hit_rate = stats.lookup_hits / stats.lookup_keys if stats.lookup_keys else 0.0
    console.print(
        f"namespaces {stats.num_namespaces}  lookups {stats.lookups} "
        f"(key hit rate {hit_rate:.1%})  blocks put {stats.blocks_put} "
        f"({human_bytes(stats.bytes_put)})"
        f"  got {stats.blocks_got} ({human_bytes(stats.bytes_got)})  pinned {stats.num_pinned}"
        f"  abandoned puts {stats.puts_abandoned}  checksum failures {stats.checksum_failures}"
        f"  uptime {stats.uptime_ms / 1000:.0f}s  cpu {stats.process_cpu_us / 1e6:.1f}s"
    )
    console.print(durability_line(stats))
    console.print(
        f"process: rss {human_bytes(stats.rss_bytes)}  {stats.open_fds} open fds  "
        f"event-loop lag over the last 10 s: max {stats.loop_lag_max_us / 1000:.1f} ms, "
        f"p99 {stats.loop_lag_p99_us / 1000:.1f} ms (of the max, "
        f"{stats.loop_lag_max_runqueue_us / 1000:.1f} ms waiting for a core)"
    )
    if stats.data_plane_port:
        console.print(
            f"data plane on port {stats.data_plane_port}: "
            f"{stats.data_plane_connections} connections open, "
            f"{stats.data_plane_transfers} puts and gets carried"
        )
    else:
        console.print("data plane off: puts and gets go over gRPC")
    if stats.cluster_node_id:
        state = "registered" if stats.cluster_registered else "NOT registered (etcd unreachable?)"
        console.print(f"cluster: node {stats.cluster_node_id}, {state} in etcd")
    if stats.tenants:
        console.print(tenants_table(stats))
    if stats.tenants_omitted:
        console.print(
            f"{stats.tenants_omitted} more tenants left out: the reply would pass the "
            "server's limits.max_message_bytes"
        )


def tenants_table(stats: pb.StatsResponse) -> Table:
    """Each tenant's footprint per tier against its quota ("shared": it has none there)."""
    table = Table(title="kvstore tenants")
    table.add_column("tenant", justify="left")
    tier_names = {tier.tier: tier.name for tier in stats.tiers}
    kinds = [tier.tier for tier in stats.tiers]
    for kind in kinds:
        table.add_column(f"{tier_names[kind]} used / quota (blocks, quota evictions)")
    table.add_column("pinned / quota", justify="right")
    for tenant in stats.tenants:
        by_kind = {tier.tier: tier for tier in tenant.tiers}
        cells = []
        for kind in kinds:
            tier = by_kind.get(kind)
            if tier is None:
                cells.append("")
                continue
            quota = human_bytes(tier.quota_bytes) if tier.has_quota else "shared"
            cells.append(
                f"{human_bytes(tier.used_bytes)} / {quota} "
                f"({tier.num_blocks}, {tier.quota_evictions})"
            )
        pinned_quota = human_bytes(tenant.pinned_quota_bytes) if tenant.has_pinned_quota else "-"
        table.add_row(tenant.tenant, *cells, f"{human_bytes(tenant.pinned_bytes)} / {pinned_quota}")
    return table


def durability_line(stats: pb.StatsResponse) -> str:
    """What a COMMITTED put promises now, and the writes still owed to that promise."""
    durability = (
        pb.Durability.Name(stats.durability).removeprefix("DURABLE_").lower().replace("_", " ")
        if stats.durability
        else "not reported"
    )
    return (
        f"write policy {stats.write_policy or 'not reported'}: a committed block is "
        f"durable {durability}  put reservations {human_bytes(stats.put_reserved_bytes)}  "
        f"SSD writes pending {stats.ssd_writes_pending}"
    )


if __name__ == "__main__":
    sys.exit(main())
