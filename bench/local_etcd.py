"""A real etcd (Debian's etcd-server, 3.4) as a child process on free loopback ports.

The one launcher of etcd in the project: `kvstore.bench.local_cluster.LocalCluster` runs its
cluster's etcd with it, and the tests' `tests/etcd_server.py` wraps it.

    etcd = EtcdServer(Path("/tmp/x/etcd"))  # the data directory (made by etcd)
    etcd.start()                            # EtcdMissing where there is no `etcd` binary
    etcd.url("kvstore")                     # etcd://127.0.0.1:PORT/kvstore
    etcd.stop(); etcd.start()               # the same ports and data again

    EtcdServer(path, tls=EtcdServerTLS(cert_file, key_file, client_ca_file))
                                            # clients over TLS: etcds://127.0.0.1:PORT/...
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.bench.spawn import free_port

_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
ETCD_BINARY = "etcd"


class EtcdMissing(RuntimeError):
    """There is no etcd binary on PATH."""


def etcd_missing_reason() -> str | None:
    """Why etcd cannot be started here (a sentence a person can act on), or None."""
    if shutil.which(ETCD_BINARY) is None:
        return (
            f"no {ETCD_BINARY!r} on PATH: install Debian's etcd-server "
            "(apt-get install etcd-server), or put an etcd 3.4+ binary on PATH"
        )
    return None


@dataclass(frozen=True)
class EtcdServerTLS:
    """etcd's certificate and key for its client port; with `client_ca_file`, clients
    must present a certificate that CA signed (etcd's --client-cert-auth)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


@dataclass
class EtcdServer:
    """One etcd member serving clients on `client_port` (over TLS with `tls`), with its
    data in `data_dir`; its log goes to `<data_dir>.log` next to it (appended to on every
    start). `/health` is asked on a plaintext metrics port, whatever the client port
    demands. `auth_token_ttl_s` is how long etcd keeps an unused auth token."""

    data_dir: Path
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    tls: EtcdServerTLS | None = None
    auth_token_ttl_s: int = 300
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """HOST:PORT its clients use."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def url(self, prefix: str) -> str:
        """The `etcd://` target of a cluster under `prefix` (`etcds://` with TLS)."""
        scheme = "etcds" if self.tls is not None else "etcd"
        return f"{scheme}://{self.endpoint}/{prefix}"

    def start(self) -> None:
        """Start it and return once it answers its health check; raises EtcdMissing without
        the binary, RuntimeError (naming the log) when it does not come up."""
        reason = etcd_missing_reason()
        if reason is not None:
            raise EtcdMissing(reason)
        if self.running:
            raise RuntimeError(f"etcd on {self.endpoint} is already running")
        client = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        tls_flags = []
        if self.tls is not None:
            tls_flags = [f"--cert-file={self.tls.cert_file}", f"--key-file={self.tls.key_file}"]
            if self.tls.client_ca_file is not None:
                tls_flags += ["--client-cert-auth", f"--trusted-ca-file={self.tls.client_ca_file}"]
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    ETCD_BINARY,
                    "--name=kvstore-local",
                    f"--data-dir={self.data_dir}",
                    f"--listen-client-urls={client}",
                    f"--advertise-client-urls={client}",
                    f"--listen-peer-urls={peer}",
                    f"--initial-advertise-peer-urls={peer}",
                    f"--initial-cluster=kvstore-local={peer}",
                    f"--listen-metrics-urls=http://127.0.0.1:{self.metrics_port}",
                    f"--auth-token-ttl={self.auth_token_ttl_s}",
                    *tls_flags,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd did not start on {self.endpoint}; see {self.log_path}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 10 s; a no-op when stopped."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/health", timeout=1
            ) as reply:
                return b'"health":"true"' in reply.read()
        except OSError:
            return False
