"""Latency and size histograms of lookups, puts and gets: the one thing metrics must
observe as it happens, since the store keeps no distribution of them.

Each is observed at one place, whichever transport carried the request: lookups in
the servicer (`KVStoreServicer._lookup`, the unary and the streamed RPC alike), puts
and gets in kvstore.server.transfer (gRPC and the data plane alike). Only requests that
succeed are observed. With metrics off, those places hold None and observe nothing.

Requests answered with an error status are counted by transport and code where each
transport answers them: the servicer's catch-all (and the lookup stream's per-result
errors) and the data plane's ERROR frame.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["BYTES_BUCKETS", "SECONDS_BUCKETS", "RequestMetrics"]

# A 1,000-key lookup takes about a millisecond here; a put or get of a long context,
# seconds. The buckets span 50 µs to 60 s.
SECONDS_BUCKETS = (
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    500e-3,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Powers of 4 from 4 KiB (a small block) to 16 GiB (a 128K-token context of a large model).
BYTES_BUCKETS = tuple(float(4**power) for power in range(6, 18))


class RequestMetrics:
    """The request histograms, registered in one registry (one per daemon)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, documentation, buckets=buckets, registry=registry)

        self._lookup_seconds = histogram(
            "kvstore_lookup_seconds",
            "Time the server spent answering a lookup (decode, match, reply built).",
            SECONDS_BUCKETS,
        )
        self._lookup_matched_bytes = histogram(
            "kvstore_lookup_matched_bytes",
            "Block bytes of the prefix a lookup matched (0 for a miss).",
            BYTES_BUCKETS,
        )
        self._put_seconds = histogram(
            "kvstore_put_seconds",
            "A put from its stream's start to its reply (committed as the write policy says).",
            SECONDS_BUCKETS,
        )
        self._put_bytes = histogram(
            "kvstore_put_bytes", "Block bytes a put declared.", BYTES_BUCKETS
        )
        self._get_seconds = histogram(
            "kvstore_get_seconds",
            "A get from its request to its last message handed to the transport.",
            SECONDS_BUCKETS,
        )
        self._get_bytes = histogram("kvstore_get_bytes", "Block bytes a get sent.", BYTES_BUCKETS)
        self._errors = Counter(
            "kvstore_request_errors",
            "Requests answered with an error status, by transport (grpc, data_plane) and "
            "status code.",
            labelnames=["transport", "code"],
            registry=registry,
        )

    def count_error(self, transport: str, code_name: str) -> None:
        """A request on `transport` was answered with status `code_name`."""
        self._errors.labels(transport, code_name).inc()

    def observe_lookup(self, seconds: float, matched_bytes: int) -> None:
        self._lookup_seconds.observe(seconds)
        self._lookup_matched_bytes.observe(matched_bytes)

    def observe_put(self, seconds: float, nbytes: int) -> None:
        self._put_seconds.observe(seconds)
        self._put_bytes.observe(nbytes)

    def observe_get(self, seconds: float, nbytes: int) -> None:
        self._get_seconds.observe(seconds)
        self._get_bytes.observe(nbytes)
