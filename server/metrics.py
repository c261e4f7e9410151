"""Prometheus metrics of one daemon: a registry, the collector that reads the daemon at
scrape time, the request histograms, and the HTTP endpoint that serves them.

`KVStoreCollector` counts nothing itself. At each scrape it reads what the daemon keeps
anyway for Stats: the store's report (kvstore.server.census_metrics), the data plane's
counts, the event-loop probe, cluster registration. The request histograms
(kvstore.server.request_metrics) are the one thing observed as requests happen.
prometheus_client's process, platform and GC collectors add the usual `process_*` and
`python_*` series.

The collector must run on the daemon's event loop (the store is not thread-safe);
kvstore.server.metrics_http serves scrapes there.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvstore.server.census_metrics import store_families, tenant_families
from kvstore.server.dataplane import DataPlane
from kvstore.server.gc_policy import GcPolicy
from kvstore.server.loopwatch import LoopWatch
from kvstore.server.metrics_http import MetricsEndpoint
from kvstore.server.request_metrics import RequestMetrics
from kvstore.server.watch import WatchHub
from kvstore.store import BlockStore

__all__ = ["DaemonMetrics", "KVStoreCollector", "start_metrics"]

logger = logging.getLogger("kvstore.server.metrics")

# Tenants a scrape gives kvstore_tenant_* series (the largest, by bytes used).
MAX_TENANT_SERIES = 1000


class KVStoreCollector(Collector):
    """Everything a daemon already counts, as metric families, read when scraped."""

    def __init__(
        self,
        store: BlockStore,
        loop_watch: LoopWatch,
        data_plane: DataPlane | None,
        watch_hub: WatchHub | None = None,
    ) -> None:
        self._store = store
        self._loop_watch = loop_watch
        self._data_plane = data_plane
        self._watch_hub = watch_hub
        # Whether the daemon is registered in etcd now, and its node id (--cluster only).
        self.cluster_state: Callable[[], tuple[bool, str]] | None = None
        # A scrape holds the event loop about 55 µs per tenant: past this many tenants,
        # only the largest get series.
        self.max_tenant_series = MAX_TENANT_SERIES
        self.gc_policy: GcPolicy | None = None  # the collector policy, when it runs

    def collect(self) -> Iterator[Metric]:
        store = self._store
        report = store.report([])  # the tenants' series come next, bounded
        yield from store_families(report)
        names = store.tenant_names()
        num_tenants = len(names)
        if num_tenants > self.max_tenant_series:
            names = store.largest_tenants(self.max_tenant_series)
        yield from tenant_families(store.tenant_reports(names))
        yield GaugeMetricFamily(
            "kvstore_tenants_without_series",
            f"Tenants left out of the kvstore_tenant_* series: a scrape carries the "
            f"{self.max_tenant_series} using the most bytes (its cost is per tenant).",
            value=num_tenants - len(names),
        )
        yield from self._data_plane_families()
        lag = self._loop_watch.lag()
        yield GaugeMetricFamily(
            "kvstore_event_loop_lag_max_seconds",
            "Longest an event-loop probe (a 100 ms sleep) woke late over the last 10 s.",
            value=lag.max_s,
        )
        yield GaugeMetricFamily(
            "kvstore_event_loop_lag_p99_seconds",
            "99th percentile of how late the event-loop probe woke over the last 10 s.",
            value=lag.p99_s,
        )
        yield GaugeMetricFamily(
            "kvstore_event_loop_lag_max_runqueue_seconds",
            "Of the longest event-loop lag, how long the loop's thread waited for a core "
            "(at most all of it; 0 where the kernel does not say).",
            value=lag.max_runqueue_s,
        )
        if self._watch_hub is not None:
            yield GaugeMetricFamily(
                "kvstore_block_watchers",
                "WatchBlocks streams open now.",
                value=self._watch_hub.num_watchers,
            )
        if self.gc_policy is not None:
            yield from _gc_families(self.gc_policy)
        if self.cluster_state is not None:
            registered, node_id = self.cluster_state()
            family = GaugeMetricFamily(
                "kvstore_cluster_registered",
                "1 while the daemon's member entry is registered in etcd, else 0.",
                labels=["node_id"],
            )
            family.add_metric([node_id], int(registered))
            yield family

    def _data_plane_families(self) -> Iterator[Metric]:
        """The data plane's connections and transfers; no series while it is off."""
        if self._data_plane is None:
            return
        connections, transfers = self._data_plane.counts()
        yield GaugeMetricFamily(
            "kvstore_data_plane_connections", "Data-plane connections open now.", value=connections
        )
        yield CounterMetricFamily(
            "kvstore_data_plane_connections_accepted",
            "Data-plane connections accepted (not those turned away at the limit).",
            value=self._data_plane.accepted,
        )
        yield CounterMetricFamily(
            "kvstore_data_plane_handshakes_cut",
            "Connections closed before their HELLO to make room at the connection limit.",
            value=self._data_plane.handshakes_cut,
        )
        yield CounterMetricFamily(
            "kvstore_data_plane_transfers",
            "Puts and gets the data plane carried (the rest went over gRPC).",
            value=transfers,
        )
        yield CounterMetricFamily(
            "kvstore_data_plane_shm_transfers",
            "Of those, the ones whose bytes moved through shared memory (the same-host path).",
            value=self._data_plane.shm_transfers,
        )


def _gc_families(policy: GcPolicy) -> Iterator[Metric]:
    """What the garbage-collector policy holds back from the collector's walks."""
    yield GaugeMetricFamily(
        "kvstore_gc_frozen_objects",
        "Objects frozen out of the garbage collector's walks (kvstore.server.gc_policy).",
        value=gc.get_freeze_count(),
    )
    yield CounterMetricFamily(
        "kvstore_gc_full_collections",
        "Full garbage collections the policy ran (every gc_full_interval_s).",
        value=policy.num_full_collections,
    )
    yield GaugeMetricFamily(
        "kvstore_gc_last_full_collection_seconds",
        "How long the policy's last full garbage collection held the event loop.",
        value=policy.last_full_collection_s,
    )


@dataclass
class DaemonMetrics:
    """A daemon's metrics, serving at `host:port`/metrics until `stop`."""

    registry: CollectorRegistry
    collector: KVStoreCollector
    requests: RequestMetrics
    endpoint: MetricsEndpoint
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def stop(self) -> None:
        await self.endpoint.stop()


async def start_metrics(
    host: str,
    port: int,
    store: BlockStore,
    loop_watch: LoopWatch,
    data_plane: DataPlane | None,
    watch_hub: WatchHub | None = None,
) -> DaemonMetrics:
    """A registry of the daemon's metrics, served on `host:port` (0: any free port)."""
    registry = CollectorRegistry()
    collector = KVStoreCollector(store, loop_watch, data_plane, watch_hub)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    requests = RequestMetrics(registry)
    endpoint = MetricsEndpoint(registry)
    bound = await endpoint.start(host, port)
    return DaemonMetrics(registry, collector, requests, endpoint, host, bound)
