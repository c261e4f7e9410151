"""Membership in etcd (issue 16, item 1): a daemon registers under a lease, withdraws on
drain, keeps a node id across restarts, and rides out etcd going away; against a real
etcd on loopback (tests/etcd_server.py)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from daemons import Launch, daemon_launcher, serving  # tests/daemons.py
from etcd_server import EtcdServer, etcd_server  # tests/etcd_server.py
from rich.console import Console

from kvstore.client import KVClient
from kvstore.cluster.etcd import list_members, open_etcd
from kvstore.cluster.members import Member, parse_etcd_url
from kvstore.errors import InvalidRequest
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.server import RunningServer, build_server, load_config
from kvstore.server.config import ServerConfig
from kvstore.server.main import main as server_main
from kvstore.server.main import print_stats
from kvstore.server.membership import NODE_ID_FILE
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

MiB = 1 << 20
PREFIX = "kvtest"


async def wait_until(probe: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    """Bounded polling: a condition that etcd or the daemon reaches in its own time."""
    deadline = time.monotonic() + timeout_s
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.05)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    with etcd_server(tmp_path) as server:
        yield server


def daemon_config(**settings: Any) -> ServerConfig:
    """A small in-process daemon's config, with `settings` ({"cluster.etcd": ...})."""
    defaults = {
        "listen": "127.0.0.1:0",
        "log_level": "warning",
        "store.dram_bytes": 8 * MiB,
        "store.page_bytes": 4096,
        "limits.drain_grace_s": 1.0,
    }
    return load_config(None, {**defaults, **settings})


@pytest.fixture
async def daemons() -> AsyncIterator[Callable[..., Awaitable[RunningServer]]]:
    """In-process daemons, drained when the test ends."""
    started: list[RunningServer] = []

    async def start(**settings: Any) -> RunningServer:
        config = daemon_config(**settings)
        running = await build_server(config)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.drain()


async def stats_of(running: RunningServer) -> pb.StatsResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        reply: pb.StatsResponse = await pb_grpc.KVStoreStub(channel).Stats(pb.StatsRequest())
        return reply


async def members_of(etcd: EtcdServer) -> list[Member]:
    return await list_members(etcd.url(PREFIX))


async def test_registers_its_address_ports_capacity_and_node_id(
    etcd: EtcdServer, daemons: Any, tmp_path: Path
) -> None:
    ssd = tmp_path / "ssd"
    running: RunningServer = await daemons(
        **{
            "cluster.etcd": etcd.url(PREFIX),
            "cluster.advertise": "127.0.0.1:7001",
            "cluster.lease_ttl_s": 5,
            "store.ssd_dir": str(ssd),
            "store.ssd_bytes": 16 * MiB,
        }
    )

    async def registered() -> bool:
        return len(await members_of(etcd)) == 1

    await wait_until(registered)
    (member,) = await members_of(etcd)
    assert member.address == "127.0.0.1:7001"
    assert member.data_port == running.servicer.data_plane_port > 0
    assert member.capacity_bytes == {"dram": 8 * MiB, "ssd": 16 * MiB}
    assert member.node_id == (ssd / NODE_ID_FILE).read_text().strip()
    assert 0 < member.lease_ttl_left_s <= 5
    assert running.membership is not None
    assert running.membership.registered
    stats = await stats_of(running)
    assert stats.cluster_registered
    assert stats.cluster_node_id == member.node_id


async def test_listen_address_is_advertised_when_no_advertise(
    etcd: EtcdServer, daemons: Any
) -> None:
    running: RunningServer = await daemons(**{"cluster.etcd": etcd.url(PREFIX)})

    async def registered() -> bool:
        return len(await members_of(etcd)) == 1

    await wait_until(registered)
    (member,) = await members_of(etcd)
    assert member.address == f"127.0.0.1:{running.port}"


async def test_stats_carry_no_cluster_note_without_cluster(daemons: Any) -> None:
    stats = await stats_of(await daemons())
    assert (stats.cluster_registered, stats.cluster_node_id) == (False, "")


