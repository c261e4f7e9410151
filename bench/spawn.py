"""Start a kvstore-server (or the raw-gRPC ceiling server) in a child process for a benchmark."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.server.workers import free_ports


def free_port() -> int:
    """A loopback port free now, from outside the kernel's ephemeral range, so that no
    process's bind to port 0 or outgoing connection takes it before the child binds it."""
    return free_ports("127.0.0.1", 1)[0]


# A child that exits before serving is started again on a fresh port this many times
# when its log says the port was taken: free_port() gives the port back before the child
# binds it, and another process may take it meanwhile.
_PORT_RACE_TRIES = 3
_LOG_TAIL_BYTES = 2000


class ServerExited(RuntimeError):
    """The server process exited before it answered health checks."""


def wait_until_serving(
    target: str,
    timeout_s: float = 120.0,
    credentials: grpc.ChannelCredentials | None = None,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Until `target` answers health checks SERVING (over TLS with `credentials`).
    `process`: the server's; ServerExited at once if it exits first."""
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
            if process is not None and process.poll() is not None:
                raise ServerExited(f"exited with code {process.returncode} before serving")
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
    `credentials`: the server serves TLS (its flags say so), and these trust it.
    A server that exits before serving raises RuntimeError with the end of its log."""
    for attempt in range(1, _PORT_RACE_TRIES + 1):
        target = f"127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "kvstore.server.main", "--listen", target, *extra_args]
        with child_process(command, log_path) as (process, log):
            try:
                wait_until_serving(target, credentials=credentials, process=process)
            except ServerExited as exited:
                tail = log_tail(log)
                if "cannot listen" in tail and attempt < _PORT_RACE_TRIES:
                    continue  # the port was taken before the child bound it
                message = f"kvstore-server on {target} {exited}; its log ends:\n{tail}"
                raise RuntimeError(message) from None
            except TimeoutError:
                process.kill()
                raise
            yield target
            return


@contextlib.contextmanager
def spawned_ceiling_server() -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "kvstore.bench.ceiling", "--port", str(port)]
    with child_process(command, None) as (process, _):
        target = f"127.0.0.1:{port}"
        wait_until_serving(target, process=process)
        yield target


def log_tail(log: IO[bytes]) -> str:
    """The end of a child's log file, for an error message."""
    log.flush()
    log.seek(0, os.SEEK_END)
    log.seek(max(0, log.tell() - _LOG_TAIL_BYTES))
    return log.read().decode(errors="replace").strip() or "(nothing)"


@contextlib.contextmanager
def child_process(
    command: list[str], log_path: Path | None
) -> Iterator[tuple[subprocess.Popen[bytes], IO[bytes]]]:
    """The child, its stdout and stderr in `log_path` (appended) or a temporary file;
    stopped (stop_child) on exit."""
    with open(log_path, "a+b") if log_path else tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, env=os.environ.copy())
        try:
            yield process, log
        finally:
            stop_child(process)


def stop_child(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
