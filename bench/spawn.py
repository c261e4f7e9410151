"""Start a kvstore-server (or the raw-gRPC ceiling server) in a child process for a benchmark."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_serving(
    target: str, timeout_s: float = 120.0, credentials: grpc.ChannelCredentials | None = None
) -> None:
    """Until `target` answers health checks SERVING (over TLS with `credentials`)."""
    deadline = time.monotonic() + timeout_s
    if credentials is None:
        opened = grpc.insecure_channel(target)
    else:
        opened = grpc.secure_channel(target, credentials)
    with opened as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no server answered health checks on {target}")
            time.sleep(0.1)


@contextlib.contextmanager
def spawned_server(
    extra_args: list[str],
    *,
    log_path: Path | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> Iterator[str]:
    """Run `kvstore-server` on a free loopback port; yields its target. SIGTERM on exit.
    `credentials`: the server serves TLS (its flags say so), and these trust it."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", "kvstore.server.main", "--listen", target, *extra_args]
    with _child(command, log_path) as process:
        try:
            wait_until_serving(target, credentials=credentials)
        except TimeoutError:
            process.kill()
            raise
        yield target


@contextlib.contextmanager
def spawned_ceiling_server() -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "kvstore.bench.ceiling", "--port", str(port)]
    with _child(command, None):
        target = f"127.0.0.1:{port}"
        wait_until_serving(target)
        yield target


@contextlib.contextmanager
def _child(command: list[str], log_path: Path | None) -> Iterator[subprocess.Popen[bytes]]:
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(command, stdout=log, stderr=log, env=os.environ.copy())
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log_path:
            log.close()  # type: ignore[union-attr]
