"""A write-through daemon on an SSD directory, in process, for tests that restart one on
the same directory and look at what came back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from keyed_blocks import until_recovered  # tests/keyed_blocks.py

from kvstore.client import ClientOptions, KVClient
from kvstore.layout import Namespace
from kvstore.server import build_server, load_config


@asynccontextmanager
async def write_through_daemon(
    ssd_dir: Path, namespace: Namespace, *, data_plane: bool, dram_bytes: int
) -> AsyncIterator[KVClient]:
    """A write-through daemon on `ssd_dir`, its rebuild done, and a client; drained after."""
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "log_level": "warning",
        "store.dram_bytes": dram_bytes,
        "store.page_bytes": 4 << 10,
        "limits.drain_grace_s": 2.0,
        "store.ssd_dir": str(ssd_dir),
        "store.write_policy": "write-through",
    }
    running = await build_server(load_config(None, settings))
    try:
        options = ClientOptions(data_plane=data_plane)
        async with KVClient(f"127.0.0.1:{running.port}", namespace, options=options) as client:
            await until_recovered(client)
            yield client
    finally:
        await running.drain()
