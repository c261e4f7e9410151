"""A write-through acknowledgement, checked at the worst moment: right when it arrives.

The daemon runs as a child process. When a put's reply arrives, each of its blocks'
files must already be in place with the bytes that were put, and the reply must say
DURABLE_ON_SSD; a SIGKILL at that instant, with nothing flushed, must lose none of them.
Both transports carry the puts (the data plane and gRPC alone). The issue measured 2 of
200 such blocks surviving before write-through waited for its files.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import Launch, daemon_launcher, serving  # tests/daemons.py
from keyed_blocks import (  # tests/keyed_blocks.py
    keyed_payload,
    keyed_tensor,
    served_blocks,
    until_recovered,
)

from kvstore.client import ClientOptions, Durability, KVClient, PutOutcome
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.server import build_server, load_config

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=DType.FLOAT16, block_tokens=16)
BLOCK = LAYOUT.block_bytes  # 4 KiB
NS = Namespace(tenant="acked", model_fingerprint="toy", layout=LAYOUT)
TRANSPORTS = {
    "data-plane": ClientOptions(verify_checksums=False),
    "grpc": ClientOptions(verify_checksums=False, data_plane=False),
}
PUTS_PER_CLIENT = 10
BLOCKS_PER_PUT = 10


@pytest.fixture
def launch() -> Iterator[Launch]:
    with daemon_launcher() as start:
        yield start


def stored_payload(ssd_dir: Path, key: bytes) -> bytes | None:
    """The payload of `key`'s block file (a block file ends with the block's bytes), or
    None where no file is in place."""
    paths = list(ssd_dir.glob(f"*/{key.hex()}.kvb"))
    return paths[0].read_bytes()[-BLOCK:] if paths else None


async def put_and_check_at_once(target: str, ssd_dir: Path, name: str) -> list[bytes]:
    """One session of puts over transport `name`; returns the keys, all checked on disk."""
    keys: list[bytes] = []
    async with KVClient(target, NS, options=TRANSPORTS[name]) as client:
        for number in range(PUTS_PER_CLIENT):
            batch = [f"{name}/{number}/{index}".encode() for index in range(BLOCKS_PER_PUT)]
            parent = keys[-1] if keys else b""
            result = await client.put_blocks(batch, keyed_tensor(LAYOUT, batch), parent_key=parent)
            on_disk = [stored_payload(ssd_dir, key) for key in batch]  # before anything else
            assert result.outcomes == (PutOutcome.COMMITTED,) * BLOCKS_PER_PUT
            missing = on_disk.count(None)
            assert not missing, f"put {number}: {missing} of {len(batch)} files not in place"
            assert on_disk == [keyed_payload(key, BLOCK) for key in batch]
            assert result.durability is Durability.DURABLE_ON_SSD
            keys.extend(batch)
        if name == "data-plane":
            assert client.data_plane is not None, "the puts did not use the data plane"
    return keys


async def test_write_through_files_are_whole_when_the_reply_arrives_and_survive_sigkill(
    launch: Launch, tmp_path: Path
) -> None:
    ssd_dir = tmp_path / "ssd"
    flags = ("--write-policy", "write-through", "--page-bytes", str(BLOCK))
    server = await serving(launch, ssd_dir, *flags)
    chains = [await put_and_check_at_once(server.target, ssd_dir, name) for name in TRANSPORTS]
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL

    # Restarted in this process: the same build_server, which recovers before it serves.
    settings = {"listen": "127.0.0.1:0", "log_level": "warning", "store.ssd_dir": str(ssd_dir)}
    running = await build_server(load_config(None, settings))
    try:
        async with KVClient(f"127.0.0.1:{running.port}", NS, options=TRANSPORTS["grpc"]) as client:
            await until_recovered(client)
            for keys in chains:
                served = await served_blocks(client, keys)
                assert served == [keyed_payload(key, BLOCK) for key in keys]
    finally:
        await running.drain()
