"""`kvstore-server --workers N` (issue 16, item 5): N daemon processes that split the host's
capacity and register as N members. The shares and the settings are checked directly;
the supervisor runs as the real `kvstore-server` in a subprocess against a real etcd on
loopback (tests/etcd_server.py)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from etcd_server import EtcdServer, etcd_server  # tests/etcd_server.py

from kvstore.client import ClientOptions, KVClient, KVForm, Namespace
from kvstore.cluster.etcd import list_members
from kvstore.cluster.members import Member
from kvstore.errors import InvalidRequest
from kvstore.server import load_config
from kvstore.server.auth import token_sha256
from kvstore.server.main import main as server_main
from kvstore.server.membership import NODE_ID_FILE
from kvstore.server.workers import free_ports, worker_configs

MiB = 1 << 20
PREFIX = "kvworkers"
CLUSTER = {"cluster.etcd": "etcd://127.0.0.1:2379/kv"}  # never dialled by the share tests
TOKEN_OLD, TOKEN_NEW = "tok-old-0123456789", "tok-new-0123456789"
STARTED_LINE = re.compile(r"worker (\d+) started: pid (\d+)")


# -- each worker's share --------------------------------------------------------------


def test_each_worker_gets_a_share_of_every_tier_and_its_own_ports_and_directory(
    tmp_path: Path,
) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        'listen = "0.0.0.0:7000"\n'
        "data_port = 7100\n"
        "workers = 3\n"
        "[store]\n"
        f"dram_bytes = {96 * MiB + 2}\n"  # a remainder of 2 bytes: left unused
        'hbm_bytes = "48MiB"\n'
        'hbm_device = "cpu"\n'
        f'ssd_dir = "{tmp_path / "ssd"}"\n'
        'ssd_bytes = "300MiB"\n'
        'max_put_reserved_bytes = "24MiB"\n'
        '[quotas."team-a"]\n'
        'dram_bytes = "30MiB"\n'
        "pinned_bytes = 3000\n"
        "max_transfers = 4\n"
        "[cluster]\n"
        'etcd = "etcd://10.0.0.5:2379/kv"\n'
        'advertise = "10.0.0.7:9000"\n'
    )
    config = load_config(path, {"insecure": True})
    assert config.workers == 3
    shares = worker_configs(config)
    assert [share.listen for share in shares] == ["0.0.0.0:7000", "0.0.0.0:7001", "0.0.0.0:7002"]
    assert [share.data_port for share in shares] == [7100, 7101, 7102]
    assert [share.cluster.advertise for share in shares if share.cluster] == [
        "10.0.0.7:9000",
        "10.0.0.7:9001",
        "10.0.0.7:9002",
    ]
    assert [share.store.ssd_dir for share in shares] == [
        str(tmp_path / "ssd" / f"worker-{index}") for index in range(3)
    ]
    for share in shares:
        assert share.workers == 1
        store = share.store
        assert (store.dram_bytes, store.hbm_bytes, store.ssd_bytes) == (
            32 * MiB,
            16 * MiB,
            100 * MiB,
        )
        assert store.max_put_reserved_bytes == 8 * MiB
        quota = store.quotas["team-a"]
        # Byte quotas split with the tiers; counts stay whole (one call reaches many).
        assert (quota.dram_bytes, quota.pinned_bytes, quota.max_transfers) == (10 * MiB, 1000, 4)
        assert quota.ssd_bytes is None
        # Everything else is the same in every worker.
        assert share.cluster is not None
        assert (share.cluster.etcd, share.cluster.lease_ttl_s) == ("etcd://10.0.0.5:2379/kv", 10)
        assert (share.limits, share.auth, share.tls, share.insecure) == (
            config.limits,
            config.auth,
            config.tls,
            config.insecure,
        )


def test_port_zero_takes_ports_chosen_once_and_data_port_zero_or_off_stays() -> None:
    config = load_config(None, {**CLUSTER, "listen": "127.0.0.1:0", "workers": 2})
    picked: list[tuple[str, int]] = []

    def pick(host: str, count: int) -> list[int]:
        picked.append((host, count))
        return [5001, 6002]

    shares = worker_configs(config, pick)
    assert picked == [("127.0.0.1", 2)]
    assert [share.listen for share in shares] == ["127.0.0.1:5001", "127.0.0.1:6002"]
    assert [share.data_port for share in shares] == [0, 0]
    off = load_config(None, {**CLUSTER, "listen": "[::1]:7000", "workers": 2, "data_port": -1})
    shares = worker_configs(off)
    assert [(share.listen, share.data_port) for share in shares] == [
        ("[::1]:7000", -1),
        ("[::1]:7001", -1),
    ]


def test_chosen_ports_are_free_and_outside_the_ephemeral_range() -> None:
    # A port the kernel hands to a later bind to port 0 (a sibling worker's data plane)
    # could take a chosen one before its worker binds it: none comes from that range.
    ports = free_ports("127.0.0.1", 4)
    assert len(set(ports)) == 4
    range_file = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low, high = (int(x) for x in range_file.read_text().split())
    assert not any(low <= port <= high for port in ports), (ports, low, high)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    # With no room outside it, the kernel's own choice.
    ports = free_ports("127.0.0.1", 2, ephemeral=(1024, 65535))
    assert len(set(ports)) == 2
    assert all(low <= port <= high for port in ports)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"workers": 0}, r"workers must be in \[1, 256\], got 0"),
        ({"workers": 257}, r"workers must be in \[1, 256\]"),
        ({"workers": "2"}, "workers must be a int"),
        ({"workers": True}, "workers must be a int"),
    ],
)
def test_bad_worker_counts_are_config_errors(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        load_config(None, {**CLUSTER, **settings})


def test_more_than_one_worker_needs_a_cluster() -> None:
    with pytest.raises(InvalidRequest, match=r"workers = 2 needs \[cluster\] \(--cluster"):
        load_config(None, {"workers": 2})
    assert load_config(None, {"workers": 1}).cluster is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"listen": "127.0.0.1:65535"}, "listen port 65535 \\+ 2 workers runs past 65535"),
        ({"data_port": 65535}, "data_port port 65535"),
        ({"cluster.advertise": "10.0.0.7:65535"}, "cluster.advertise port 65535"),
        (
            {"store.dram_bytes": "16KiB", "store.page_bytes": "16KiB"},
            r"each worker gets 1/2 of every tier, and that share does not work: dram_bytes",
        ),
        (
            {"store.hbm_bytes": "16KiB", "store.page_bytes": "16KiB", "store.hbm_device": "cpu"},
            "hbm_bytes must be 0",
        ),
    ],
)
def test_shares_that_cannot_work_are_config_errors(settings: dict[str, Any], message: str) -> None:
    config = load_config(None, {**CLUSTER, "workers": 2, **settings})
    with pytest.raises(InvalidRequest, match=message):
        worker_configs(config)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "0"], "workers must be in [1, 256], got 0"),
        (["--workers", "2"], "workers = 2 needs [cluster] (--cluster etcd://HOST:PORT/PREFIX)"),
        (
            ["--workers", "2", "--cluster", "etcd://127.0.0.1:2379/kv", "--dram-bytes", "64KiB"],
            "that share does not work",
        ),
    ],
)
def test_command_line_refuses_bad_workers_with_exit_code_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        server_main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_help_names_the_workers_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        server_main(["--help"])
    assert "--workers WORKERS" in capsys.readouterr().out


# -- the supervisor, as the real command ------------------------------------------------


@dataclass
class Supervisor:
    """`kvstore-server --workers N` in a subprocess; its stderr (every worker's log too)
    collected in `log_lines`."""

    process: subprocess.Popen[bytes]
    log_lines: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.log_lines)

    def worker_pids(self) -> dict[int, int]:
        """Each worker's latest pid, from the supervisor's "worker i started" lines."""
        return {int(index): int(pid) for index, pid in STARTED_LINE.findall(self.log)}

    def stop(self, signum: signal.Signals) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=60)


@pytest.fixture
def supervisor_launcher() -> Iterator[Callable[..., Supervisor]]:
    started: list[Supervisor] = []

    def launch(*flags: str) -> Supervisor:
        command = [sys.executable, "-m", "kvstore.server.main", "--log-level", "info", *flags]
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        supervisor = Supervisor(process)
        threading.Thread(
            target=lambda: supervisor.log_lines.extend(
                line.decode(errors="replace") for line in process.stderr or ()
            ),
            daemon=True,
        ).start()
        started.append(supervisor)
        return supervisor

    yield launch
    for supervisor in started:
        if supervisor.process.poll() is None:
            supervisor.process.kill()
            supervisor.process.wait()
        for pid in supervisor.worker_pids().values():
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    with etcd_server(tmp_path) as server:
        yield server


def is_running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def wait_until(
    probe: Callable[[], Awaitable[bool]], what: str, log: Callable[[], str], timeout_s: float = 60.0
) -> None:
    """Bounded polling; on timeout the supervisor's log says why."""
    deadline = time.monotonic() + timeout_s
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout_s}s; log:\n{log()}")
        await asyncio.sleep(0.1)


