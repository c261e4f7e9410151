"""A cluster on this machine: a real etcd and N `kvstore-server` daemons, each its own process.

    with LocalCluster(3, dram_bytes=256 * MiB) as cluster:
        KVClient(cluster.etcd_target, namespace)    # etcd://127.0.0.1:PORT/kvstore
        KVClient(cluster.static_target, namespace)  # cluster://127.0.0.1:P1,127.0.0.1:P2,...
        cluster.kill(1)                             # SIGKILL; its lease expires in lease_ttl_s
        cluster.wait_for_members()                  # until etcd lists exactly the live nodes
        cluster.restart(1)                          # same port and SSD directory: same node id
        cluster.add_node()
        cluster.stop_etcd(); cluster.start_etcd()   # same ports and data

Each daemon runs `--cluster etcd://.../PREFIX --advertise 127.0.0.1:PORT` with its own SSD
directory and DRAM size; entering the block returns once every daemon has registered. Leaving
it, even by an exception, stops every daemon and etcd, and removes the working directory unless
one was given. Benchmarks (`kvstore-bench ... --nodes N`) and tests use it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from kvstore.bench.local_etcd import EtcdServer
from kvstore.bench.spawn import free_port
from kvstore.cluster.etcd import EtcdUnavailable, list_members
from kvstore.cluster.members import Member

DEFAULT_PREFIX = "kvstore"
# The line a daemon logs (at info) each time it registers; readiness is this line in the
# log of the current start, since a killed node's key outlives it until its lease expires.
_REGISTERED_LINE = "registered in etcd as "
_STOP_TIMEOUT_S = 15.0
_POLL_S = 0.05


@dataclass
class LocalNode:
    """One daemon of a LocalCluster: its gRPC target, SSD directory and log."""

    index: int
    target: str  # 127.0.0.1:PORT, the same across restarts
    ssd_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""  # as registered; kept in ssd_dir, so the same across restarts
    _log_offset: int = field(default=0, repr=False)  # where the current start's log begins

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_since_start(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""


def node_dram_share(total_bytes: int, num_nodes: int, page_bytes: int) -> int:
    """Each of `num_nodes` daemons' DRAM so that together they hold `total_bytes`: the even
    share, rounded down to whole pages (a daemon's DRAM tier is whole pages)."""
    if num_nodes < 1:
        raise ValueError(f"a cluster needs at least one node, got {num_nodes}")
    share = total_bytes // num_nodes // page_bytes * page_bytes
    if share < page_bytes:
        raise ValueError(
            f"{total_bytes} B over {num_nodes} nodes leaves under one {page_bytes} B page each"
        )
    return share


class LocalCluster:
    """etcd and `num_nodes` daemons on loopback; a context manager (see the module doc).

    `dram_bytes` and `ssd_bytes` are per daemon; `ssd_bytes=0` runs them without an SSD
    tier (and so with a new node id each start). `server_args` are more `kvstore-server`
    flags for every daemon (later flags win, so they may override the defaults here).
    `lease_ttl_s` is short by default so that a killed node leaves the membership soon.
    `work_dir` keeps etcd's data, the SSD directories and the logs there (default: a
    temporary directory, removed at the end).
    """

    def __init__(
        self,
        num_nodes: int,
        *,
        dram_bytes: int,
        ssd_bytes: int = 64 << 20,
        page_bytes: int | None = None,
        server_args: Sequence[str] = (),
        prefix: str = DEFAULT_PREFIX,
        lease_ttl_s: int = 3,
        work_dir: Path | None = None,
        start_timeout_s: float = 90.0,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"a cluster needs at least one node, got {num_nodes}")
        self.num_initial_nodes = num_nodes
        self.dram_bytes = dram_bytes
        self.ssd_bytes = ssd_bytes
        self.page_bytes = page_bytes
        self.server_args = list(server_args)
        self.prefix = prefix
        self.lease_ttl_s = lease_ttl_s
        self.start_timeout_s = start_timeout_s
        self._owns_work_dir = work_dir is None
        self._work_dir = work_dir
        self._etcd: EtcdServer | None = None
        self.nodes: list[LocalNode] = []

    # -- targets -------------------------------------------------------------------------

    @property
    def work_dir(self) -> Path:
        if self._work_dir is None:
            raise RuntimeError("the cluster is not started (use it in a with block)")
        return self._work_dir

    @property
    def etcd(self) -> EtcdServer:
        if self._etcd is None:
            raise RuntimeError("the cluster is not started (use it in a with block)")
        return self._etcd

    @property
    def etcd_target(self) -> str:
        """`etcd://127.0.0.1:PORT/PREFIX`: clients given it watch the membership."""
        return self.etcd.url(self.prefix)

    @property
    def static_target(self) -> str:
        """`cluster://H:P,...` of every node started, killed ones included (a static list
        names the nodes a deployment has, not the ones alive now)."""
        return "cluster://" + ",".join(node.target for node in self.nodes)

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="kvstore-cluster-"))
        self._work_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._etcd = EtcdServer(self.work_dir / "etcd")
            self._etcd.start()
            started = [self._spawn(self._new_node()) for _ in range(self.num_initial_nodes)]
            for node in started:
                self._wait_registered(node)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every daemon (SIGTERM, SIGKILL after 15 s) and etcd; remove the working
        directory if it is ours. Safe to call twice."""
        live = [node for node in self.nodes if node.alive]
        for node in live:
            assert node.process is not None
            node.process.send_signal(signal.SIGTERM)
        for node in live:
            _reap(node)
        if self._etcd is not None:
            self._etcd.stop()
        if self._owns_work_dir and self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None

    # -- membership changes --------------------------------------------------------------

    def kill(self, index: int) -> None:
        """SIGKILL node `index` and reap it. Its key stays in etcd until its lease expires
        (`lease_ttl_s`); `wait_for_members()` waits for that."""
        node = self.nodes[index]
        if not node.alive:
            raise RuntimeError(f"node {index} is not running")
        assert node.process is not None
        node.process.kill()
        node.process.wait()

    def restart(self, index: int) -> None:
        """Start node `index` again on its port and SSD directory (so with its node id and
        its SSD blocks); a running node is stopped first (SIGTERM, a drain). Returns once it
        has registered."""
        node = self.nodes[index]
        if node.alive:
            assert node.process is not None
            node.process.send_signal(signal.SIGTERM)
            _reap(node)
        self._wait_registered(self._spawn(node))

    def add_node(self) -> int:
        """Start one more daemon; returns its index once it has registered."""
        node = self._new_node()
        self._wait_registered(self._spawn(node))
        return node.index

    def stop_etcd(self) -> None:
        """Stop etcd (SIGTERM); the daemons serve on without it."""
        self.etcd.stop()

    def start_etcd(self) -> None:
        """Start etcd again on the same ports and data."""
        self.etcd.start()

    # -- what etcd says ------------------------------------------------------------------

    def members(self, timeout_s: float = 5.0) -> list[Member]:
        """The members etcd lists now (EtcdUnavailable when it does not answer). Runs its own
        event loop on a thread, so it may be called from inside a running one too."""
        url = self.etcd_target
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(asyncio.run, list_members(url, timeout_s=timeout_s))
            return future.result()

    def wait_for_members(
        self, node_ids: set[str] | None = None, *, timeout_s: float | None = None
    ) -> list[Member]:
        """Until etcd lists exactly `node_ids` (default: the live nodes' ids); returns them.
        TimeoutError after `timeout_s` (default: the lease TTL plus the start timeout)."""
        expected = node_ids if node_ids is not None else {n.node_id for n in self.nodes if n.alive}
        limit_s = timeout_s if timeout_s is not None else self.lease_ttl_s + self.start_timeout_s
        deadline = time.monotonic() + limit_s
        listed: set[str] = set()
        while True:
            try:
                members = self.members()
                listed = {member.node_id for member in members}
                if listed == expected:
                    return members
            except EtcdUnavailable:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"etcd listed {sorted(listed)}, not {sorted(expected)}, after {limit_s:.0f}s"
                )
            time.sleep(_POLL_S * 4)

    # -- internals -----------------------------------------------------------------------

    def _new_node(self) -> LocalNode:
        index = len(self.nodes)
        node = LocalNode(
            index=index,
            target=f"127.0.0.1:{free_port()}",
            ssd_dir=self.work_dir / f"node-{index}" / "ssd",
            log_path=self.work_dir / f"node-{index}.log",
        )
        self.nodes.append(node)
        return node

    def _command(self, node: LocalNode) -> list[str]:
        sizes = ["--dram-bytes", str(self.dram_bytes)]
        if self.ssd_bytes > 0:
            sizes += ["--ssd-dir", str(node.ssd_dir), "--ssd-bytes", str(self.ssd_bytes)]
        if self.page_bytes is not None:
            sizes += ["--page-bytes", str(self.page_bytes)]
        return [
            sys.executable,
            "-m",
            "kvstore.server.main",
            "--listen",
            node.target,
            "--cluster",
            self.etcd_target,
            "--advertise",
            node.target,
            "--lease-ttl-s",
            str(self.lease_ttl_s),
            *sizes,
            "--drain-grace-s",
            "2",
            *self.server_args,
            # Last, so that server_args cannot hide the line readiness waits for.
            "--log-level",
            "info",
        ]

    def _spawn(self, node: LocalNode) -> LocalNode:
        node.ssd_dir.mkdir(parents=True, exist_ok=True)
        node._log_offset = node.log_path.stat().st_size if node.log_path.exists() else 0
        with node.log_path.open("ab") as log:
            node.process = subprocess.Popen(
                self._command(node), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        return node

    def _wait_registered(self, node: LocalNode) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while _REGISTERED_LINE not in node.log_since_start():
            if not node.alive or time.monotonic() > deadline:
                why = "exited" if not node.alive else f"did not register in {self.start_timeout_s}s"
                if node.alive:
                    assert node.process is not None
                    node.process.kill()
                    node.process.wait()
                tail = "\n".join(node.log_since_start().splitlines()[-20:])
                raise RuntimeError(f"node {node.index} ({node.target}) {why}; its log:\n{tail}")
            time.sleep(_POLL_S)
        for member in self.members():
            if member.address == node.target:
                node.node_id = member.node_id
                return
        raise RuntimeError(f"node {node.index} logged its registration but etcd does not list it")


def _reap(node: LocalNode) -> None:
    """Wait for a signalled node to exit; SIGKILL it after 15 s."""
    assert node.process is not None
    try:
        node.process.wait(timeout=_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        node.process.kill()
        node.process.wait()
