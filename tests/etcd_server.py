"""A real etcd (Debian's etcd-server, 3.4) on free loopback ports, for tests.

    with etcd_server(tmp_path) as etcd:     # skips the test where `etcd` is not installed
        etcd.url("kvstore")                 # etcd://127.0.0.1:PORT/kvstore
        etcd.stop(); etcd.start()           # the same ports and data directory again

The launcher is the bench's (kvstore.bench.local_etcd), which LocalCluster uses too.
CI installs etcd (.ci/run), so there the tests always run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.bench.local_etcd import EtcdServer, etcd_missing_reason

__all__ = ["EtcdServer", "etcd_missing_reason", "etcd_server"]


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
