"""`--metrics-port`: a real daemon's /metrics scraped over HTTP on loopback after real traffic.

Counters are checked exactly where the traffic fixes them (blocks put = blocks sent,
lookups = lookups made), and against the daemon's own Stats; bad requests to the
endpoint get a clear HTTP status while the daemon keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvstore.bench.scrape import Samples, parse_samples
from kvstore.client import InvalidArgument, KVClient, KVForm
from kvstore.errors import InvalidRequest
from kvstore.layout import KVLayout, Namespace
from kvstore.server import RunningServer, build_server, load_config, metrics_http
from kvstore.server.metrics_http import _MAX_CONNECTIONS, _MAX_HEAD_BYTES

Connect = Callable[..., KVClient]
MakeKV = Callable[..., torch.Tensor]
ServerFactory = Callable[..., Any]


def fetch(url: str, *, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body) of one HTTP request, errors included."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


async def scrape(running: RunningServer) -> Samples:
    assert running.metrics is not None
    status, _, body = await asyncio.to_thread(fetch, running.metrics.url)
    assert status == 200
    return parse_samples(body)


def tokens(num_blocks: int, layout: KVLayout) -> list[int]:
    return list(range(num_blocks * layout.block_tokens))


@pytest.fixture
async def metered(server_factory: ServerFactory) -> RunningServer:
    running: RunningServer = await server_factory(metrics_port=0)
    return running


@pytest.fixture
def target(metered: RunningServer) -> str:
    """The `connect` fixture's clients reach the metered daemon."""
    return f"127.0.0.1:{metered.port}"


# -- off by default -----------------------------------------------------------------------


async def test_metrics_are_off_by_default(server: RunningServer) -> None:
    assert server.config.metrics_port == -1
    assert server.metrics is None
    assert server.servicer.request_metrics is None


async def test_metrics_are_served_on_the_listen_host_by_default(metered: RunningServer) -> None:
    assert metered.metrics is not None
    assert metered.metrics.host == "127.0.0.1"
    assert metered.metrics.port > 0
    assert metered.metrics.url == f"http://127.0.0.1:{metered.metrics.port}/metrics"


# -- counts after traffic ------------------------------------------------------------------


async def test_counters_equal_the_traffic(
    metered: RunningServer, connect: Connect, make_kv: MakeKV, request: pytest.FixtureRequest
) -> None:
    client = connect()
    layout = client.namespace.layout
    before = await scrape(metered)
    toks = tokens(4, layout)
    # One put stream of 4 blocks after its lookup (skip_cached), 3 lookups that find all
    # 4, one get of them all.
    await client.put(toks, make_kv(layout, 4))
    for _ in range(3):
        match = await client.lookup(toks)
    assert await client.get_into(match, make_kv(layout, 4)) == 4
    after = await scrape(metered)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    block_bytes = layout.block_bytes
    assert delta("kvstore_blocks_put_total") == 4
    assert delta("kvstore_block_bytes_put_total") == 4 * block_bytes
    assert delta("kvstore_lookups_total") == 4
    assert delta("kvstore_lookup_keys_total") == 16
    assert delta("kvstore_lookup_hits_total") == 12
    assert delta("kvstore_blocks_got_total") == 4
    assert delta("kvstore_block_bytes_got_total") == 4 * block_bytes
    # A tenant is counted from when it has something here: the put's own lookup came
    # before its first block, so the tenant's series count the 3 lookups after it.
    assert not before.has("kvstore_tenant_lookup_keys_total", tenant="tenant-a")
    assert after.value("kvstore_tenant_lookup_keys_total", tenant="tenant-a") == 12
    assert after.value("kvstore_tenant_lookup_hits_total", tenant="tenant-a") == 12
    # The histograms: one observation per request, of the bytes it carried.
    assert delta("kvstore_lookup_seconds_count") == 4
    assert delta("kvstore_lookup_matched_bytes_sum") == 12 * block_bytes
    assert delta("kvstore_put_seconds_count") == 1
    assert delta("kvstore_put_bytes_sum") == 4 * block_bytes
    assert delta("kvstore_get_seconds_count") == 1
    assert delta("kvstore_get_bytes_sum") == 4 * block_bytes
    assert delta("kvstore_put_bytes_bucket", le="+Inf") == 1
    assert after.value("kvstore_lookup_seconds_sum") > before.value("kvstore_lookup_seconds_sum")
    # Gauges: what is stored now.
    assert after.value("kvstore_tier_blocks", tier="dram") == 4
    assert after.value("kvstore_tenant_blocks", tenant="tenant-a", tier="dram") == 4
    assert after.value("kvstore_tier_capacity_bytes", tier="dram") == 32 << 20
    assert after.value("kvstore_tier_read_limit_bytes_per_second", tier="dram") == 0
    assert after.value("kvstore_namespaces") == 1
    assert after.value("kvstore_block_watchers") == 0
    # The garbage-collector policy runs at its defaults: start-up's objects are frozen.
    assert after.value("kvstore_gc_frozen_objects") > 0
    assert after.value("kvstore_gc_full_collections_total") == 0
    carried = 2 if request.node.callspec.params["connect"] == "data-plane" else 0
    assert delta("kvstore_data_plane_transfers_total") == carried
    assert after.value("process_resident_memory_bytes") > 0
    assert after.value("process_cpu_seconds_total") > 0


