"""kvstore.bench.spawn: a benchmark's daemon that cannot start says why at once, and one
whose port was taken before it bound it starts again on another."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from kvstore.bench import spawn
from kvstore.bench.spawn import spawned_server


def test_a_daemon_that_cannot_start_raises_with_its_log_at_once() -> None:
    started = time.monotonic()
    with (
        pytest.raises(
            RuntimeError,
            match=r"exited with code 2 before serving(.|\n)*cannot read 'lots' as a size",
        ),
        spawned_server(["--dram-bytes", "lots"]),
    ):
        pass
    # Not the 120 s health-check wait of a child that is gone.
    assert time.monotonic() - started < 60


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield int(holder.getsockname()[1])


def test_a_port_taken_before_the_daemon_binds_it_is_replaced(
    taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = [taken_port]
    real_free_port = spawn.free_port
    monkeypatch.setattr(spawn, "free_port", lambda: ports.pop() if ports else real_free_port())
    with spawned_server(["--dram-bytes", "8MiB"]) as target:
        assert target != f"127.0.0.1:{taken_port}"
    assert ports == []  # the taken port was tried first