async def test_drain_deletes_the_key(etcd: EtcdServer, tmp_path: Path) -> None:
    config = daemon_config(
        **{
            "cluster.etcd": etcd.url(PREFIX),
            "cluster.lease_ttl_s": 60,  # only the withdrawal, not expiry, can remove it
        }
    )
    running = await build_server(config)
    try:

        async def registered() -> bool:
            return len(await members_of(etcd)) == 1

        await wait_until(registered)
    finally:
        await running.drain()
    assert await members_of(etcd) == []


async def test_node_id_survives_a_restart_on_the_same_ssd_dir(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    settings = {
        "listen": "127.0.0.1:0",
        "log_level": "warning",
        "store.dram_bytes": 8 * MiB,
        "store.page_bytes": 4096,
        "store.ssd_dir": str(tmp_path / "ssd"),
        "store.ssd_bytes": 8 * MiB,
        "limits.drain_grace_s": 1.0,
        "cluster.etcd": etcd.url(PREFIX),
    }
    node_ids = []
    for _ in range(2):
        running = await build_server(load_config(None, settings))
        try:

            async def registered() -> bool:
                return len(await members_of(etcd)) == 1

            await wait_until(registered)
            node_ids.append((await members_of(etcd))[0].node_id)
        finally:
            await running.drain()
    assert node_ids[0] == node_ids[1]
    # Without an SSD directory a daemon is a new node each start.
    del settings["store.ssd_dir"], settings["store.ssd_bytes"]
    running = await build_server(load_config(None, settings))
    try:

        async def registered_again() -> bool:
            return len(await members_of(etcd)) == 1

        await wait_until(registered_again)
        assert (await members_of(etcd))[0].node_id != node_ids[0]
    finally:
        await running.drain()


def layout() -> KVLayout:
    return KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=16)


@pytest.mark.slow
async def test_daemon_serves_without_etcd_and_registers_when_it_returns(
    etcd: EtcdServer, daemons: Any
) -> None:
    etcd.stop()  # unreachable at start: the daemon starts anyway
    running: RunningServer = await daemons(
        **{"cluster.etcd": etcd.url(PREFIX), "cluster.lease_ttl_s": 2}
    )
    assert running.membership is not None
    namespace = Namespace(tenant="t", model_fingerprint="m", layout=layout())
    async with KVClient(f"127.0.0.1:{running.port}", namespace) as client:
        assert (await client.lookup(list(range(32)))).num_matched == 0
        assert not running.membership.registered
        await asyncio.to_thread(etcd.start)

        async def registered() -> bool:
            return running.membership is not None and running.membership.registered

        await wait_until(registered)
        first = await members_of(etcd)
        assert [m.address for m in first] == [f"127.0.0.1:{running.port}"]

        # etcd goes away while the daemon runs: it serves on, and says it is not registered.
        await asyncio.to_thread(etcd.stop)

        async def unregistered() -> bool:
            return running.membership is not None and not running.membership.registered

        await wait_until(unregistered)
        assert (await client.lookup(list(range(32)))).num_matched == 0
        stats = await stats_of(running)
        assert not stats.cluster_registered
        assert stats.cluster_node_id == first[0].node_id
        # Back past its lease's lifetime: the old lease is gone, so it registers anew.
        await asyncio.sleep(3)
        await asyncio.to_thread(etcd.start)
        await wait_until(registered)

        async def listed() -> bool:
            return len(await members_of(etcd)) == 1

        await wait_until(listed)
        assert (await members_of(etcd))[0].node_id == first[0].node_id


@pytest.fixture
def launch() -> Iterator[Launch]:
    with daemon_launcher() as start:
        yield start


