"""`kvstore-server --workers N`: N daemon processes on one host, one cluster member each.

One Python daemon uses about one core. The supervisor (`supervise`) splits the host's
capacity into N shares (`worker_configs`) and runs each as a normal daemon in a child
process (`python -m kvstore.server.workers`, its config pickled on stdin), so that clients
spread blocks over them through the same placement as over machines.

- Worker i gets 1/N of every tier (DRAM, HBM, SSD), rounded down, and of every tenant's
  byte quotas; its own ports (P+i: gRPC, data plane, metrics) and SSD directory
  (`<ssd_dir>/worker-<i>`, where its node id and blocks outlive restarts).
- SIGTERM and SIGINT are forwarded (each worker drains and withdraws its member), and so
  is SIGHUP (token reload). The supervisor exits when every worker has: 0 if all drained
  cleanly.
- A worker that dies unexpectedly is restarted after a backoff, on the same ports and
  directory, so it rejoins with its node id and blocks. One that cannot start at all the
  first time (a port in use, an unreadable TLS file) stops the others: exit 1.
- Workers ask the kernel for SIGTERM when the supervisor dies (PR_SET_PDEATHSIG), so
  a SIGKILLed supervisor leaves no orphans: they drain and withdraw as for a SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import itertools
import logging
import os
import pickle
import random
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kvstore.config import StoreConfig, TenantQuota
from kvstore.errors import InvalidRequest
from kvstore.server.app import check_exposure, serve
from kvstore.server.config import ServerConfig

logger = logging.getLogger("kvstore.server.workers")

# A worker's exit code when it could not start; any other code is a crash or a drain.
CANNOT_START_EXIT = 3
RESTART_BACKOFF_MIN_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
# A worker that ran this long before dying is restarted after the shortest backoff again.
STABLE_AFTER_S = 30.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# -- the plan: each worker's share ---------------------------------------------------


def worker_configs(
    config: ServerConfig, pick_ports: Callable[[str, int], list[int]] | None = None
) -> list[ServerConfig]:
    """Each worker's config; InvalidRequest where a share cannot work (a tier too small
    to split N ways, a port range past 65535). `pick_ports(host, n)` chooses the gRPC
    ports where listen's port is 0 (default: n free ports on that host, now)."""
    num_workers = config.workers
    host, listen_port = _split_address(config.listen, "listen")
    if listen_port == 0:
        ports = (pick_ports or free_ports)(host, num_workers)
    else:
        ports = [listen_port + index for index in range(num_workers)]
    _check_port_range("listen", listen_port, num_workers)
    if config.data_port > 0:
        _check_port_range("data_port", config.data_port, num_workers)
    if config.metrics_port > 0:
        _check_port_range("metrics_port", config.metrics_port, num_workers)
    advertise = config.cluster.advertise if config.cluster is not None else ""
    advertise_host, advertise_port = _split_address(advertise, "cluster.advertise")
    if advertise:
        _check_port_range("cluster.advertise", advertise_port, num_workers)
    store = _store_share(config)
    configs = []
    for index in range(num_workers):
        worker_store = store
        if store.ssd_dir is not None:
            worker_store = dataclasses.replace(
                store, ssd_dir=str(Path(store.ssd_dir) / f"worker-{index}")
            )
        cluster = config.cluster
        if cluster is not None and advertise:
            address = _join_address(advertise_host, advertise_port + index)
            cluster = dataclasses.replace(cluster, advertise=address)
        configs.append(
            dataclasses.replace(
                config,
                workers=1,
                listen=_join_address(host, ports[index]),
                data_port=config.data_port + index if config.data_port > 0 else config.data_port,
                # One Unix socket each: a set path gets the worker's index.
                shm_socket=config.shm_socket
                if config.shm_socket in ("auto", "off")
                else f"{config.shm_socket}.{index}",
                metrics_port=(
                    config.metrics_port + index if config.metrics_port > 0 else config.metrics_port
                ),
                store=worker_store,
                cluster=cluster,
            )
        )
    return configs