async def test_tier_counters_equal_stats(
    metered: RunningServer, connect: Connect, make_kv: MakeKV
) -> None:
    client = connect()
    layout = client.namespace.layout
    toks = tokens(3, layout)
    await client.put(toks, make_kv(layout, 3))
    await client.get_into(await client.lookup(toks), make_kv(layout, 3))
    stats = await client.stats()
    samples = await scrape(metered)
    (dram,) = [tier for tier in stats.tiers if tier.name == "dram"]
    for name, value in (
        ("kvstore_tier_used_bytes", dram.used_bytes),
        ("kvstore_tier_hits_total", dram.hits),
        ("kvstore_tier_misses_total", dram.misses),
        ("kvstore_tier_read_bytes_total", dram.bytes_read),
        ("kvstore_tier_written_bytes_total", dram.bytes_written),
        ("kvstore_tier_evictions_total", dram.evictions),
    ):
        assert samples.value(name, tier="dram") == value, name
    assert samples.value("kvstore_tenant_used_bytes", tenant="tenant-a", tier="dram") == (
        dram.used_bytes
    )


async def test_each_tenant_has_its_own_series(
    server_factory: ServerFactory, make_namespace: Callable[..., Namespace], make_kv: MakeKV
) -> None:
    running: RunningServer = await server_factory(metrics_port=0)
    target = f"127.0.0.1:{running.port}"
    layout = make_namespace().layout
    async with (
        KVClient(target, make_namespace(tenant="team-a")) as team_a,
        KVClient(target, make_namespace(tenant="team-b")) as team_b,
    ):
        await team_a.put(tokens(3, layout), make_kv(layout, 3))
        await team_b.put(tokens(1, layout), make_kv(layout, 1, seed=1))
        await team_b.lookup(tokens(2, layout))  # finds 1 of 2
        samples = await scrape(running)
    assert samples.value("kvstore_tenant_blocks", tenant="team-a", tier="dram") == 3
    assert samples.value("kvstore_tenant_blocks", tenant="team-b", tier="dram") == 1
    # Each put's own lookup (skip_cached) came before the tenant had anything here, so
    # it is not the tenant's; team-b's later lookup found 1 of its 2 keys.
    assert samples.value("kvstore_tenant_lookup_keys_total", tenant="team-a") == 0
    assert samples.value("kvstore_tenant_lookup_hits_total", tenant="team-a") == 0
    assert samples.value("kvstore_tenant_lookup_keys_total", tenant="team-b") == 2
    assert samples.value("kvstore_tenant_lookup_hits_total", tenant="team-b") == 1
    assert not samples.has("kvstore_tenant_quota_bytes", tenant="team-a", tier="dram")


async def test_a_quota_has_its_series(
    server_factory: ServerFactory, make_namespace: Callable[..., Namespace], make_kv: MakeKV
) -> None:
    running: RunningServer = await server_factory(
        metrics_port=0, quotas={"team-q": {"dram_bytes": "8MiB"}}
    )
    samples = await scrape(running)
    assert samples.value("kvstore_tenant_quota_bytes", tenant="team-q", tier="dram") == 8 << 20
    assert samples.value("kvstore_tenant_used_bytes", tenant="team-q", tier="dram") == 0


async def test_past_the_series_limit_only_the_largest_tenants_have_series(
    server_factory: ServerFactory, make_namespace: Callable[..., Namespace], make_kv: MakeKV
) -> None:
    """A scrape costs the loop per tenant: past the limit, the tenants using the most
    bytes get series and a gauge counts the rest."""
    quoted = {f"idle-{index:02d}": {"dram_bytes": "1MiB"} for index in range(20)}
    running: RunningServer = await server_factory(metrics_port=0, quotas=quoted)
    assert running.metrics is not None
    running.metrics.collector.max_tenant_series = 3
    target = f"127.0.0.1:{running.port}"
    layout = make_namespace().layout
    for tenant, blocks in (("big", 3), ("mid", 2), ("small", 1)):
        async with KVClient(target, make_namespace(tenant=tenant)) as client:
            await client.put(tokens(blocks, layout), make_kv(layout, blocks))
    samples = await scrape(running)
    assert samples.value("kvstore_tenant_blocks", tenant="big", tier="dram") == 3
    assert samples.value("kvstore_tenant_blocks", tenant="small", tier="dram") == 1
    assert not samples.has("kvstore_tenant_used_bytes", tenant="idle-00", tier="dram")
    assert samples.value("kvstore_tenants_without_series") == 20


