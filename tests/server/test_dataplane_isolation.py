"""A bad frame ends its own data-plane connection only: a transfer in flight on another
connection goes on, and the blocks already stored stay as they were, byte for byte."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch

from kvstore.checksum import ChecksumKind, checksum
from kvstore.client import KVClient, KVForm
from kvstore.layout import KVLayout, Namespace
from kvstore.server import RunningServer
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import PUT_CHUNKS, chunk_parts, encode_put_header
from kvstore.wire.frames import FrameKind
from kvstore.wire.namespace import namespace_to_wire

INVALID_ARGUMENT = 3
SEED_KEYS = [b"stored-0", b"stored-1"]
NEW_KEYS = [b"in-flight-0", b"in-flight-1"]
# tests/server/conftest.py's fixture: connects a DataPlanePeer.
ConnectPeer = Callable[[RunningServer], Awaitable[Any]]


def layer_chunks(kv: torch.Tensor, layer: int) -> bytes:
    """LayerChunks of `layer` of every block of `kv` (blocks form), checksummed."""
    parts: list[bytes | memoryview] = []
    for block in range(len(kv)):
        data = kv[block, layer].contiguous().view(torch.uint8).numpy().tobytes()
        layer_sum = checksum(ChecksumKind.XXH3_64, data)
        parts += chunk_parts(PUT_CHUNKS, block, layer, 0, layer_sum, [data])
    return b"".join(bytes(part) for part in parts)


BAD_FRAMES = [
    pytest.param(FrameKind.PUT, b"\x0a\xff\xff\xff\xff\x0f", "malformed", id="malformed-put"),
    pytest.param(FrameKind.GET, b"\x0a\xff\xff\xff\xff\x0f", "malformed", id="malformed-get"),
    pytest.param(FrameKind.PUT_END, b"", "PUT or GET", id="put-end-first"),
]


@pytest.mark.parametrize(("kind", "payload", "fragment"), BAD_FRAMES)
async def test_a_bad_frame_leaves_other_transfers_and_stored_blocks_alone(
    kind: FrameKind,
    payload: bytes,
    fragment: str,
    server: RunningServer,
    connect_peer: ConnectPeer,
    make_namespace: Callable[..., Namespace],
    make_layout: Callable[..., KVLayout],
    make_kv: Callable[..., torch.Tensor],
) -> None:
    layout = make_layout()
    namespace = make_namespace(layout)
    stored = make_kv(layout, len(SEED_KEYS), form=KVForm.BLOCKS, seed=1)
    async with KVClient(f"127.0.0.1:{server.port}", namespace) as client:
        assert (await client.put_blocks(SEED_KEYS, stored)).num_committed == len(SEED_KEYS)
        used_bytes = server.store.report().tiers[0].used_bytes
        block_used_bytes = used_bytes // len(SEED_KEYS)  # a block's pages

        # A put in flight on one connection: declared, its first layer sent.
        new = make_kv(layout, len(NEW_KEYS), form=KVForm.BLOCKS, seed=2)
        writer = await connect_peer(server)
        header = encode_put_header(
            namespace=namespace_to_wire(namespace).SerializeToString(),
            checksum_kind=ChecksumKind.XXH3_64.value,
            blocks=[(NEW_KEYS[0], b""), (NEW_KEYS[1], NEW_KEYS[0])],
        )
        await writer.send(FrameKind.PUT, header + layer_chunks(new, 0))

        # A bad frame on another connection ends that connection only.
        bad = await connect_peer(server)
        await bad.send(kind, payload)
        code, message = await bad.read_error()
        assert code == INVALID_ARGUMENT, message
        assert fragment in message
        assert await bad.closed_by_server()

        # The put in flight goes on, and commits.
        await writer.send(FrameKind.PUT, layer_chunks(new, 1))
        await writer.send(FrameKind.PUT_END)
        reply_kind, reply = await writer.read()
        assert reply_kind == FrameKind.PUT_DONE
        assert pb.PutBlocksResponse.FromString(reply).num_committed == len(NEW_KEYS)

        # Stored and new blocks come back unchanged; nothing else was reserved.
        for keys, kv in ((SEED_KEYS, stored), (NEW_KEYS, new)):
            dest = torch.zeros_like(kv)
            assert await client.get_into(keys, dest, form=KVForm.BLOCKS) == len(keys)
            assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))
        expected_bytes = used_bytes + len(NEW_KEYS) * block_used_bytes
        assert server.store.report().tiers[0].used_bytes == expected_bytes