def _store_share(config: ServerConfig) -> StoreConfig:
    """The store settings of one worker: 1/N of each tier, of each byte quota and of each
    read throttle. Counts (max_transfers, connections, namespaces) stay whole: one client
    call reaches several workers, and each counts it."""
    num_workers, store = config.workers, config.store
    quotas = {
        tenant: dataclasses.replace(
            quota,
            **{
                name: getattr(quota, name) // num_workers
                for name in _QUOTA_SHARES
                if getattr(quota, name) is not None
            },
        )
        for tenant, quota in store.quotas.items()
    }
    try:
        return dataclasses.replace(
            store,
            dram_bytes=store.dram_bytes // num_workers,
            hbm_bytes=store.hbm_bytes // num_workers,
            ssd_bytes=store.ssd_bytes // num_workers,
            max_put_reserved_bytes=store.max_put_reserved_bytes // num_workers,
            quotas=quotas,
            # The host's tier (or network) bandwidth is shared like its capacity.
            read_bytes_per_s={
                tier: max(1, rate // num_workers) for tier, rate in store.read_bytes_per_s.items()
            },
        )
    except InvalidRequest as error:
        raise InvalidRequest(
            f"with workers = {num_workers} each worker gets 1/{num_workers} of every tier, "
            f"and that share does not work: {error}"
        ) from None


_QUOTA_SHARES = tuple(
    name for name in (f.name for f in dataclasses.fields(TenantQuota)) if name.endswith("_bytes")
)


def free_ports(host: str, count: int, *, ephemeral: tuple[int, int] | None = None) -> list[int]:
    """`count` distinct ports free on `host` now (all held open until all are chosen).

    They come from outside the kernel's ephemeral range (`ephemeral`, default: read from
    /proc) where it leaves room: a port bound to 0 later, by a sibling worker's data plane
    or any outgoing connection, is drawn from that range, so it cannot take one of these
    before its worker binds it. Only where no port outside it is free does the kernel pick.
    """
    low, high = ephemeral if ephemeral is not None else _ephemeral_range()
    below = max(0, low - _FIRST_UNPRIVILEGED_PORT)
    num_outside = below + max(0, 65535 - high)
    draws = random.SystemRandom().sample(range(num_outside), min(num_outside, _MAX_PORT_TRIES))
    outside = [
        _FIRST_UNPRIVILEGED_PORT + draw if draw < below else high + 1 + draw - below
        for draw in draws
    ]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        chosen: list[int] = []
        for port in itertools.chain(outside, itertools.repeat(0)):
            if len(chosen) == count:
                return chosen
            sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            try:
                sock.bind((host, port))
            except OSError:
                if port == 0:
                    raise
                continue
            chosen.append(int(sock.getsockname()[1]))
        raise AssertionError("unreachable: the ports to try never run out")


_FIRST_UNPRIVILEGED_PORT = 1024
_MAX_PORT_TRIES = 1000  # taken ports skipped before the kernel picks from its own range
_LINUX_DEFAULT_EPHEMERAL = (32768, 60999)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _LINUX_DEFAULT_EPHEMERAL


def _split_address(address: str, what: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` → (host, port); ("", 0) for an empty address."""
    if not address:
        return "", 0
    host, _, port_text = address.rpartition(":")
    if not port_text.isdigit():
        raise InvalidRequest(f"{what} {address!r} must end in :PORT to be split among workers")
    return host.removeprefix("[").removesuffix("]"), int(port_text)


def _join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_port_range(what: str, first_port: int, num_workers: int) -> None:
    if first_port + num_workers - 1 > 65535:
        raise InvalidRequest(
            f"{what} port {first_port} + {num_workers} workers runs past 65535: worker i "
            f"takes port {first_port}+i"
        )


# -- running one daemon --------------------------------------------------------------


def configure_logging(level: str, worker_index: int | None) -> None:
    """The daemon's log format; a worker's lines name it (`worker-3`)."""
    who = "" if worker_index is None else f"worker-{worker_index} "
    logging.basicConfig(
        level=level.upper(), format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s"
    )


def run_daemon(config: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT drains the daemon; 1 (logged) if it cannot start."""
    try:
        asyncio.run(serve(config))
    except (OSError, InvalidRequest) as error:
        logging.getLogger("kvstore.server").error("cannot start: %s", error)
        return 1
    return 0


def worker_main(argv: list[str]) -> int:
    """A worker process: its config comes pickled on stdin from the supervisor."""
    parser = argparse.ArgumentParser(prog="python -m kvstore.server.workers")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--supervisor-pid", type=int, required=True)
    args = parser.parse_args(argv)
    # Ignored until the daemon installs its handler, which it does before it reads the
    # tokens file (and reloads it once if a SIGHUP came meanwhile): a reload sent while
    # this worker starts must not kill it. The supervisor started it with SIGHUP blocked.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    _exit_with_supervisor(args.supervisor_pid)
    config = pickle.load(sys.stdin.buffer)
    assert isinstance(config, ServerConfig)
    configure_logging(config.log_level, args.index)
    return CANNOT_START_EXIT if run_daemon(config) else 0


def _exit_with_supervisor(supervisor_pid: int) -> None:
    """SIGTERM (drain, withdraw, exit) when the supervisor dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The supervisor may have died before the request was made: then nobody signals.
    if os.getppid() != supervisor_pid:
        raise SystemExit("kvstore worker: the supervisor is gone; not starting")


# -- the supervisor ------------------------------------------------------------------


@dataclasses.dataclass
class _Worker:
    index: int
    config: ServerConfig
    process: subprocess.Popen[bytes] | None = None
    num_starts: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    backoff_s: float = RESTART_BACKOFF_MIN_S


def supervise(config: ServerConfig, configs: list[ServerConfig]) -> int:
    """Run one worker per config until a stop signal; the process's exit code."""
    try:
        check_exposure(config)
    except InvalidRequest as error:
        logger.error("cannot start: %s", error)
        return 1
    usable_cpus = len(os.sched_getaffinity(0))
    if len(configs) > usable_cpus:
        logger.warning(
            "%d workers on %d usable CPUs: they will share cores (one daemon uses about one)",
            len(configs),
            usable_cpus,
        )
    workers = [_Worker(index, worker_config) for index, worker_config in enumerate(configs)]
    with _signals_to_pipe((*_STOP_SIGNALS, signal.SIGHUP, signal.SIGCHLD)) as wait_for_signals:
        return _Supervisor(workers, wait_for_signals).run()


class _Supervisor:
    def __init__(
        self, workers: list[_Worker], wait_for_signals: Callable[[float], set[int]]
    ) -> None:
        self.workers = workers
        self.wait_for_signals = wait_for_signals
        self.stopping = False
        self.failed = False

    def run(self) -> int:
        for worker in self.workers:
            self._start(worker)
        # Until every worker has exited and none is waiting for its restart: workers that
        # all die at once (or each within another's back-off) are restarted, not taken for
        # a finished service.
        while any(
            worker.process is not None or worker.restart_at is not None for worker in self.workers
        ):
            received = self.wait_for_signals(self._wait_s())
            for signum in _STOP_SIGNALS:
                if signum in received:
                    self._stop(signal.Signals(signum))
            if signal.SIGHUP in received:
                logger.info("SIGHUP: forwarded to the workers")
                self._send(signal.SIGHUP)
            self._reap()
            now = time.monotonic()
            for worker in self.workers:
                if worker.restart_at is not None and worker.restart_at <= now:
                    self._start(worker)
        logger.info("every worker has exited")
        return 1 if self.failed else 0

    def _wait_s(self) -> float:
        # Children are also polled each second: a SIGCHLD is never the only wake-up.
        due = [w.restart_at for w in self.workers if w.restart_at is not None]
        return max(0.0, min([1.0, *(at - time.monotonic() for at in due)]))

    def _start(self, worker: _Worker) -> None:
        worker.restart_at = None
        command = [
            sys.executable,
            "-m",
            "kvstore.server.workers",
            "--index",
            str(worker.index),
            "--supervisor-pid",
            str(os.getpid()),
        ]
        # SIGHUP is blocked across the exec (a blocked signal stays blocked, and pending, in
        # the child): a reload forwarded while the worker starts cannot kill it before
        # worker_main ignores it; the daemon reads the tokens file after that anyway.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            process = subprocess.Popen(command, stdin=subprocess.PIPE)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        assert process.stdin is not None
        # A worker that dies at once closes the pipe; its exit is reaped like any other.
        with contextlib.suppress(BrokenPipeError), process.stdin:
            process.stdin.write(pickle.dumps(worker.config))
        worker.process, worker.started_at = process, time.monotonic()
        worker.num_starts += 1
        config = worker.config
        data_plane = {-1: "off", 0: "any free port"}.get(config.data_port, str(config.data_port))
        logger.info(
            "worker %d started: pid %d, gRPC %s, data port %s, SSD %s",
            worker.index,
            process.pid,
            config.listen,
            data_plane,
            config.store.ssd_dir or "none",
        )

    def _stop(self, signum: signal.Signals) -> None:
        if not self.stopping:
            logger.info("%s: draining %d workers", signum.name, len(self.workers))
        self.stopping = True
        for worker in self.workers:
            worker.restart_at = None  # a worker waiting for its restart stays down
        self._send(signum)

    def _send(self, signum: signal.Signals) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signum)

    def _reap(self) -> None:
        for worker in self.workers:
            process = worker.process
            if process is None or (code := process.poll()) is None:
                continue
            worker.process = None
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited {code}"
            if self.stopping:
                # A worker still starting has no handler yet: the stop signal itself ends
                # it, which is the stop asked for, not a failure.
                if code != 0 and -code not in _STOP_SIGNALS:
                    self.failed = True
                    logger.warning("worker %d %s while draining", worker.index, how)
                continue
            if code == CANNOT_START_EXIT and worker.num_starts == 1:
                logger.error("worker %d could not start (its log says why); stopping", worker.index)
                self.failed = True
                self._stop(signal.SIGTERM)
                continue
            if time.monotonic() - worker.started_at >= STABLE_AFTER_S:
                worker.backoff_s = RESTART_BACKOFF_MIN_S
            logger.warning(
                "worker %d (pid %d) %s unexpectedly; restarting it in %.1fs",
                worker.index,
                process.pid,
                how,
                worker.backoff_s,
            )
            worker.restart_at = time.monotonic() + worker.backoff_s
            worker.backoff_s = min(worker.backoff_s * 2, RESTART_BACKOFF_MAX_S)


@contextlib.contextmanager
def _signals_to_pipe(signums: tuple[int, ...]) -> Iterator[Callable[[float], set[int]]]:
    """Route `signums` to a pipe (signal.set_wakeup_fd); yields `wait(timeout_s)`, which
    returns the signals received meanwhile. No work runs inside a signal handler."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous = {signum: signal.signal(signum, lambda *_: None) for signum in signums}

    def wait(timeout_s: float) -> set[int]:
        readable, _, _ = select.select([read_fd], [], [], timeout_s)
        if not readable:
            return set()
        with contextlib.suppress(BlockingIOError):
            return set(os.read(read_fd, 1024))
        return set()

    try:
        yield wait
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(read_fd)
        os.close(write_fd)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
