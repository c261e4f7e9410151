"""The fuzz server: the real server with small limits, so hostile sizes reach them cheaply."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from fuzz_corpus import (
    FRAME_TIMEOUT_S,
    MAX_KEYS,
    MAX_MESSAGE_BYTES,
    MAX_NAMESPACES,
    MAX_TRANSFER_S,
    STREAM_IDLE_TIMEOUT_S,
)
from fuzz_session import FuzzSession

from kvstore.server import RunningServer

FUZZ_SERVER: dict[str, Any] = {
    "store.dram_bytes": 32 << 20,
    "store.page_bytes": 4 << 10,
    "store.max_namespaces": MAX_NAMESPACES,
    # Two of the hostile puts' 4 MiB blocks: a third started one is RESOURCE_EXHAUSTED.
    "store.max_put_reserved_bytes": 8 << 20,
    "store.max_lease_s": 60.0,
    "limits.max_message_bytes": MAX_MESSAGE_BYTES,
    "limits.default_chunk_bytes": MAX_MESSAGE_BYTES - 4096,
    "limits.max_keys": MAX_KEYS,
    "limits.max_data_connections": 64,
    # A stalled put or get must be cut by the server itself, within these.
    "limits.stream_idle_timeout_s": STREAM_IDLE_TIMEOUT_S,
    "limits.frame_timeout_s": FRAME_TIMEOUT_S,
    "limits.max_transfer_s": MAX_TRANSFER_S,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The 20,000-case fuzz takes minutes: it runs only when `-m` names `slow`, so that a
    plain run of the whole suite stays within its budget."""
    if "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="20,000 fuzz cases: run with -m slow")
    for item in items:
        if item.originalname == "test_fuzz_long":
            item.add_marker(skip)


@pytest.fixture
async def fuzz_session(
    server_factory: Callable[..., Awaitable[RunningServer]],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> AsyncIterator[FuzzSession]:
    """A session on a fresh fuzz server; `indirect` parametrization with
    "write-through" gives the server an SSD tier that every committed block reaches."""
    settings = dict(FUZZ_SERVER)
    if getattr(request, "param", None) == "write-through":
        settings["store.ssd_dir"] = str(tmp_path / "ssd")
        settings["store.ssd_bytes"] = 64 << 20
        settings["store.write_policy"] = "write-through"
    running = await server_factory(**settings)
    # Raw bytes both ways, and no limit on what the fuzzer may send.
    async with (
        grpc.aio.insecure_channel(
            f"127.0.0.1:{running.port}", options=[("grpc.max_send_message_length", 64 << 20)]
        ) as channel,
        FuzzSession(running, channel) as session,
    ):
        yield session
