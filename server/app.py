"""Server assembly: `build_server(config)`, then `serve()` until a signal drains it."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from kvstore.allocator import tune_allocator
from kvstore.cluster.members import Member, parse_etcd_url
from kvstore.errors import InvalidRequest
from kvstore.mover import TierMover
from kvstore.server.auth import Authenticator
from kvstore.server.config import ServerConfig
from kvstore.server.dataplane import DataPlane
from kvstore.server.gc_policy import GcPolicy
from kvstore.server.handlers import add_kvstore_service
from kvstore.server.lifecycle import Lifecycle
from kvstore.server.loopwatch import LoopWatch
from kvstore.server.membership import Registration, check_etcd, node_id_for
from kvstore.server.metrics import DaemonMetrics, start_metrics
from kvstore.server.servicer import KVStoreServicer
from kvstore.server.shm_socket import sweep_dead_auto_sockets
from kvstore.server.standard_services import add_health_service, add_reflection_service
from kvstore.server.tls import load_server_tls
from kvstore.server.transfer import Transfers
from kvstore.store import BlockStore
from kvstore.v1 import kvstore_pb2 as pb

logger = logging.getLogger("kvstore.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVStore"].full_name


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    store: BlockStore
    mover: TierMover
    servicer: KVStoreServicer
    health: health.aio.HealthServicer
    config: ServerConfig
    data_plane: DataPlane | None
    loop_watch: LoopWatch
    auth: Authenticator | None
    membership: Registration | None = None
    metrics: DaemonMetrics | None = None  # None: metrics_port = -1
    gc_policy: GcPolicy | None = None  # None: gc_freeze_interval_s = 0

    def reload_tokens(self) -> bool:
        """Read the tokens file again (SIGHUP) and close the idle data-plane connections
        of tokens it no longer grants; False (old tokens kept) if it cannot be read."""
        if self.auth is None or not self.auth.reload():
            return False
        if self.data_plane is not None:
            self.data_plane.close_revoked()
        return True

    async def drain(self) -> None:
        """Stop taking new work, let streams in flight finish, then stop."""
        logger.info(
            "draining: health NOT_SERVING, refusing new RPCs, %.0fs grace",
            self.config.limits.drain_grace_s,
        )
        self.servicer.start_draining()
        # Out of the cluster first, so that no client places new blocks here.
        if self.membership is not None:
            await self.membership.withdraw()
        await self.health.enter_graceful_shutdown()
        grace_s = self.config.limits.drain_grace_s
        if self.data_plane is not None:
            await asyncio.gather(self.server.stop(grace_s), self.data_plane.drain(grace_s))
        else:
            await self.server.stop(grace_s)
        if self.store.has_ssd:
            flushed, unwritten = await self.mover.flush_all()
            logger.info("flushed %d blocks to SSD", flushed)
            if unwritten:
                logger.error(
                    "%d write-back blocks could not be written to SSD and are lost with this "
                    "process (the SSD tier: %s)",
                    unwritten,
                    self.store.pool.ssd.degraded_reason if self.store.pool.ssd else "none",
                )
        await self.mover.close()
        # Served to the end, so that a scrape can watch the drain.
        if self.metrics is not None:
            await self.metrics.stop()
        await self.loop_watch.stop()
        if self.gc_policy is not None:
            await self.gc_policy.stop()
        logger.info("stopped")


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def is_loopback(host: str) -> bool:
    """Whether `host` (a listen address) reaches only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def check_exposure(config: ServerConfig) -> None:
    """Refuse to serve beyond loopback with no protection at all, unless told to."""
    if (
        config.auth.enabled
        or config.tls is not None
        or config.insecure
        or is_loopback(config.listen_host)
    ):
        return
    raise InvalidRequest(
        f"refusing to listen on {config.listen_host} with neither authentication nor TLS: "
        f"anyone who reaches it could read, pin and delete every tenant's blocks. Set "
        f"[auth] tokens_file (--tokens-file), or [tls] (--tls-cert, --tls-key), or pass "
        f"--insecure (insecure = true) if this network is trusted"
    )


def metrics_host(config: ServerConfig) -> str:
    """Where /metrics listens: `metrics_host`, else listen's host if that is loopback,
    else 127.0.0.1 (the endpoint has no authentication)."""
    host = config.metrics_host or (
        config.listen_host if is_loopback(config.listen_host) else "127.0.0.1"
    )
    return host.removeprefix("[").removesuffix("]")


