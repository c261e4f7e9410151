"""A real etcd (Debian's etcd-server, 3.4) on free loopback ports, for tests.

    with etcd_server(tmp_path) as etcd:     # skips the test where `etcd` is not installed
        etcd.url("kvstore")                 # etcd://127.0.0.1:PORT/kvstore
        etcd.stop(); etcd.start()           # the same ports and data directory again

CI installs etcd (.ci/run), so there the tests always run.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvstore.bench.spawn import free_port

_START_TIMEOUT_S = 30.0


@dataclass
class EtcdServer:
    data_dir: Path
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def url(self, prefix: str) -> str:
        return f"etcd://{self.endpoint}/{prefix}"

    def start(self) -> None:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = (self.data_dir.parent / f"{self.data_dir.name}.log").open("ab")
        self.process = subprocess.Popen(
            [
                "etcd",
                "--name=test",
                f"--data-dir={self.data_dir}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=test={peer}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd did not start; see {log.name}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.client_port}/health", timeout=1
            ) as reply:
                return b'"health":"true"' in reply.read()
        except OSError:
            return False


def etcd_missing_reason() -> str | None:
    if shutil.which("etcd") is None:
        return "etcd is not installed (apt-get install etcd-server; CI installs it)"
    return None


@contextlib.contextmanager
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A started etcd, stopped when the block ends; skips the test without the binary."""
    reason = etcd_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.stop()