@pytest.mark.slow
async def test_lease_expires_after_sigkill(
    etcd: EtcdServer, launch: Launch, tmp_path: Path
) -> None:
    daemon = await serving(
        launch, tmp_path / "ssd", "--cluster", etcd.url(PREFIX), "--lease-ttl-s", "2"
    )

    async def registered() -> bool:
        return len(await members_of(etcd)) == 1

    await wait_until(registered)
    assert (await members_of(etcd))[0].address == daemon.target
    daemon.stop(signal.SIGKILL)

    async def gone() -> bool:
        return await members_of(etcd) == []

    await wait_until(gone)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cluster.etcd": "http://127.0.0.1:2379/kv"}, "must start with etcd://"),
        ({"cluster.etcd": "etcd://127.0.0.1:2379"}, "no key prefix"),
        ({"cluster.etcd": "etcd://127.0.0.1:2379/"}, "no key prefix"),
        ({"cluster.etcd": "etcd://127.0.0.1/kv"}, "not HOST:PORT"),
        ({"cluster.etcd": "etcd://127.0.0.1:99999/kv"}, "not HOST:PORT"),
        ({"cluster.etcd": "etcd://a:1,,b:2/kv"}, "not HOST:PORT"),
        ({"cluster.advertise": "127.0.0.1:7001"}, "needs etcd"),
        ({"cluster.etcd": "etcd://h:1/kv", "cluster.advertise": "nohost"}, "not HOST:PORT"),
        ({"cluster.etcd": "etcd://h:1/kv", "cluster.advertise": "0.0.0.0:7001"}, "wildcard"),
        ({"cluster.etcd": "etcd://h:1/kv", "cluster.lease_ttl_s": 1}, "lease_ttl_s"),
        ({"cluster.etcd": "etcd://h:1/kv", "listen": "0.0.0.0:50051"}, "needs advertise"),
        ({"cluster.etcd": "etcd://h:1/kv", "cluster.lease_ttl_s": "10"}, "must be a int"),
    ],
)
def test_bad_cluster_settings_are_config_errors(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        load_config(None, {"insecure": True, **settings})


def test_cluster_from_toml_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        'listen = "0.0.0.0:50051"\n'
        "[cluster]\n"
        'etcd = "etcd://10.0.0.5:2379,10.0.0.6:2379/kv"\n'
        'advertise = "10.0.0.7:50051"\n'
        "lease_ttl_s = 4\n"
    )
    config = load_config(path, {"insecure": True})
    assert config.cluster is not None
    assert (config.cluster.advertise, config.cluster.lease_ttl_s) == ("10.0.0.7:50051", 4)
    flagged = load_config(path, {"insecure": True, "cluster.lease_ttl_s": 7})
    assert flagged.cluster is not None
    assert flagged.cluster.lease_ttl_s == 7
    assert load_config(None, {}).cluster is None


def test_stats_command_prints_the_cluster_line() -> None:
    console = Console(record=True, width=120)
    print_stats(pb.StatsResponse(cluster_node_id="abc", cluster_registered=False), console)
    assert "cluster: node abc, NOT registered" in console.export_text()
    console = Console(record=True, width=120)
    print_stats(pb.StatsResponse(), console)
    assert "cluster:" not in console.export_text()


async def test_cluster_status_lists_each_member_with_its_use_and_health(
    etcd: EtcdServer, daemons: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    first: RunningServer = await daemons(**{"cluster.etcd": etcd.url(PREFIX)})
    second: RunningServer = await daemons(**{"cluster.etcd": etcd.url(PREFIX)})

    async def both_registered() -> bool:
        return len(await members_of(etcd)) == 2

    await wait_until(both_registered)
    command = ["cluster", "status", "--cluster", etcd.url(PREFIX), "--json"]
    assert await asyncio.to_thread(server_main, command) == 0
    rows = {row["address"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"}
    for row in rows.values():
        assert row["health"] == "SERVING"
        assert row["capacity_bytes"]["dram"] == 8 * MiB
        assert "dram" in row["used_bytes"]
        assert row["lease_ttl_left_s"] > 0
    # A member registered but not answering is listed with the status its Stats got.
    target = parse_etcd_url(etcd.url(PREFIX))
    client = await open_etcd(target, timeout_s=5)
    try:
        dead = Member("dead-node", "127.0.0.1:1", 0, {"dram": 1 * MiB})
        await client.put(target.member_key(dead.node_id).encode(), dead.to_json())
    finally:
        await client.close()
    assert await asyncio.to_thread(server_main, command) == 0
    health = {row["node_id"]: row["health"] for row in json.loads(capsys.readouterr().out)}
    assert health["dead-node"] == "UNAVAILABLE"
    await second.drain()  # withdrawn: listed no more
    assert await asyncio.to_thread(server_main, command[:-1]) == 0
    table = capsys.readouterr().out
    assert "2 member(s)" in table
    assert "UNAVAILABLE" in table
