"""`kvstore-server` as a child process, for tests that kill it or limit what it may do.

A test module that needs one declares the fixture itself, so its name stays local:

    @pytest.fixture
    def launch() -> Iterator[Launch]:
        with daemon_launcher() as start:
            yield start

`start(ssd_dir, *flags)` runs `python -m kvstore.server.main` on a free loopback port with
small defaults (64 MiB of DRAM, 16 KiB pages; later flags override them) and returns once
the daemon answers health checks. Every daemon still running when the block ends is
killed. Its stderr (the log) is kept in `ServerProcess.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kvstore.bench.spawn import free_port, wait_until_serving

_START_TIMEOUT_S = 60.0


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    target: str
    log_lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def log(self) -> str:
        return "".join(self.log_lines)

    def stop(self, signum: signal.Signals) -> int:
        """Send `signum` and wait for the exit; returns the exit code (-signum if killed)."""
        self.process.send_signal(signum)
        code = self.process.wait(timeout=60)
        if self._reader is not None:
            self._reader.join(timeout=10)
        return code


Launch = Callable[..., ServerProcess]


@contextlib.contextmanager
def daemon_launcher() -> Iterator[Launch]:
    """A `Launch` function; the daemons it started are killed when the block ends."""
    started: list[ServerProcess] = []

    def start(
        ssd_dir: Path,
        *flags: str,
        preexec_fn: Callable[[], None] | None = None,
        tls_ca: str | None = None,
    ) -> ServerProcess:
        """`tls_ca`: the CA of a daemon started with --tls-cert, for its health checks."""
        server = _spawn(ssd_dir, flags, preexec_fn)
        started.append(server)
        _wait_until_started(server, tls_ca)
        return server

    try:
        yield start
    finally:
        for server in started:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait()


async def serving(launch: Launch, ssd_dir: Path, *flags: str, **kwargs: Any) -> ServerProcess:
    """`launch` off the event loop: starting a daemon blocks for a second or more."""
    return await asyncio.to_thread(launch, ssd_dir, *flags, **kwargs)


def _spawn(
    ssd_dir: Path, flags: tuple[str, ...], preexec_fn: Callable[[], None] | None
) -> ServerProcess:
    target = f"127.0.0.1:{free_port()}"
    command = [
        sys.executable,
        "-m",
        "kvstore.server.main",
        "--listen",
        target,
        "--ssd-dir",
        str(ssd_dir),
        "--dram-bytes",
        "64MiB",
        "--page-bytes",
        "16KiB",
        "--log-level",
        "info",
        "--drain-grace-s",
        "5",
        *flags,
    ]
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=preexec_fn,
    )
    server = ServerProcess(process, target)
    # A reader thread keeps the pipe drained, so logging never blocks the server.
    server._reader = threading.Thread(
        target=lambda: server.log_lines.extend(
            line.decode(errors="replace") for line in process.stderr or ()
        ),
        daemon=True,
    )
    server._reader.start()
    return server


def _wait_until_started(server: ServerProcess, tls_ca: str | None) -> None:
    # Wait for the log line first: a health check sent before the port is open puts
    # the channel into reconnect backoff, which would add seconds to every start.
    process = server.process
    deadline = time.monotonic() + _START_TIMEOUT_S
    while "serving kvstore.v1" not in server.log:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            if server._reader is not None:
                server._reader.join(timeout=10)
            raise AssertionError(f"server did not start:\n{server.log}")
        time.sleep(0.01)
    credentials = None
    if tls_ca is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
    wait_until_serving(server.target, timeout_s=30, credentials=credentials)
