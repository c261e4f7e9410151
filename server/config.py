"""The daemon's configuration: one frozen tree, from a TOML file and command-line flags.

Flags override the file; the file overrides the defaults. This is the only module that
reads configuration from outside (files, flags); components receive their own part.

    listen = "127.0.0.1:50051"
    data_port = 0                # TCP data plane for put/get bytes, on listen's host;
                                 # 0: any free port (clients ask over gRPC), -1: off
    shm_socket = "auto"          # the same-host path's Unix socket: auto (a fresh path
                                 # under $XDG_RUNTIME_DIR or the temp dir), off, or a path
    log_level = "info"
    tune_allocator = true        # keep megabyte message buffers on the heap
    gc_freeze_interval_s = 1     # no automatic full collections; freeze what survives
                                 # the young ones this often; 0: CPython's collector as is
    gc_full_interval_s = 3600    # a full collection of everything this often; 0: never
    workers = 1                  # daemon processes splitting the capacity (> 1 needs
                                 # [cluster]; kvstore.server.workers)
    metrics_port = -1            # Prometheus /metrics over HTTP: -1 off, 0 any free port
    metrics_host = ""            # where /metrics listens; empty: listen's host if
                                 # loopback, else 127.0.0.1

    [store]
    dram_bytes = "1GiB"
    page_bytes = "64KiB"
    eviction_policy = "lru"      # lru | lfu | session
    max_lease_s = 3600
    hbm_bytes = 0                # 0: no HBM tier; on a host without a GPU it is emulated
    hbm_device = "auto"          # auto | cpu | cuda[:N]
    hbm_promote_after_seen = 2
    ssd_dir = "/var/lib/kvstore" # unset: no SSD tier
    ssd_bytes = "16GiB"
    ssd_fsync = false            # true survives power loss too, not only process crashes
    write_policy = "write-back"  # write-back | write-through
    ssd_admit_after_seen = 1     # 2: a block must be seen twice before it earns SSD
    ssd_compression = "off"      # off | lz4: byte-shuffled lz4 per layer, where it pays
    ssd_compress_min_saving = 0.1  # a layer stays raw unless lz4 saves this fraction
    promote_on_hit = true
    high_watermark = 0.95
    low_watermark = 0.85
    read_bytes_per_s = {dram = "200MB", ssd = "50MB"}  # throttle gets' reads of a tier
                                 # (--throttle-read dram=200MB); unnamed tiers: no limit

    [limits]
    max_message_bytes = "8MiB"   # largest gRPC message accepted or sent
    default_chunk_bytes = "1MiB" # GetBlocks message payload unless the client asks
    max_keys = 65536             # keys in one request
    drain_grace_s = 30
    max_data_connections = 1024  # open data-plane connections; more fall back to gRPC
    stream_idle_timeout_s = 30   # a put or get stream waiting on its client this long is cut
    frame_timeout_s = 10         # a data-plane frame, once begun, must arrive whole by then
    max_transfer_s = 600         # the longest deadline a put or get may have

    [tls]                        # absent: plaintext gRPC and data plane
    cert_file = "server.pem"     # PEM certificate chain, for gRPC and the data plane
    key_file = "server.key"      # its PEM private key
    client_ca_file = "ca.pem"    # optional: mutual TLS, client certificates required
    [quotas."team-a"]            # one table per tenant; every key optional
    dram_bytes = "4GiB"          # its own share of the tier; tenants without one share
    hbm_bytes = "1GiB"           #   what the quotas leave
    ssd_bytes = "64GiB"
    pinned_bytes = "1GiB"        # block bytes it may hold under leases at once
    max_lease_s = 600            # its longest lease
    max_transfers = 64           # puts and gets it may run at once

    [cluster]                    # absent: a lone daemon, registered nowhere
    etcd = "etcd://10.0.0.5:2379,10.0.0.6:2379/kvstore"  # registers under PREFIX/members/
                                 # (etcds://... : etcd over TLS)
    advertise = "10.0.0.7:50051" # gRPC HOST:PORT others reach it at (default: listen)
    lease_ttl_s = 10             # its key goes this long after the daemon dies
    etcd_ca_file = "etcd-ca.pem" # etcds://: the CA etcd's certificate chains to (unset:
                                 # the system's trust store)
    etcd_cert_file = "node.pem"  # etcds://: a client certificate, for an etcd with
    etcd_key_file = "node.key"   #   --client-cert-auth
    etcd_server_name = ""        # the name to check in etcd's certificate (default: host)
    etcd_user = "kvstore"        # etcd auth: the user, and its password's file (the first
    etcd_password_file = "/run/secrets/etcd"  # line); or $KVSTORE_ETCD_PASSWORD
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore import units
from kvstore.cluster.etcd_options import (
    ETCD_SETTINGS,
    PASSWORD_ENV,
    EtcdAccess,
    EtcdOptions,
    load_access,
)
from kvstore.cluster.members import is_concrete_host, parse_etcd_url, parse_host_port
from kvstore.config import StoreConfig, TenantQuota
from kvstore.errors import InvalidRequest
from kvstore.server.shm_socket import auto_socket_name
from kvstore.wire.chunks import MIN_CHUNK_BYTES

# sun_path holds 108 bytes, the last a NUL.
_MAX_UNIX_PATH_BYTES = 107

_LOG_LEVELS = ("debug", "info", "warning", "error")
# Past this, a host is better served by more machines than by more processes.
MAX_WORKERS = 256


# The largest BlockEvent on the wire: two keys of 64 bytes, a tier, a kind and framing.
MAX_WATCH_EVENT_BYTES = 160


@dataclass(frozen=True, kw_only=True)
class Limits:
    max_message_bytes: int = 8 << 20
    default_chunk_bytes: int = 1 << 20
    max_keys: int = 65536
    drain_grace_s: float = 30.0
    # Open data-plane connections; past it, new ones are turned away (clients use gRPC).
    max_data_connections: int = 1024
    # A put or get stream that waits this long on its client (no message received for a
    # put, nothing taken by the client for a get) is cut, whatever its deadline. A layer
    # put waits on a forward pass between layers, and a decode worker may read layer by
    # layer as it computes: a long-context layer on a slow or emulated device takes
    # seconds, so tens of seconds leave room for that while still freeing, within a
    # minute, what a vanished or stalled client holds.
    stream_idle_timeout_s: float = 30.0
    # A data-plane frame, once its first byte is in, must arrive whole within this: a
    # healthy sender writes a frame in one burst (8 MiB at 0.8 MB/s still makes it), so
    # only a sender trickling bytes, or a broken network, is cut.
    frame_timeout_s: float = 10.0
    # The longest a put or get may run, whatever deadline the client asked for (or none,
    # over gRPC). The client library's default is 120 s; 128K tokens of Llama-3-70B
    # (40 GiB) move in well under a minute on the reference machine's loopback.
    max_transfer_s: float = 600.0
    # WatchBlocks (kvstore.server.watch): live events one watcher may fall behind before
    # they are dropped for a GAP and a fresh snapshot; the most events in one message;
    # watch streams open at once, in all and per namespace tenant.
    watch_queue_events: int = 65536
    watch_batch_events: int = 1024
    max_watchers: int = 256
    max_watchers_per_tenant: int = 32

    def __post_init__(self) -> None:
        # gRPC takes the limit as a C int; 1 GiB keeps well inside it.
        if not 64 << 10 <= self.max_message_bytes <= 1 << 30:
            raise InvalidRequest("limits.max_message_bytes must be between 64KiB and 1GiB")
        # A chunk travels with a few dozen bytes of framing; keep it inside the limit.
        if not self.min_chunk_bytes <= self.default_chunk_bytes <= self.max_chunk_bytes:
            raise InvalidRequest(
                f"limits.default_chunk_bytes must be in [{self.min_chunk_bytes}, "
                f"{self.max_chunk_bytes}] (at least 64KiB, and max_message_bytes minus "
                f"4KiB of framing at most)"
            )
        if self.max_keys < 1:
            raise InvalidRequest("limits.max_keys must be >= 1")
        if not self.drain_grace_s >= 0:  # NaN too: a drain would never end
            raise InvalidRequest("limits.drain_grace_s must be >= 0")
        if self.max_data_connections < 1:
            raise InvalidRequest("limits.max_data_connections must be >= 1")
        for name in ("stream_idle_timeout_s", "frame_timeout_s", "max_transfer_s"):
            if not getattr(self, name) > 0:
                raise InvalidRequest(f"limits.{name} must be > 0 seconds")
        for name in (
            "watch_queue_events",
            "watch_batch_events",
            "max_watchers",
            "max_watchers_per_tenant",
        ):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"limits.{name} must be >= 1")

    @property
    def watch_message_events(self) -> int:
        """The most events one WatchBlocks message carries: `watch_batch_events`, or fewer
        where that many of the largest events would not fit in `max_message_bytes`."""
        return min(self.watch_batch_events, self.max_message_bytes // MAX_WATCH_EVENT_BYTES)

    @property
    def max_chunk_bytes(self) -> int:
        return self.max_message_bytes - 4096

    @property
    def min_chunk_bytes(self) -> int:
        """The least layer data a get message carries (kvstore.wire.chunks.MIN_CHUNK_BYTES),
        or the most a message may carry, where the message limit is smaller than that."""
        return min(MIN_CHUNK_BYTES, self.max_chunk_bytes)


@dataclass(frozen=True, kw_only=True)
class AuthConfig:
    """Who may call (kvstore.server.auth). Authentication is on when either is set."""

    # TOML of [[tokens]] entries: each token's SHA-256, tenant and role; SIGHUP rereads it.
    tokens_file: str = ""
    # With mutual TLS, a client certificate's common name is its tenant when it sends
    # no token.
    certificate_tenants: bool = False
    # Serve gRPC reflection to anyone even with authentication on (off: it lists the API).
    reflection: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.tokens_file) or self.certificate_tenants


@dataclass(frozen=True, kw_only=True)
class TLSConfig:
    """TLS on gRPC and on the data plane alike; the files are read once, at start-up
    (kvstore.server.tls), so a new certificate takes a restart."""

    cert_file: str = ""
    key_file: str = ""
    # Set: mutual TLS, every client must present a certificate this CA signed.
    client_ca_file: str = ""

    def __post_init__(self) -> None:
        if not self.cert_file or not self.key_file:
            raise InvalidRequest(
                "tls needs both cert_file (--tls-cert) and key_file (--tls-key); got "
                f"cert_file={self.cert_file!r}, key_file={self.key_file!r}"
            )

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_file)


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Membership in etcd (kvstore.server.membership)."""

    etcd: str = ""  # etcd://HOST:PORT[,HOST:PORT...]/PREFIX, or etcds:// for TLS
    # The gRPC HOST:PORT other machines reach this daemon at; empty: listen's (which
    # must then be a concrete address); its data plane is on the same host.
    advertise: str = ""
    lease_ttl_s: int = 10
    # A secured etcd (kvstore.cluster.etcd_options.EtcdOptions; empty: unset). The TLS
    # settings need an etcds:// URL.
    etcd_ca_file: str = ""
    etcd_cert_file: str = ""
    etcd_key_file: str = ""
    etcd_server_name: str = ""
    etcd_user: str = ""
    etcd_password_file: str = ""
    # Never a setting: load_config takes it from $KVSTORE_ETCD_PASSWORD where etcd_user
    # is set and etcd_password_file is not.
    etcd_password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not self.etcd:
            raise InvalidRequest('[cluster] needs etcd = "etcd://HOST:PORT/PREFIX" (--cluster)')
        try:
            # Reads the TLS and password files: a missing one stops the daemon here.
            load_access(parse_etcd_url(self.etcd), self.etcd_options())
            if self.advertise:
                parse_host_port(self.advertise, what="cluster.advertise (--advertise)")
        except ValueError as error:
            raise InvalidRequest(str(error)) from None
        if self.advertise and not is_concrete_host(self.advertise.rpartition(":")[0].strip("[]")):
            raise InvalidRequest(
                f"cluster.advertise {self.advertise!r} must name a host others can reach, "
                f"not a wildcard address"
            )
        # etcd refuses leases shorter than its minimum (about 2 s with default timing).
        if not 2 <= self.lease_ttl_s <= 3600:
            raise InvalidRequest(
                f"cluster.lease_ttl_s must be in [2, 3600], got {self.lease_ttl_s}"
            )

    def etcd_access(self) -> EtcdAccess:
        """The etcd settings with their files read (again: a file that went away since
        start-up is InvalidRequest)."""
        try:
            return load_access(parse_etcd_url(self.etcd), self.etcd_options())
        except ValueError as error:
            raise InvalidRequest(str(error)) from None

    def etcd_options(self) -> EtcdOptions:
        """The etcd TLS and credential settings (ValueError where they contradict)."""
        return EtcdOptions(
            ca_file=self.etcd_ca_file or None,
            cert_file=self.etcd_cert_file or None,
            key_file=self.etcd_key_file or None,
            server_name=self.etcd_server_name or None,
            user=self.etcd_user or None,
            password_file=self.etcd_password_file or None,
            password=self.etcd_password or None,
        )


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    # The TCP data plane (kvstore.wire.frames) listens on listen's host at this port; 0
    # takes any free port (clients learn it over gRPC), -1 turns it off.
    data_port: int = 0
    # The same-host path's Unix socket (kvstore.wire.shm): "auto" (a fresh path in the
    # runtime directory; off under mutual TLS), "off", or a path.
    shm_socket: str = "auto"
    log_level: str = "info"
    # Keep megabyte message buffers on the heap (see kvstore.allocator).
    tune_allocator: bool = True
    # kvstore.server.gc_policy: every gc_freeze_interval_s the survivors of a young
    # collection leave the collector's walks (0: CPython's collector as it is); every
    # gc_full_interval_s one full collection, frozen objects too (0: never).
    gc_freeze_interval_s: float = 1.0
    gc_full_interval_s: float = 3600.0
    store: StoreConfig = field(default_factory=StoreConfig)
    limits: Limits = field(default_factory=Limits)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TLSConfig | None = None  # None: plaintext
    # Listen beyond loopback with neither authentication nor TLS: refused unless set.
    insecure: bool = False
    cluster: ClusterConfig | None = None  # None: registered nowhere
    # Daemon processes on this host, each with 1/workers of every tier, registered as
    # one member each (kvstore.server.workers); more than one needs [cluster].
    workers: int = 1
    # Prometheus `/metrics` over plain HTTP (kvstore.server.metrics): -1 off, 0 any free
    # port (logged), else that port; on `metrics_host`. Empty: listen's host where that is
    # loopback, else 127.0.0.1: it has no authentication and shows every tenant's use, so
    # it reaches beyond this machine only where an operator names such a host.
    metrics_port: int = -1
    metrics_host: str = ""

    def __post_init__(self) -> None:
        for name in ("gc_freeze_interval_s", "gc_full_interval_s"):
            if not getattr(self, name) >= 0:
                raise InvalidRequest(f"{name} must be 0 (off) or more seconds")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise InvalidRequest(f"workers must be in [1, {MAX_WORKERS}], got {self.workers}")
        if self.workers > 1 and self.cluster is None:
            raise InvalidRequest(
                f"workers = {self.workers} needs [cluster] (--cluster etcd://HOST:PORT/PREFIX): "
                f"clients find the workers only through the cluster's membership"
            )
        if self.auth.certificate_tenants and (self.tls is None or not self.tls.mutual):
            raise InvalidRequest(
                "[auth] certificate_tenants needs mutual TLS: set [tls] client_ca_file "
                "(--tls-client-ca), so that client certificates are required and verified"
            )
        if self.log_level not in _LOG_LEVELS:
            raise InvalidRequest(f"log_level must be one of {_LOG_LEVELS}, got {self.log_level!r}")
        if ":" not in self.listen:
            raise InvalidRequest(f"listen must be HOST:PORT, got {self.listen!r}")
        if not -1 <= self.data_port <= 65535:
            raise InvalidRequest(
                f"data_port must be a port, 0 for any free port or -1 for none, "
                f"got {self.data_port}"
            )
        if self.shm_socket not in ("auto", "off"):
            if len(os.fsencode(self.shm_socket)) > _MAX_UNIX_PATH_BYTES:
                raise InvalidRequest(
                    f"shm_socket is a Unix socket path of at most {_MAX_UNIX_PATH_BYTES} "
                    f"bytes, got {self.shm_socket!r}"
                )
            if self.tls is not None and self.tls.mutual:
                raise InvalidRequest(
                    "shm_socket cannot be set with mutual TLS: a Unix socket carries no "
                    'client certificate; set shm_socket = "off"'
                )
        if not -1 <= self.metrics_port <= 65535:
            raise InvalidRequest(
                f"metrics_port must be a port, 0 for any free port or -1 for none (the "
                f"default), got {self.metrics_port}"
            )
        if self.metrics_host and (
            self.metrics_host != self.metrics_host.strip() or "/" in self.metrics_host
        ):
            raise InvalidRequest(
                f"metrics_host must be a host name or address (no port, no scheme), "
                f"got {self.metrics_host!r}"
            )
        if (
            self.cluster is not None
            and not self.cluster.advertise
            and not is_concrete_host(self.listen_host)
        ):
            raise InvalidRequest(
                f"[cluster] needs advertise (--advertise HOST:PORT): listen {self.listen!r} "
                f"does not name an address other machines can reach"
            )

    def shm_socket_path(self) -> str | None:
        """Where the same-host path listens; None: it is off. "auto" makes a fresh name
        per call, in $XDG_RUNTIME_DIR where set, else the temporary directory."""
        if self.shm_socket == "off" or (
            self.shm_socket == "auto" and self.tls is not None and self.tls.mutual
        ):
            return None
        if self.shm_socket != "auto":
            return self.shm_socket
        name = auto_socket_name(os.getpid(), secrets.token_hex(4))
        for directory in (os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir(), "/tmp"):
            if directory and os.access(directory, os.W_OK):
                path = os.path.join(directory, name)
                if len(os.fsencode(path)) <= _MAX_UNIX_PATH_BYTES:
                    return path
        return None

    @property
    def listen_host(self) -> str:
        """The host part of `listen`, without IPv6 brackets."""
        host = self.listen.rsplit(":", 1)[0]
        return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def parse_size(value: str | int) -> int:
    """'64KiB', '1.5GiB', '1000000' or an int → bytes; InvalidRequest otherwise."""
    try:
        return units.parse_size(value)
    except ValueError as error:
        raise InvalidRequest(str(error)) from None


