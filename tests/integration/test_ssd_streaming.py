"""A get of SSD-only blocks streams layer 0 of the first blocks while later ones are read.

The server is the real one, in-process, restarted on its SSD directory so every block
lives on SSD only. The seam is the SSD tier's blocking `read_block`, which runs on the
tier's I/O threads: the last block's read is held at a gate. The first GetBlocks reply
must arrive while the gate is shut, so it cannot depend on that read (no sleeps: the
wait below is only a deadlock guard).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from kvstore.client import ClientOptions, KVClient, KVForm, TierKind
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.server import RunningServer
from kvstore.tiers.blockfile import header_bytes
from kvstore.tiers.ssd import SsdLocation, SsdTier
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire.namespace import namespace_to_wire

KiB = 1 << 10
LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype=DType.FLOAT16, block_tokens=16)
NS = Namespace(tenant="stream", model_fingerprint="toy", layout=LAYOUT)
NUM_BLOCKS = 6
KEYS = [f"block-{index}".encode() for index in range(NUM_BLOCKS)]
GUARD_S = 20.0  # only a deadlock guard: a passing run never waits on it


def blocks() -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    shape = (NUM_BLOCKS, LAYOUT.num_layers, *LAYOUT.layer_shape)
    return (torch.rand(shape, generator=generator) * 0.2 + 1.0).to(torch.float16)


async def ssd_only_server(
    server_factory: Any, ssd_dir: Path, compression: str
) -> tuple[RunningServer, torch.Tensor]:
    """A server whose every block of KEYS is on SSD only (put, drained, restarted)."""
    store = {
        "store__ssd_dir": str(ssd_dir),
        "store__ssd_compression": compression,
        "store__page_bytes": 16 * KiB,
    }
    data = blocks()
    writer = await server_factory(**store, store__write_policy="write-through")
    async with KVClient(f"127.0.0.1:{writer.port}", NS) as client:
        result = await client.put_blocks(KEYS, data, form=KVForm.BLOCKS)
        assert result.num_committed == NUM_BLOCKS
    await writer.drain()
    reader = await server_factory(**store, store__promote_on_hit=False)
    return reader, data


class GatedReads:
    """Holds the SSD tier's read of one block file until `release`."""

    def __init__(self, ssd: SsdTier, held: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = threading.Event()
        self.read_paths: list[Path] = []
        original = ssd.read_block

        def read_block(location: SsdLocation, *args: Any) -> Any:
            if location.path == held:
                assert self.gate.wait(GUARD_S), "the held read was never released"
            self.read_paths.append(location.path)  # appended once the read goes ahead
            return original(location, *args)

        monkeypatch.setattr(ssd, "read_block", read_block)

    def release(self) -> None:
        self.gate.set()


@pytest.mark.parametrize("compression", ["off", "lz4"])
@pytest.mark.parametrize("max_chunk_bytes", [4 * KiB, 256 * KiB], ids=["chunks", "runs"])
async def test_layer_0_of_the_first_block_arrives_before_the_last_block_is_read(
    server_factory: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    compression: str,
    max_chunk_bytes: int,
) -> None:
    server, data = await ssd_only_server(server_factory, tmp_path / "ssd", compression)
    ssd = server.store.pool.ssd
    assert ssd is not None
    last = ssd.path_for(NS, KEYS[-1])
    reads = GatedReads(ssd, last, monkeypatch)
    request = pb.GetBlocksRequest(
        namespace=namespace_to_wire(NS), keys=KEYS, max_chunk_bytes=max_chunk_bytes
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        replies = pb_grpc.KVStoreStub(channel).GetBlocks(request)
        first = await asyncio.wait_for(replies.read(), GUARD_S)
        # The last block is still unread, yet layer 0 of block 0 is here.
        assert not reads.gate.is_set()
        assert last not in reads.read_paths
        assert first.num_blocks == NUM_BLOCKS
        pieces = [(chunk.block_index, chunk.layer) for chunk in first.chunks] + [
            (run.first_block, run.layer) for run in first.runs
        ]
        assert pieces[0] == (0, 0)
        expected = data[0, 0].contiguous().view(torch.uint8).numpy().tobytes()
        sent = first.chunks[0].data if first.chunks else first.runs[0].data
        assert expected.startswith(sent[: len(expected)])
        reads.release()
        rest = []
        while (reply := await replies.read()) is not grpc.aio.EOF:
            rest.append(reply)
    assert rest
    assert last in reads.read_paths
    # The whole get, through the client: every block, every byte, still from SSD.
    async with KVClient(f"127.0.0.1:{server.port}", NS) as client:
        dest = torch.empty_like(data)
        assert await client.get_into(KEYS, dest, form=KVForm.BLOCKS) == NUM_BLOCKS
        assert torch.equal(dest.view(torch.uint8), data.view(torch.uint8))
        stats = await client.stats()
        assert stats.tier(TierKind.DRAM).num_blocks == 0


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
@pytest.mark.parametrize("compression", ["off", "lz4"])
async def test_a_block_found_unreadable_while_layer_0_streams_shortens_the_get(
    server_factory: Any, tmp_path: Path, poll: Any, data_plane: bool, compression: str
) -> None:
    ssd_dir = tmp_path / "ssd"
    server, data = await ssd_only_server(server_factory, ssd_dir, compression)
    ssd = server.store.pool.ssd
    assert ssd is not None
    damaged = ssd.path_for(NS, KEYS[3])
    raw = bytearray(damaged.read_bytes())
    raw[header_bytes(bytes(raw)) + 10] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    options = ClientOptions(data_plane=data_plane)
    async with KVClient(f"127.0.0.1:{server.port}", NS, options=options) as client:
        arrivals = [arrival async for arrival in client.iter_layers(KEYS, form=KVForm.BLOCKS)]
        # Block 0 was in before the header went out (6 declared); block 3 failed later.
        assert [arrival.layer for arrival in arrivals] == list(range(LAYOUT.num_layers))
        assert {arrival.num_blocks for arrival in arrivals} == {3}
        for arrival in arrivals:
            assert torch.equal(
                arrival.kv.view(torch.uint8), data[:3, arrival.layer].view(torch.uint8)
            )
        assert (await client.lookup_keys(KEYS)).num_matched == 3

    async def file_gone() -> bool:  # deleted on an I/O thread
        return not damaged.exists()

    await poll(file_gone)


SMALL = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=1)
SMALL_NS = Namespace(tenant="stream", model_fingerprint="small", layout=SMALL)


async def test_blocks_already_in_memory_go_out_in_one_run_per_layer(server_factory: Any) -> None:
    # Streaming layer 0 as blocks come in must not cut a get of in-memory blocks into
    # a message per block: 64 tiny blocks, 2 layers, fit one message per layer.
    running = await server_factory()
    keys = [b"small-%d" % index for index in range(64)]
    shape = (len(keys), SMALL.num_layers, *SMALL.layer_shape)
    async with KVClient(f"127.0.0.1:{running.port}", SMALL_NS) as client:
        await client.put_blocks(keys, torch.ones(shape, dtype=torch.float16), form=KVForm.BLOCKS)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.KVStoreStub(channel)
        request = pb.GetBlocksRequest(namespace=namespace_to_wire(SMALL_NS), keys=keys)
        replies = [reply async for reply in stub.GetBlocks(request)]
    assert len(replies) == SMALL.num_layers