def build_authenticator(config: ServerConfig) -> Authenticator | None:
    """The authenticator `[auth]` asks for; None where authentication is off."""
    if not config.auth.enabled:
        return None
    tokens_file = Path(config.auth.tokens_file) if config.auth.tokens_file else None
    try:
        return Authenticator(tokens_file, certificate_tenants=config.auth.certificate_tenants)
    except ValueError as error:
        raise InvalidRequest(str(error)) from None


async def build_server(config: ServerConfig) -> RunningServer:
    """Create the store and a started gRPC server for it; the port is the bound one."""
    check_exposure(config)
    auth = build_authenticator(config)
    tls = load_server_tls(config.tls) if config.tls is not None else None
    if config.cluster is not None:
        # Before anything listens: settings etcd refuses stop the daemon here.
        await check_etcd(parse_etcd_url(config.cluster.etcd), config.cluster.etcd_access())
    if config.tune_allocator:
        tune_allocator()
    store = BlockStore(config.store)
    mover = TierMover(store)
    # The index holds what the SSD directory holds before serving, or, for a directory
    # too large to index in a moment, fills in the background (kvstore.recovery).
    await mover.recover_while_serving()
    await mover.start()
    # One lifecycle and one transfer module, shared by gRPC and the data plane.
    lifecycle = Lifecycle()
    transfers = Transfers(store, mover, config.limits)
    servicer = KVStoreServicer(store, transfers, lifecycle, config.limits, auth)
    # No SO_REUSEPORT (gRPC's default): a second daemon on this port must fail to start,
    # not share its connections; and a port-0 bind cannot land on another server's port.
    server = grpc.aio.server(
        options=[*channel_options(config.limits.max_message_bytes), ("grpc.so_reuseport", 0)]
    )
    add_kvstore_service(servicer, server)
    health_servicer = health.aio.HealthServicer()
    # Registered so that a request that does not parse is INVALID_ARGUMENT, not UNKNOWN.
    add_health_service(health_servicer, server)
    # Health stays open to probes. Reflection lists the API to anyone, so with
    # authentication on it is served only where [auth] reflection says so.
    if auth is None or config.auth.reflection:
        add_reflection_service((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if tls is None:
        port = _listen_on_every_address(config.listen, server.add_insecure_port)
    else:
        credentials = tls.grpc_credentials
        port = _listen_on_every_address(
            config.listen, lambda address: server.add_secure_port(address, credentials)
        )
    data_plane = None
    shm_path = config.shm_socket_path()
    if shm_path is not None and config.shm_socket == "auto":
        sweep_dead_auto_sockets(os.path.dirname(shm_path))
    if config.data_port >= 0 or shm_path is not None:
        tls_context = tls.data_plane_context if tls is not None else None
        data_plane = DataPlane(
            transfers,
            lifecycle,
            config.limits,
            auth,
            tls_context=tls_context,
            quotas=config.store.quotas,
            lookups=servicer.lookups,
        )
        servicer.data_plane_tls = tls is not None
        try:
            if config.data_port >= 0:
                servicer.data_plane_port = await data_plane.start(
                    config.listen_host, config.data_port
                )
            if shm_path is not None:
                await data_plane.start_unix(shm_path)
                servicer.shm_path = shm_path
                servicer.shm_instance = data_plane.instance
            servicer.data_plane_counts = data_plane.counts
        except OSError:
            await data_plane.drain(0)
            await mover.close()
            raise
    loop_watch = LoopWatch()
    metrics = None
    if config.metrics_port >= 0:
        try:
            metrics = await start_metrics(
                metrics_host(config),
                config.metrics_port,
                store,
                loop_watch,
                data_plane,
                servicer.watch_hub,
            )
        except OSError:
            if data_plane is not None:
                await data_plane.drain(0)
            await mover.close()
            raise
        servicer.request_metrics = transfers.request_metrics = metrics.requests
        servicer.lookups.request_metrics = metrics.requests
        if data_plane is not None:
            data_plane.request_metrics = metrics.requests
    # Started last, so that a failed start leaves no probe behind; stopped by drain.
    loop_watch.start()
    servicer.loop_watch = loop_watch
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info(
        "serving kvstore.v1 on %s (port %d), data plane %s; tiers: %s; eviction %s, %s",
        config.listen,
        port,
        (f"on port {servicer.data_plane_port}" if servicer.data_plane_port else "off")
        + (f", same-host path on {servicer.shm_path}" if servicer.shm_path else ""),
        ", ".join(f"{tier.name} {tier.capacity_bytes >> 20} MiB" for tier in store.report().tiers),
        config.store.eviction_policy,
        config.store.write_policy if store.has_ssd else "no SSD",
    )
    logger.info("protections: %s", protections_line(config, auth))
    if metrics is not None:
        logger.info("metrics on %s", metrics.url)
        if not is_loopback(metrics.host):
            logger.warning(
                "metrics on %s have no authentication and show every tenant's use: keep "
                "that port behind a firewall, or a proxy that authenticates",
                metrics.url,
            )
    running = RunningServer(
        server, port, store, mover, servicer, health_servicer, config, data_plane, loop_watch, auth
    )
    running.metrics = metrics
    if config.gc_freeze_interval_s > 0:
        # After recovery and start-up: the index and the modules are frozen at once.
        running.gc_policy = GcPolicy(config.gc_freeze_interval_s, config.gc_full_interval_s)
        running.gc_policy.start()
        if metrics is not None:
            metrics.collector.gc_policy = running.gc_policy
    if config.cluster is not None:
        running.membership = start_membership(running)
    return running


def start_membership(running: RunningServer) -> Registration:
    """Register in etcd in the background: an unreachable etcd delays nothing."""
    config = running.config
    assert config.cluster is not None
    address = config.cluster.advertise
    if not address:
        host = config.listen_host
        address = f"[{host}]:{running.port}" if ":" in host else f"{host}:{running.port}"
    member = Member(
        node_id=node_id_for(config.store.ssd_dir),
        address=address,
        data_port=running.servicer.data_plane_port,
        capacity_bytes={tier.name: tier.capacity_bytes for tier in running.store.report().tiers},
    )
    registration = Registration(
        parse_etcd_url(config.cluster.etcd),
        member,
        config.cluster.lease_ttl_s,
        config.cluster.etcd_access(),
    )
    registration.start()
    running.servicer.cluster_state = lambda: (registration.registered, member.node_id)
    if running.metrics is not None:
        running.metrics.collector.cluster_state = running.servicer.cluster_state
    return registration


def protections_line(config: ServerConfig, auth: Authenticator | None) -> str:
    """Which protections are on, for the log."""
    if auth is None:
        who = "authentication OFF (any caller may act as any tenant)"
    else:
        sources = [f"{auth.num_tokens} bearer tokens"] if config.auth.tokens_file else []
        if auth.certificate_tenants:
            sources.append("client certificates name tenants")
        who = "authentication on (" + ", ".join(sources) + ")"
    reflection_on = auth is None or config.auth.reflection
    tls = "TLS off"
    if config.tls is not None:
        tls = "TLS on (mutual)" if config.tls.mutual else "TLS on"
    return f"{who}; {tls}; reflection {'on' if reflection_on else 'off'}"


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    loop = asyncio.get_running_loop()
    # A SIGHUP while the daemon starts must neither kill it (the default action) nor be
    # lost: the tokens file may have been read before the change it announces.
    reload_asked = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload_asked.set)
    running = await build_server(config)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if running.auth is not None:
        loop.add_signal_handler(signal.SIGHUP, running.reload_tokens)
        if reload_asked.is_set():
            running.reload_tokens()
    else:
        loop.add_signal_handler(signal.SIGHUP, _no_tokens_to_reload)
    await stop.wait()
    await running.drain()


def _no_tokens_to_reload() -> None:
    logger.info("SIGHUP: no tokens file to reload (authentication is off)")


def _listen_on_every_address(listen: str, add_port: Callable[[str], int]) -> int:
    """Bind `listen` (HOST:PORT) on every address its host resolves to, each or none;
    returns the port. gRPC given a name binds what it can of the addresses it resolves
    and carries on: a daemon on `localhost:P` whose 127.0.0.1:P another daemon holds
    would serve on ::1 alone, as if it owned the port."""
    host, _, port_text = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as error:
            raise OSError(f"cannot listen on {listen}: {error}") from error
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    port = int(port_text)
    for address in addresses:
        target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        try:
            bound = add_port(target)
        except RuntimeError as error:  # grpcio reports a failed bind (port in use) this way
            raise OSError(f"cannot listen on {listen} ({target}): {error}") from error
        if bound == 0:
            raise OSError(f"cannot listen on {listen} ({target})")
        port = bound  # a port-0 listen: every address on the port the first one took
    return port
