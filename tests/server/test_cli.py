"""`kvstore-server`: the real console script as a subprocess, its stats command, and SIGTERM.

The daemon listens on 127.0.0.1:0 and reports the bound port in its start-up log line,
which the tests read from its stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.client import (
    ClientOptions,
    DType,
    KVClient,
    KVForm,
    KVLayout,
    Namespace,
    Unavailable,
)
from kvstore.server.main import main

MakeKV = Callable[..., torch.Tensor]
START_TIMEOUT_S = 60.0
SERVING_LINE = re.compile(r"serving kvstore\.v1 on (\S+) \(port (\d+)\)")


def server_executable() -> str:
    beside_python = Path(sys.executable).with_name("kvstore-server")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("kvstore-server")
    assert found is not None, "kvstore-server is not installed (pip install -e .)"
    return found


@dataclass
class Daemon:
    process: asyncio.subprocess.Process
    port: int
    log: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def collect_log(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.log.append(line.decode(errors="replace"))


async def start_daemon(*flags: str) -> Daemon:
    process = await asyncio.create_subprocess_exec(
        server_executable(),
        "--listen",
        "127.0.0.1:0",
        "--dram-bytes",
        "64MiB",
        "--page-bytes",
        "64KiB",
        "--drain-grace-s",
        "20",
        *flags,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[str] = []

    async def read_until_serving() -> int:
        assert process.stderr is not None
        while True:
            raw = await process.stderr.readline()
            if not raw:
                raise AssertionError("kvstore-server exited before serving:\n" + "".join(lines))
            line = raw.decode(errors="replace")
            lines.append(line)
            match = SERVING_LINE.search(line)
            if match:
                return int(match.group(2))

    try:
        port = await asyncio.wait_for(read_until_serving(), START_TIMEOUT_S)
    except BaseException:
        process.kill()
        await process.wait()
        raise
    daemon = Daemon(process, port, lines)
    daemon._reader = asyncio.create_task(daemon.collect_log())
    return daemon


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    running = await start_daemon()
    yield running
    if running.process.returncode is None:
        running.process.kill()
        await running.process.wait()
    if running._reader is not None:
        await running._reader


async def run_cli(*argv: str, timeout_s: float = 60.0) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        server_executable(),
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


LAYOUT = KVLayout(num_layers=2, num_kv_heads=8, head_dim=64, dtype=DType.FLOAT16, block_tokens=256)
NS = Namespace(tenant="cli", model_fingerprint="toy", layout=LAYOUT)  # 1 MiB blocks


# -- the daemon ------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_daemon_serves_logs_and_prints_stats(daemon: Daemon, make_kv: MakeKV) -> None:
    start_line = next(line for line in daemon.log if SERVING_LINE.search(line))
    assert "127.0.0.1:0" in start_line
    assert "lru" in start_line, "the start-up log names the eviction policy"
    async with KVClient(daemon.target, NS) as client:
        keys = [b"cli-%d" % i for i in range(4)]
        kv = make_kv(LAYOUT, 4, form=KVForm.BLOCKS)
        assert (await client.put_blocks(keys, kv)).num_committed == 4
        assert (await client.lookup_keys(keys)).num_matched == 4

    # Two real `kvstore-server stats` processes, side by side (each pays for its imports).
    (code, out, err), (json_code, json_out, json_err) = await asyncio.gather(
        run_cli("stats", "--target", daemon.target),
        run_cli("stats", "--target", daemon.target, "--json"),
    )
    assert code == 0, err
    assert "kvstore tiers" in out
    assert "dram" in out
    assert "4.0 MiB / 64.0 MiB" in out
    assert "blocks put 4 (4.0 MiB)" in out
    assert "namespaces 1" in out
    # A DRAM-only daemon: write-back, and a committed block lives in memory only.
    assert "write policy write-back: a committed block is durable in memory" in out
    assert "put reservations 0 B  SSD writes pending 0" in out

    assert json_code == 0, json_err
    stats = json.loads(json_out)
    assert int(stats["blocksPut"]) == 4
    assert int(stats["lookupHits"]) == 4
    # The daemon's own CPU time: importing torch and gRPC alone costs more than 0.1 s.
    assert int(stats["processCpuUs"]) > 100_000
    assert re.search(r"cpu \d+\.\ds", out)
    # The daemon process's health: its own RSS (torch alone is more than 50 MiB), its fds
    # (at least the gRPC and data-plane listeners and this client's connection), and the
    # loop-lag line.
    assert int(stats["rssBytes"]) > 50 << 20
    assert int(stats["openFds"]) >= 3
    assert "loopLagMaxUs" in stats
    assert int(stats["loopLagP99Us"]) <= int(stats["loopLagMaxUs"])
    assert re.search(r"process: rss \S+ \S+  \d+ open fds  event-loop lag .*: max", out)
    # The put went over the data plane, which the start-up log and stats both name.
    port = int(stats["dataPlanePort"])
    assert port > 0
    assert f"data plane on port {port}" in start_line
    assert int(stats["dataPlaneTransfers"]) == 1
    assert f"data plane on port {port}: " in out
    assert "1 puts and gets carried" in out
    (tier,) = stats["tiers"]
    assert tier["name"] == "dram"
    assert int(tier["numBlocks"]) == 4
    assert int(tier["capacityBytes"]) == 64 << 20


@pytest.mark.slow
async def test_sigterm_drains_and_finishes_the_stream_in_flight(
    daemon: Daemon, make_kv: MakeKV
) -> None:
    num_blocks = 32  # 32 MiB: far more than transport buffers hold, so the get is mid-stream
    keys = [b"drain-%d" % i for i in range(num_blocks)]
    kv = make_kv(LAYOUT, num_blocks, form=KVForm.BLOCKS, seed=5)
    async with KVClient(daemon.target, NS) as client:
        assert (await client.put_blocks(keys, kv)).num_committed == num_blocks

    async with grpc.aio.insecure_channel(daemon.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

        options = ClientOptions(chunk_bytes=16 << 10)
        async with KVClient(daemon.target, NS, options=options) as reader:
            stream = reader.iter_layers(keys)
            first = await anext(stream)
            assert first.layer == 0
            daemon.process.send_signal(signal.SIGTERM)

            update = await asyncio.wait_for(watch.read(), 10)
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            async with KVClient(daemon.target, NS) as latecomer:
                with pytest.raises(Unavailable):
                    await latecomer.lookup_keys(keys)

            rest = [arrival async for arrival in stream]
        assert [arrival.layer for arrival in rest] == [1]
        assert torch.equal(first.kv.view(torch.uint8), kv[:, 0].contiguous().view(torch.uint8))
        assert torch.equal(rest[0].kv.view(torch.uint8), kv[:, 1].contiguous().view(torch.uint8))

    assert await asyncio.wait_for(daemon.process.wait(), 15) == 0
    assert daemon._reader is not None
    await daemon._reader
    log = "".join(daemon.log)
    assert "draining" in log
    assert log.index("draining") < log.index("stopped")


# -- the command line, in process (fast paths that never start serving) ----------------------------


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--dram-bytes", "lots"], "cannot read 'lots' as a size"),
        (["--page-bytes", "1000"], "page_bytes must be a power of two"),
        (["--max-message-bytes", "1MiB"], "default_chunk_bytes must be in"),
        (["--eviction-policy", "fifo"], "invalid choice: 'fifo'"),
        (["--config", "/nonexistent/kvstore.toml"], "cannot read config file"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert fragment in capsys.readouterr().err


def test_unknown_setting_in_the_config_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "kvstore.toml"
    path.write_text("[store]\ndram = '1GiB'\n")
    with pytest.raises(SystemExit) as raised:
        main(["--config", str(path)])
    assert raised.value.code == 2
    assert "unknown setting(s) ['dram'] in [store]" in capsys.readouterr().err


def test_port_in_use_exits_1_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="kvstore.server"):
            code = main(["--listen", f"127.0.0.1:{port}", "--dram-bytes", "1MiB"])
    assert code == 1
    assert f"cannot start: cannot listen on 127.0.0.1:{port}" in caplog.text


def test_stats_of_an_absent_server_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens on it
    with contextlib.suppress(SystemExit):
        code = main(["stats", "--target", f"127.0.0.1:{port}", "--timeout", "2"])
        assert code == 1
    assert "kvstore-server stats: UNAVAILABLE" in capsys.readouterr().err