_SIZE_FIELDS = {
    "dram_bytes",
    "page_bytes",
    "max_message_bytes",
    "default_chunk_bytes",
    "hbm_bytes",
    "ssd_bytes",
    "max_put_reserved_bytes",
}


def _build(cls: Any, table: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise InvalidRequest(f"unknown setting(s) {unknown} in [{where}]; known: {sorted(known)}")
    values = {k: parse_size(v) if k in _SIZE_FIELDS else v for k, v in table.items()}
    for f in dataclasses.fields(cls):
        if f.name in values:
            _check_type(
                f"{where}.{f.name}" if where != "top level" else f.name, values[f.name], f.default
            )
    return cls(**values)


def _check_type(name: str, value: Any, default: Any) -> None:
    """Reject a value whose type differs from the default's (a string where a number goes)."""
    kind = type(default)
    if kind not in (bool, int, float, str):
        return
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise InvalidRequest(f"{name} must be a {kind.__name__}, got {value!r}")


def load_config(path: Path | None, overrides: dict[str, Any]) -> ServerConfig:
    """Defaults, then the TOML file at `path`, then `overrides` ({"store.dram_bytes": ...})."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise InvalidRequest(f"cannot read config file {path}: {error}") from error
    for dotted, value in overrides.items():
        if value is None:
            continue
        if dotted == _THROTTLE_KEY and isinstance(value, list | tuple):
            # --throttle-read TIER=RATE, repeatable: each names one tier, over the file's.
            rates = data.setdefault("store", {}).setdefault("read_bytes_per_s", {})
            if not isinstance(rates, dict):
                raise InvalidRequest(_THROTTLE_TABLE_ERROR)
            rates.update(parse_throttle(item) for item in value)
            continue
        table = data
        *parents, leaf = dotted.split(".")
        for name in parents:
            table = table.setdefault(name, {})
        table[leaf] = value
    if "quotas" in data.get("store", {}):
        raise InvalidRequest('quotas go in [quotas."TENANT"] tables, not in [store]')
    if "read_bytes_per_s" in data.get("store", {}):
        data["store"]["read_bytes_per_s"] = _read_rates(data["store"]["read_bytes_per_s"])
    sections = {"store": StoreConfig, "limits": Limits, "auth": AuthConfig}
    top = {
        k: v for k, v in data.items() if k not in sections and k not in ("quotas", "tls", "cluster")
    }
    parts = {name: _build(cls, data.get(name, {}), name) for name, cls in sections.items()}
    if data.get("tls"):
        parts["tls"] = _build(TLSConfig, data["tls"], "tls")
    if data.get("cluster"):
        parts["cluster"] = _build(ClusterConfig, _with_etcd_password(data["cluster"]), "cluster")
    quotas = _quotas(data.get("quotas", {}))
    if quotas:
        # Checked against the tiers here: a quota on a tier the store lacks, or quotas
        # adding up to more than a tier, fail at start-up.
        parts["store"] = dataclasses.replace(parts["store"], quotas=quotas)
    return _build(ServerConfig, {**top, **parts}, "top level")  # type: ignore[no-any-return]


def _with_etcd_password(table: dict[str, Any]) -> dict[str, Any]:
    """The [cluster] table, with the etcd password from $KVSTORE_ETCD_PASSWORD where a
    user is set and no password file is: a password is never a flag or a TOML value."""
    if "etcd_password" in table:
        raise InvalidRequest(
            "[cluster] etcd_password is not a setting: put the password in a file named by "
            f"etcd_password_file (--etcd-password-file), or in ${PASSWORD_ENV}"
        )
    if table.get("etcd_user") and not table.get("etcd_password_file"):
        return {**table, "etcd_password": os.environ.get(PASSWORD_ENV, "")}
    return table


_THROTTLE_KEY = "store.read_bytes_per_s"
_THROTTLE_TABLE_ERROR = (
    'store.read_bytes_per_s must be a table of tier = rate, e.g. {dram = "200MB", ssd = "50MB"}'
)


def parse_throttle(text: str) -> tuple[str, int]:
    """'dram=200MB' (a --throttle-read value) → ("dram", 200000000); InvalidRequest otherwise.
    The tier name is checked with the rest of the store's config."""
    tier, equals, rate = text.partition("=")
    if not equals or not tier.strip():
        raise InvalidRequest(
            f"--throttle-read takes TIER=RATE (e.g. dram=200MB, ssd=1GiB), got {text!r}"
        )
    return tier.strip().lower(), _rate(tier.strip(), rate)


def _read_rates(table: Any) -> dict[str, int]:
    """`[store] read_bytes_per_s` as {tier: bytes/s}; sizes like "200MB" are read here."""
    if not isinstance(table, dict):
        raise InvalidRequest(_THROTTLE_TABLE_ERROR)
    return {str(tier).lower(): _rate(str(tier), rate) for tier, rate in table.items()}


def _rate(tier: str, rate: Any) -> int:
    if isinstance(rate, str) and rate.strip().startswith("-"):
        raise InvalidRequest(f"the read rate of {tier} must be positive, got {rate!r}")
    try:
        return parse_size(rate)
    except InvalidRequest as error:
        raise InvalidRequest(f"the read rate of {tier}: {error}") from None


_QUOTA_SIZES = ("dram_bytes", "hbm_bytes", "ssd_bytes", "pinned_bytes")


def _quotas(tables: Any) -> dict[str, TenantQuota]:
    """`[quotas."TENANT"]` tables into TenantQuota per tenant."""
    if not isinstance(tables, dict):
        raise InvalidRequest('quotas must be tables, one per tenant: [quotas."TENANT"]')
    quotas = {}
    known = sorted(f.name for f in dataclasses.fields(TenantQuota))
    for tenant, table in tables.items():
        where = f"quotas.{tenant!r}"
        if not isinstance(table, dict):
            raise InvalidRequest(f'{where} must be a table: [quotas."{tenant}"]')
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise InvalidRequest(f"unknown setting(s) {unknown} in [{where}]; known: {known}")
        values: dict[str, Any] = {}
        for name, value in table.items():
            if name in _QUOTA_SIZES:
                values[name] = parse_size(value)
            else:
                _check_type(f"{where}.{name}", value, 0.0 if name == "max_lease_s" else 0)
                values[name] = value
        try:
            quotas[tenant] = TenantQuota(**values)
        except InvalidRequest as error:
            raise InvalidRequest(f"[{where}]: {error}") from None
    return quotas


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (flags override it)")
    parser.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:50051)")
    parser.add_argument(
        "--data-port",
        type=int,
        help="TCP data plane port on the listen host (default 0: any free port; -1: off)",
    )
    parser.add_argument(
        "--shm-socket",
        help="the same-host path's Unix socket: auto (default), off, or a path",
    )
    parser.add_argument("--dram-bytes", dest="store.dram_bytes", help="DRAM tier size, e.g. 4GiB")
    parser.add_argument("--page-bytes", dest="store.page_bytes", help="DRAM arena page size")
    parser.add_argument(
        "--eviction-policy", dest="store.eviction_policy", choices=["lru", "lfu", "session"]
    )
    parser.add_argument("--max-lease-s", dest="store.max_lease_s", type=float)
    parser.add_argument("--hbm-bytes", dest="store.hbm_bytes", help="HBM tier size (0: none)")
    parser.add_argument("--hbm-device", dest="store.hbm_device", help="auto, cpu or cuda[:N]")
    parser.add_argument("--ssd-dir", dest="store.ssd_dir", help="SSD tier directory")
    parser.add_argument("--ssd-bytes", dest="store.ssd_bytes", help="SSD tier size, e.g. 64GiB")
    parser.add_argument("--ssd-fsync", dest="store.ssd_fsync", action="store_true", default=None)
    parser.add_argument(
        "--write-policy", dest="store.write_policy", choices=["write-back", "write-through"]
    )
    parser.add_argument("--ssd-admit-after-seen", dest="store.ssd_admit_after_seen", type=int)
    parser.add_argument(
        "--ssd-compression",
        dest="store.ssd_compression",
        choices=["off", "lz4"],
        help="SSD block files: off (default) or lz4 per layer after a byte shuffle",
    )
    parser.add_argument(
        "--ssd-compress-min-saving",
        dest="store.ssd_compress_min_saving",
        type=float,
        help="a layer is stored raw unless lz4 saves this fraction of it (default 0.1)",
    )
    parser.add_argument(
        "--no-promote-on-hit", dest="store.promote_on_hit", action="store_false", default=None
    )
    parser.add_argument(
        "--max-put-reserved-bytes",
        dest="store.max_put_reserved_bytes",
        help="DRAM one put may hold for blocks it has begun (default 0: half of DRAM)",
    )
    parser.add_argument(
        "--max-namespaces",
        dest="store.max_namespaces",
        type=int,
        help="namespaces holding blocks or puts at once (default 65536)",
    )
    parser.add_argument("--high-watermark", dest="store.high_watermark", type=float)
    parser.add_argument(
        "--throttle-read",
        dest=_THROTTLE_KEY,
        action="append",
        metavar="TIER=RATE",
        help="limit the bytes/s gets read from a tier, all gets together (e.g. dram=200MB, "
        "ssd=1GiB); repeatable; emulates a slow tier or network",
    )
    parser.add_argument("--low-watermark", dest="store.low_watermark", type=float)
    parser.add_argument("--max-message-bytes", dest="limits.max_message_bytes")
    parser.add_argument(
        "--default-chunk-bytes",
        dest="limits.default_chunk_bytes",
        help="GetBlocks payload per message unless the client asks (below max message bytes)",
    )
    parser.add_argument("--max-keys", dest="limits.max_keys", type=int)
    parser.add_argument("--drain-grace-s", dest="limits.drain_grace_s", type=float)
    parser.add_argument("--max-data-connections", dest="limits.max_data_connections", type=int)
    parser.add_argument(
        "--stream-idle-timeout-s",
        dest="limits.stream_idle_timeout_s",
        type=float,
        help="cut a put or get stream that waits this long on its client (default 30)",
    )
    parser.add_argument(
        "--frame-timeout-s",
        dest="limits.frame_timeout_s",
        type=float,
        help="a data-plane frame, once begun, must arrive whole within this (default 10)",
    )
    parser.add_argument(
        "--max-transfer-s",
        dest="limits.max_transfer_s",
        type=float,
        help="the longest deadline a put or get may have, whatever the client asks (default 600)",
    )
    parser.add_argument(
        "--watch-queue-events",
        dest="limits.watch_queue_events",
        type=int,
        help="WatchBlocks: live events a watcher may fall behind before a GAP (default 65536)",
    )
    parser.add_argument(
        "--max-watchers",
        dest="limits.max_watchers",
        type=int,
        help="WatchBlocks streams open at once (default 256)",
    )
    parser.add_argument(
        "--max-watchers-per-tenant",
        dest="limits.max_watchers_per_tenant",
        type=int,
        help="WatchBlocks streams open at once on one tenant's namespaces (default 32)",
    )
    parser.add_argument(
        "--tokens-file",
        dest="auth.tokens_file",
        help="TOML file of accepted bearer tokens (their SHA-256), tenants and roles; "
        "turns authentication on; SIGHUP rereads it",
    )
    parser.add_argument(
        "--certificate-tenants",
        dest="auth.certificate_tenants",
        action="store_true",
        default=None,
        help="with mutual TLS, a client certificate's common name is its tenant",
    )
    parser.add_argument(
        "--tls-cert", dest="tls.cert_file", help="PEM certificate chain: TLS on gRPC and data plane"
    )
    parser.add_argument("--tls-key", dest="tls.key_file", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca",
        dest="tls.client_ca_file",
        help="PEM CA whose client certificates are required (mutual TLS)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow listening beyond loopback with neither authentication nor TLS",
    )
    parser.add_argument(
        "--cluster",
        dest="cluster.etcd",
        help="register in etcd: etcd://HOST:PORT[,HOST:PORT...]/PREFIX (etcds:// for TLS)",
    )
    parser.add_argument(
        "--advertise",
        dest="cluster.advertise",
        help="gRPC HOST:PORT other machines reach this daemon at (default: --listen)",
    )
    parser.add_argument(
        "--lease-ttl-s",
        dest="cluster.lease_ttl_s",
        type=int,
        help="seconds the cluster entry outlives a dead daemon (default 10)",
    )
    for name, flag, _, what in ETCD_SETTINGS:
        parser.add_argument(
            flag, dest=f"cluster.etcd_{name}", help=f"{what} ([cluster] etcd_{name})"
        )
    parser.add_argument(
        "--workers",
        type=int,
        help="daemon processes, each with 1/N of every tier, registered as N cluster "
        "members; more than 1 needs --cluster (default 1)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics over HTTP on this port (0: any free port, logged; "
        "default -1: off)",
    )
    parser.add_argument(
        "--metrics-host",
        help="host /metrics listens on (default: the --listen host); it shows every "
        "tenant's use, so keep it private",
    )
    parser.add_argument("--log-level", choices=list(_LOG_LEVELS))
    parser.add_argument(
        "--gc-freeze-interval-s",
        dest="gc_freeze_interval_s",
        type=float,
        help="seconds between moving what survives young collections out of the garbage "
        "collector's walks, with no automatic full collections (default 1; 0: CPython's "
        "collector as it is)",
    )
    parser.add_argument(
        "--gc-full-interval-s",
        dest="gc_full_interval_s",
        type=float,
        help="seconds between full garbage collections of everything (default 3600; 0: never)",
    )
    parser.add_argument(
        "--no-tune-allocator",
        dest="tune_allocator",
        action="store_false",
        default=None,
        help="leave glibc's malloc thresholds alone",
    )


_TOP_LEVEL_FLAGS = {
    "listen",
    "data_port",
    "shm_socket",
    "log_level",
    "tune_allocator",
    "gc_freeze_interval_s",
    "gc_full_interval_s",
    "insecure",
    "workers",
    "metrics_port",
    "metrics_host",
}


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    overrides = {
        key: value for key, value in vars(args).items() if key in _TOP_LEVEL_FLAGS or "." in key
    }
    return load_config(args.config, overrides)