async def registered_members(etcd: EtcdServer, supervisor: Supervisor, count: int) -> list[Member]:
    found: list[Member] = []

    async def listed() -> bool:
        nonlocal found
        assert supervisor.process.poll() is None, f"supervisor exited:\n{supervisor.log}"
        found = await list_members(etcd.url(PREFIX))
        return len(found) == count

    await wait_until(listed, f"{count} members", lambda: supervisor.log)
    return sorted(found, key=lambda member: int(member.address.rpartition(":")[2]))


def worker_flags(etcd: EtcdServer, ssd_dir: Path, *extra: str) -> tuple[str, ...]:
    return (
        "--workers",
        "2",
        "--cluster",
        etcd.url(PREFIX),
        "--listen",
        "127.0.0.1:0",
        "--dram-bytes",
        "64MiB",
        "--page-bytes",
        "16KiB",
        "--ssd-dir",
        str(ssd_dir),
        "--ssd-bytes",
        "32MiB",
        "--drain-grace-s",
        "2",
        *extra,
    )


async def put_and_read_back(
    address: str, namespace: Namespace, kv: torch.Tensor, keys: list[bytes], token: str
) -> torch.Tensor:
    """Put `kv` under `keys` at one worker, look the keys up and get them back."""
    async with KVClient(address, namespace, options=ClientOptions(token=token)) as client:
        assert (await client.put_blocks(keys, kv)).num_committed == len(keys)
        assert (await client.lookup_keys(keys)).num_matched == len(keys)
        got = torch.zeros_like(kv)
        assert await client.get_into(keys, got, form=KVForm.BLOCKS) == len(keys)
        return got