def hold_the_loop(seconds: float) -> None:
    """Keep the calling event loop busy, as a long synchronous handler would."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


async def test_open_watch_streams_are_counted(
    metered: RunningServer, make_namespace: Callable[..., Namespace]
) -> None:
    async with (
        KVClient(f"127.0.0.1:{metered.port}", make_namespace()) as client,
        contextlib.aclosing(client.watch_blocks()) as stream,
    ):
        await anext(stream)  # the snapshot's end: the watch is open
        assert (await scrape(metered)).value("kvstore_block_watchers") == 1


async def test_a_read_throttle_is_reported(server_factory: ServerFactory) -> None:
    running: RunningServer = await server_factory(
        metrics_port=0, store__read_bytes_per_s={"dram": 200_000_000}
    )
    samples = await scrape(running)
    assert samples.value("kvstore_tier_read_limit_bytes_per_second", tier="dram") == 200_000_000


async def test_event_loop_lag_is_reported(metered: RunningServer) -> None:
    # Hold the loop well past the probe's period: its next wake-up is that late.
    await asyncio.sleep(0.15)
    hold_the_loop(0.3)
    await asyncio.sleep(0.15)
    samples = await scrape(metered)
    assert samples.value("kvstore_event_loop_lag_max_seconds") >= 0.15
    assert samples.value("kvstore_event_loop_lag_p99_seconds") >= 0
    runqueue = samples.value("kvstore_event_loop_lag_max_runqueue_seconds")
    assert 0 <= runqueue <= samples.value("kvstore_event_loop_lag_max_seconds")


async def test_requests_answered_with_an_error_are_counted_by_transport_and_code(
    metered: RunningServer, connect: Connect, make_kv: MakeKV, request: pytest.FixtureRequest
) -> None:
    client = connect()
    layout = client.namespace.layout
    before = await scrape(metered)
    too_many = [b"k%d" % index for index in range(1001)]  # the test server's max_keys: 1000
    with pytest.raises(InvalidArgument, match="1001 keys in one request"):
        await client.lookup_keys(too_many)  # a LOOKUP frame's ERROR, or a stream's result
    dest = make_kv(layout, 1001, form=KVForm.BLOCKS)
    with pytest.raises(InvalidArgument, match="1001 keys in one request"):
        await client.get_into(too_many, dest, form=KVForm.BLOCKS)
    after = await scrape(metered)
    errors = "kvstore_request_errors_total"
    assert not before.has(errors, transport="grpc", code="INVALID_ARGUMENT")
    grpc_errors = after.value(errors, transport="grpc", code="INVALID_ARGUMENT")
    if request.node.callspec.params["connect"] == "data-plane":
        # The refused LOOKUP is asked again over gRPC (in case the data plane is an
        # older one), which refuses it too: the get is the data plane's second.
        assert grpc_errors == 1
        assert after.value(errors, transport="data_plane", code="INVALID_ARGUMENT") == 2
    else:
        assert grpc_errors == 2
        assert not after.has(errors, transport="data_plane", code="INVALID_ARGUMENT")
    # The daemon still serves the tenant.
    await client.put(tokens(1, layout), make_kv(layout, 1))
    assert (await client.lookup(tokens(1, layout))).num_matched == 1


# -- the endpoint's answers to bad requests -------------------------------------------------


async def test_bad_requests_get_clear_statuses_and_the_daemon_keeps_serving(
    metered: RunningServer, connect: Connect, make_kv: MakeKV
) -> None:
    assert metered.metrics is not None
    base = metered.metrics.url.removesuffix("/metrics")
    status, _, body = await asyncio.to_thread(fetch, base + "/other")
    assert (status, body) == (404, "kvstore serves its metrics at /metrics only\n")
    status, _, body = await asyncio.to_thread(fetch, base + "/metrics", method="POST")
    assert (status, body) == (405, "POST /metrics: use GET\n")
    assert await asyncio.to_thread(raw_exchange, metered, b"NONSENSE\r\n\r\n") == (
        b"HTTP/1.1 400 Bad Request"
    )
    oversized = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * _MAX_HEAD_BYTES + b"\r\n\r\n"
    assert await asyncio.to_thread(raw_exchange, metered, oversized) == (
        b"HTTP/1.1 400 Bad Request"
    )
    status, content_type, _ = await asyncio.to_thread(fetch, base + "/metrics?x=1")
    assert status == 200
    assert content_type.startswith("text/plain")
    # The daemon still serves blocks.
    client = connect()
    layout = client.namespace.layout
    await client.put(tokens(1, layout), make_kv(layout, 1))
    assert (await client.lookup(tokens(1, layout))).num_matched == 1


def raw_exchange(running: RunningServer, data: bytes) -> bytes:
    """Send `data` to the metrics port as it is; the status line of the answer."""
    assert running.metrics is not None
    with socket.create_connection(("127.0.0.1", running.metrics.port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


async def test_openmetrics_is_served_when_asked_for(metered: RunningServer) -> None:
    assert metered.metrics is not None

    def fetch_openmetrics() -> tuple[str, str]:
        request = urllib.request.Request(
            metered.metrics.url if metered.metrics else "",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.headers["Content-Type"], response.read().decode()

    content_type, body = await asyncio.to_thread(fetch_openmetrics)
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    assert "kvstore_lookups_total 0" in body


async def test_idle_connections_past_the_limit_are_closed(metered: RunningServer) -> None:
    assert metered.metrics is not None
    port = metered.metrics.port
    held = []
    try:
        for _ in range(_MAX_CONNECTIONS):
            held.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.1)  # let the server take each one in
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # closed, unanswered
        writer.close()
    finally:
        for _, writer in held:
            writer.close()
    await asyncio.sleep(0.1)
    samples = await scrape(metered)
    assert samples.has("kvstore_lookups_total")


async def test_a_malformed_accept_header_is_answered_400(metered: RunningServer) -> None:
    request = b"GET /metrics HTTP/1.1\r\nAccept: text/plain; version=abc\r\n\r\n"
    assert await asyncio.to_thread(raw_exchange, metered, request) == (b"HTTP/1.1 400 Bad Request")
    assert (await scrape(metered)).has("kvstore_lookups_total")  # and it serves on


async def test_clients_that_never_read_a_large_reply_lose_their_slots_not_the_endpoint(
    metered: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many tenants make a large reply. A client that asks and never reads it must not
    # hold its slot (or the daemon's shutdown) for ever.
    monkeypatch.setattr(metrics_http, "_WRITE_TIMEOUT_S", 0.5)
    assert metered.metrics is not None
    large = b"# padding\n" * 800_000  # 8 MB: more than the sockets' buffers hold
    monkeypatch.setattr(
        metrics_http, "choose_encoder", lambda accept: (lambda registry: large, "text/plain")
    )
    silent = []
    try:
        for _ in range(_MAX_CONNECTIONS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.connect(("127.0.0.1", metered.metrics.port))
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")  # and never reads
            silent.append(sock)
        await asyncio.sleep(2.0)  # past the write timeout: their slots are free again
        monkeypatch.undo()
        assert (await scrape(metered)).has("kvstore_lookups_total")
    finally:
        for sock in silent:
            sock.close()


# -- bad settings -----------------------------------------------------------------------------


@pytest.mark.parametrize("port", [-2, 65536])
def test_a_metrics_port_out_of_range_is_refused(port: int) -> None:
    with pytest.raises(InvalidRequest, match="metrics_port must be a port"):
        load_config(None, {"metrics_port": port})


def test_a_metrics_port_that_is_no_number_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="metrics_port must be a int"):
        load_config(None, {"metrics_port": "9100"})


def test_a_metrics_host_with_a_port_or_scheme_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="metrics_host must be a host"):
        load_config(None, {"metrics_host": "http://127.0.0.1"})


async def test_a_metrics_port_in_use_stops_the_start_cleanly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load_config(
            None,
            {"listen": "127.0.0.1:0", "metrics_port": port, "store.dram_bytes": 8 << 20},
        )
        with pytest.raises(OSError, match=f"metrics endpoint cannot listen on 127.0.0.1:{port}"):
            await build_server(config)


async def test_the_endpoint_serves_until_the_drain_ends_then_closes() -> None:
    config = load_config(
        None, {"listen": "127.0.0.1:0", "metrics_port": 0, "store.dram_bytes": 8 << 20}
    )
    running = await build_server(config)
    assert running.metrics is not None
    port = running.metrics.port
    assert (await scrape(running)).value("kvstore_namespaces") == 0
    await running.drain()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
