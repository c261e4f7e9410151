"""A real kvstore server on its own event-loop thread, for blocking callers (the sync
client, the connector, kvstore-bench's runners, which start their own loops)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from kvstore.server.app import build_server
from kvstore.server.config import load_config


@contextlib.contextmanager
def server_thread(**overrides: Any) -> Iterator[str]:
    """A real server on 127.0.0.1 port 0, served by its own event loop thread;
    `overrides` are config settings ({"auth.tokens_file": ...})."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    settings = {
        "listen": "127.0.0.1:0",
        "log_level": "warning",
        "store.dram_bytes": 16 << 20,
        "store.page_bytes": 4096,
        "limits.drain_grace_s": 0.5,
        **overrides,
    }
    running = asyncio.run_coroutine_threadsafe(
        build_server(load_config(None, settings)), loop
    ).result()
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        asyncio.run_coroutine_threadsafe(running.drain(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