def tokens_toml(*pairs: tuple[str, str]) -> str:
    return "".join(
        f'[[tokens]]\nsha256 = "{token_sha256(token)}"\ntenant = "{tenant}"\n'
        for token, tenant in pairs
    )


# In the default suite (about 6 s): the one run of the real supervisor there.
async def test_two_workers_register_serve_reload_tokens_and_drain(
    etcd: EtcdServer,
    supervisor_launcher: Callable[..., Supervisor],
    tmp_path: Path,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(tokens_toml((TOKEN_OLD, "team-a")))
    ssd = tmp_path / "ssd"
    flags = worker_flags(etcd, ssd, "--tokens-file", str(tokens_file), "--lease-ttl-s", "60")
    supervisor = supervisor_launcher(*flags)
    members = await registered_members(etcd, supervisor, 2)
    assert len({member.node_id for member in members}) == 2
    assert len({member.address for member in members}) == 2
    assert len({member.data_port for member in members}) == 2
    for member in members:
        assert member.capacity_bytes == {"dram": 32 * MiB, "ssd": 16 * MiB}
        assert member.data_port > 0
    node_ids = {(ssd / f"worker-{i}" / NODE_ID_FILE).read_text().strip() for i in range(2)}
    assert node_ids == {member.node_id for member in members}

    namespace = make_namespace(tenant="team-a")
    kv = make_kv(namespace.layout, 3, form=KVForm.BLOCKS)
    for index, member in enumerate(members):
        keys = [f"w{index}-{block}".encode() for block in range(3)]
        got = await put_and_read_back(member.address, namespace, kv, keys, TOKEN_OLD)
        assert same_bytes(got, kv)
    # Each worker's log lines carry its index.
    assert re.search(r"INFO worker-0 kvstore\.server: serving kvstore\.v1", supervisor.log)
    assert re.search(r"INFO worker-1 kvstore\.server: serving kvstore\.v1", supervisor.log)

    # SIGHUP reaches every worker: each rereads the tokens file.
    tokens_file.write_text(tokens_toml((TOKEN_NEW, "team-a")))
    supervisor.process.send_signal(signal.SIGHUP)

    async def reloaded() -> bool:
        return all(
            f"worker-{i} kvstore.server: tokens file reloaded" in supervisor.log for i in range(2)
        )

    await wait_until(reloaded, "both workers reloading the tokens", lambda: supervisor.log)
    for index, member in enumerate(members):
        keys = [f"w{index}-new".encode()]
        got = await put_and_read_back(member.address, namespace, kv[:1], keys, TOKEN_NEW)
        assert same_bytes(got, kv[:1])

    # SIGTERM: both drain and withdraw (the 60 s leases cannot have expired), exit 0.
    assert await asyncio.to_thread(supervisor.stop, signal.SIGTERM) == 0
    assert await list_members(etcd.url(PREFIX)) == []
    assert not any(is_running(pid) for pid in supervisor.worker_pids().values())
    assert "every worker has exited" in supervisor.log


@pytest.mark.slow
async def test_a_killed_worker_is_restarted_with_its_node_id_and_blocks(
    etcd: EtcdServer,
    supervisor_launcher: Callable[..., Supervisor],
    tmp_path: Path,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    # Write-through: a committed block is on SSD, so a kill -9 cannot lose it.
    flags = worker_flags(etcd, tmp_path / "ssd", "--write-policy", "write-through")
    supervisor = supervisor_launcher(*flags, "--lease-ttl-s", "2")
    members = await registered_members(etcd, supervisor, 2)
    namespace = make_namespace()
    kv = make_kv(namespace.layout, 4, form=KVForm.BLOCKS)
    keys = [f"kept-{block}".encode() for block in range(4)]
    async with KVClient(members[0].address, namespace) as client:
        assert (await client.put_blocks(keys, kv)).num_committed == len(keys)
    pids = supervisor.worker_pids()
    killed = next(i for i in range(2) if f"gRPC {members[0].address}," in _started(supervisor, i))
    os.kill(pids[killed], signal.SIGKILL)

    async def restarted() -> bool:
        return supervisor.worker_pids()[killed] != pids[killed] and (
            supervisor.log.count(f"worker-{killed} kvstore.server.membership: registered") == 2
        )

    await wait_until(restarted, "the killed worker back in etcd", lambda: supervisor.log)
    assert f"worker {killed} (pid {pids[killed]}) was killed by SIGKILL unexpectedly" in (
        supervisor.log
    )
    assert supervisor.worker_pids()[1 - killed] == pids[1 - killed]  # the other untouched
    # Past the dead worker's lease: its key now lives on the new lease.
    await asyncio.sleep(3)
    after = await registered_members(etcd, supervisor, 2)
    assert {(m.node_id, m.address) for m in after} == {(m.node_id, m.address) for m in members}
    async with KVClient(members[0].address, namespace) as client:
        assert (await client.lookup_keys(keys)).num_matched == len(keys)
        got = torch.zeros_like(kv)
        assert await client.get_into(keys, got, form=KVForm.BLOCKS) == len(keys)
    assert same_bytes(got, kv)
    assert await asyncio.to_thread(supervisor.stop, signal.SIGINT) == 0
    assert await list_members(etcd.url(PREFIX)) == []


def _started(supervisor: Supervisor, index: int) -> str:
    """The supervisor's first "worker <index> started" line."""
    return next(line for line in supervisor.log_lines if f"worker {index} started: pid" in line)


@pytest.mark.slow
async def test_a_sigkilled_supervisor_leaves_no_workers_behind(
    etcd: EtcdServer, supervisor_launcher: Callable[..., Supervisor], tmp_path: Path
) -> None:
    flags = worker_flags(etcd, tmp_path / "ssd", "--lease-ttl-s", "60")
    supervisor = supervisor_launcher(*flags)
    await registered_members(etcd, supervisor, 2)
    pids = list(supervisor.worker_pids().values())
    assert len(pids) == 2
    assert all(is_running(pid) for pid in pids)
    supervisor.process.kill()
    supervisor.process.wait()

    async def workers_gone() -> bool:
        return not any(is_running(pid) for pid in pids)

    await wait_until(workers_gone, "the workers exiting", lambda: supervisor.log)
    # They drained on the way out: withdrawn, not left for their 60 s leases.
    assert await list_members(etcd.url(PREFIX)) == []
    assert supervisor.log.count("withdrew from the cluster") == 2


@pytest.mark.slow
def test_a_worker_that_cannot_start_stops_the_supervisor_with_exit_1(
    supervisor_launcher: Callable[..., Supervisor], tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing.pem")
    supervisor = supervisor_launcher(
        "--workers",
        "2",
        "--cluster",
        "etcd://127.0.0.1:1/kv",  # never reached: the workers fail before registering
        "--listen",
        "127.0.0.1:0",
        "--dram-bytes",
        "8MiB",
        "--tls-cert",
        missing,
        "--tls-key",
        missing,
    )
    assert supervisor.process.wait(timeout=120) == 1
    assert re.search(
        r"ERROR worker-\d kvstore\.server: cannot start: .*missing\.pem", supervisor.log
    )
    assert "could not start (its log says why); stopping" in supervisor.log
    assert not any(is_running(pid) for pid in supervisor.worker_pids().values())


@pytest.mark.slow
async def test_workers_that_all_die_at_once_are_restarted_not_taken_for_an_exit(
    etcd: EtcdServer, supervisor_launcher: Callable[..., Supervisor], tmp_path: Path
) -> None:
    """Each waits out its restart back-off with no process: the supervisor must not read
    that as every worker having exited, and end the service with status 0."""
    supervisor = supervisor_launcher(*worker_flags(etcd, tmp_path / "ssd", "--lease-ttl-s", "2"))
    await registered_members(etcd, supervisor, 2)
    pids = supervisor.worker_pids()
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)

    async def both_restarted() -> bool:
        now = supervisor.worker_pids()
        return all(now[index] != pid for index, pid in pids.items())

    await wait_until(both_restarted, "both workers restarted", lambda: supervisor.log)
    assert supervisor.process.poll() is None, supervisor.log
    assert "every worker has exited" not in supervisor.log
    await registered_members(etcd, supervisor, 2)
    assert await asyncio.to_thread(supervisor.stop, signal.SIGTERM) == 0


@pytest.mark.slow
async def test_a_stop_while_workers_start_is_a_clean_exit(
    etcd: EtcdServer, supervisor_launcher: Callable[..., Supervisor], tmp_path: Path
) -> None:
    """Stop and reload signals sent while the workers are still importing: no worker is
    killed by a SIGHUP, and a worker ended by the stop signal itself is no failure."""
    supervisor = supervisor_launcher(*worker_flags(etcd, tmp_path / "ssd"))

    async def both_spawned() -> bool:
        return len(supervisor.worker_pids()) == 2

    await wait_until(both_spawned, "both workers spawned", lambda: supervisor.log)
    supervisor.process.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.05)
    assert "killed by SIGHUP" not in supervisor.log
    assert await asyncio.to_thread(supervisor.stop, signal.SIGTERM) == 0, supervisor.log
