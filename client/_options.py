"""Client configuration value objects."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.checksum import ChecksumKind
from kvstore.client._credentials import check_token
from kvstore.client._wire_compression import WIRE_COMPRESSION_MODES, WireCompressionMode
from kvstore.cluster.etcd_options import EtcdOptions
from kvstore.cluster.placement import DEFAULT_RUN_BLOCKS
from kvstore.keys import HashAlgorithm
from kvstore.wire.chunks import MIN_CHUNK_BYTES

MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Timeouts:
    """Deadlines, in seconds, per kind of call. Every call has one."""

    lookup: float = 2.0
    transfer: float = 120.0  # PutBlocks and GetBlocks
    control: float = 5.0  # Pin, Unpin, Delete, Stats

    def __post_init__(self) -> None:
        for name in ("lookup", "transfer", "control"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Timeouts.{name} must be > 0 seconds")


@dataclass(frozen=True, kw_only=True)
class TLSOptions:
    """TLS to a server that serves it, on gRPC and the data plane alike.

    `ca_file` (PEM) is the CA the server's certificate must chain to; None trusts the
    system's store. `cert_file` and `key_file` (PEM) are this client's certificate, for
    a server that requires one (mutual TLS). `server_name` is the name checked against
    the server's certificate, where it is not the host of the target. The files are
    read when the client is made. Where ClientOptions.tls is None, the environment
    variables KVSTORE_TLS_CA, KVSTORE_TLS_CERT, KVSTORE_TLS_KEY and
    KVSTORE_TLS_SERVER_NAME make one, if any is set.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLSOptions needs both cert_file and key_file, or neither")


@dataclass(frozen=True, kw_only=True)
class ClientOptions:
    """How the client talks to the server.

    `chunk_bytes` is the payload of one stream message: about 1 MiB is where Python
    gRPC moves bytes fastest on loopback (bigger single messages are slower). A get
    asks for messages of that size, and the server sends at least 64 KiB a message
    whatever is asked (kvstore.wire.chunks.MIN_CHUNK_BYTES), so `max_message_bytes`,
    the most this client accepts, must leave room for that.
    """

    timeouts: Timeouts = field(default_factory=Timeouts)
    chunk_bytes: int = 1 * MiB
    max_message_bytes: int = 8 * MiB
    checksum: ChecksumKind = ChecksumKind.XXH3_64
    hash_algorithm: HashAlgorithm = HashAlgorithm.SHA256
    key_extra: bytes = b""  # a tenant salt or LoRA id, hashed into the first block only
    verify_checksums: bool = True
    # Lookups ride long-lived LookupPrefixStream calls, one lookup on each at a time, up
    # to this many at once (see kvstore.client._lookup_stream); more concurrent lookups
    # go out as unary calls. 0 sends every lookup as a unary call.
    lookup_streams: int = 4
    # Raise glibc's mmap and trim thresholds for this process (kvstore.allocator), as the
    # server does: otherwise every megabyte message is mmapped, page-faulted in and
    # unmapped again, which cost puts about 45 % of their speed on the reference machine.
    # It is process-wide and keeps freed heap memory for reuse; set False if the host
    # process tunes its allocator itself.
    tune_allocator: bool = True
    # Carry the bytes of puts and gets over the server's TCP data plane
    # (kvstore.wire.frames) when it offers one: no HTTP/2, and no copies in gRPC. Falls
    # back to gRPC when the server has none or it cannot be reached. False: gRPC only.
    data_plane: bool = True
    # The same-host path (kvstore.wire.shm): where the daemon runs on this host, block
    # bytes move through a shared-memory buffer this client owns, not through TCP. None:
    # use it when the server offers it and its socket opens, else the TCP data plane,
    # else gRPC. True: require it (transfers raise Unavailable without it). False: never.
    shared_memory: bool | None = None
    # lz4 on a get's bytes over TCP and gRPC (kvstore.client._wire_compression): "auto"
    # asks the server for it where the measured link is slower than lz4 and the data
    # shrink enough to win; "lz4" always asks, "off" never. Never through shared memory.
    wire_compression: WireCompressionMode = "auto"
    # A bearer token for a server that authenticates (its tenant and role are the
    # server's to know). None: the KVSTORE_TOKEN environment variable, if set.
    token: str | None = field(default=None, repr=False)
    # TLS on every connection (gRPC and the data plane); None: plaintext.
    tls: TLSOptions | None = None
    # For a cluster target (etcd:// or cluster://; kvstore.client._cluster): blocks per
    # run on average, the unit of placement, which every client of a store must agree on; how often
    # etcd is read for members; and how long a node that failed a call is passed over
    # (its runs count as misses) before it is tried again.
    cluster_run_blocks: int = DEFAULT_RUN_BLOCKS
    cluster_refresh_s: float = 1.0
    cluster_retry_s: float = 1.0
    # A secured etcd behind an etcd:// or etcds:// target: TLS files and credentials
    # (kvstore.cluster.etcd_options). None: the KVSTORE_ETCD_* environment variables
    # (and KVSTORE_ETCD_PASSWORD), if any is set. Read when the client is made.
    etcd: EtcdOptions | None = None

    def __post_init__(self) -> None:
        if self.cluster_run_blocks < 1:
            raise ValueError("cluster_run_blocks must be >= 1")
        if not 0.05 <= self.cluster_refresh_s <= 3600:
            raise ValueError("cluster_refresh_s must be in [0.05, 3600]")
        if not 0 <= self.cluster_retry_s <= 3600:
            raise ValueError("cluster_retry_s must be in [0, 3600]")
        if self.token is not None:
            check_token(self.token, "ClientOptions.token")
        if self.shared_memory and not self.data_plane:
            raise ValueError("shared_memory=True needs data_plane=True (it is a data plane)")
        if self.wire_compression not in WIRE_COMPRESSION_MODES:
            raise ValueError(
                f"wire_compression must be one of {', '.join(WIRE_COMPRESSION_MODES)}, "
                f"got {self.wire_compression!r}"
            )
        if self.lookup_streams < 0:
            raise ValueError("lookup_streams must be >= 0")
        if self.max_message_bytes < MIN_CHUNK_BYTES + 4096:
            raise ValueError(
                f"max_message_bytes must be at least {MIN_CHUNK_BYTES + 4096}: a server may "
                f"send {MIN_CHUNK_BYTES} bytes of data in one get message, whatever is asked"
            )
        if not 1 <= self.chunk_bytes <= self.max_message_bytes - 4096:
            raise ValueError("chunk_bytes must be in [1, max_message_bytes - 4096]")
