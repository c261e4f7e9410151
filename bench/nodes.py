"""`--nodes N` for the load commands: a local etcd and N daemons in place of one daemon.

The N daemons split the capacity one daemon would have had (each gets 1/N of the DRAM,
in whole pages), so a run with `--nodes 3` and one without compare a cluster and a single
daemon of the same size. The command then runs against the cluster's `etcd://` target,
and its clients follow the membership there. Every daemon is its own process (see
kvstore.bench.local_cluster); none has an SSD tier, as the single daemon has none unless
its flags give one.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from kvstore.bench.local_cluster import LocalCluster, node_dram_share


def add_nodes_argument(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    group.add_argument(
        "--nodes",
        type=int,
        help="start a local etcd and N kvstore-server daemons, each with 1/N of the DRAM, "
        "and run against their etcd:// target (default: one daemon, no etcd)",
    )


def check_nodes(args: argparse.Namespace, command: str) -> int | None:
    """`--nodes` as given (None: not given); exits with a message when it is below 1 or
    given with `--target`."""
    nodes: int | None = args.nodes
    if nodes is None:
        return None
    if nodes < 1:
        raise SystemExit(f"kvstore-bench {command}: --nodes must be at least 1, got {nodes}")
    if getattr(args, "target", None):
        raise SystemExit(
            f"kvstore-bench {command}: --nodes starts its own cluster; drop --target "
            "(or drop --nodes to run against the target)"
        )
    return nodes


@contextlib.contextmanager
def local_cluster(
    num_nodes: int,
    *,
    total_dram_bytes: int,
    page_bytes: int,
    server_args: Sequence[str] = (),
    log_path: Path | None = None,
    lease_ttl_s: int = 3,
) -> Iterator[LocalCluster]:
    """A started LocalCluster of `num_nodes` daemons holding `total_dram_bytes` between
    them, with no SSD tier. With `log_path`, every daemon's log is appended there at the
    end, each under a header naming the node."""
    share = node_dram_share(total_dram_bytes, num_nodes, page_bytes)
    work_dir = Path(tempfile.mkdtemp(prefix="kvstore-bench-cluster-"))
    try:
        with LocalCluster(
            num_nodes,
            dram_bytes=share,
            ssd_bytes=0,
            page_bytes=page_bytes,
            server_args=server_args,
            lease_ttl_s=lease_ttl_s,
            work_dir=work_dir,
        ) as cluster:
            yield cluster
        if log_path is not None:
            with log_path.open("ab") as log:
                for node in cluster.nodes:
                    log.write(f"==> node {node.index} ({node.target}) <==\n".encode())
                    if node.log_path.exists():
                        log.write(node.log_path.read_bytes())
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
