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
from kvstore.tiers.blockfile import decode_header, header_bytes, stored_layer_bytes
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


class HeldRest:
    """Holds the rest of one block file's read, after its layer 0 was read and handed
    on, until `release`; `done` is set once that read returns."""

    def __init__(self, ssd: SsdTier, held: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = threading.Event()
        self.done = threading.Event()
        original = ssd.read_block

        def read_block(location: SsdLocation, *args: Any) -> Any:
            if location.path != held:
                return original(location, *args)
            on_first_layer = args[0] if args else None

            def first_layer_then_wait(header: Any, layer: memoryview) -> None:
                if on_first_layer is not None:
                    on_first_layer(header, layer)
                assert self.gate.wait(GUARD_S), "the held read was never released"

            try:
                return original(location, first_layer_then_wait, *args[1:])
            finally:
                self.done.set()

        monkeypatch.setattr(ssd, "read_block", read_block)

    def release(self) -> None:
        self.gate.set()


def layer_bytes_of(data: torch.Tensor, block: int, layer: int) -> bytes:
    return data[block, layer].contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("compression", ["off", "lz4"])
@pytest.mark.parametrize("max_chunk_bytes", [4 * KiB, 256 * KiB], ids=["chunks", "runs"])
async def test_layer_0_of_a_cold_block_goes_out_before_the_rest_of_its_file_is_read(
    server_factory: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    compression: str,
    max_chunk_bytes: int,
) -> None:
    server, data = await ssd_only_server(server_factory, tmp_path / "ssd", compression)
    ssd = server.store.pool.ssd
    assert ssd is not None
    held = HeldRest(ssd, ssd.path_for(NS, KEYS[0]), monkeypatch)
    request = pb.GetBlocksRequest(
        namespace=namespace_to_wire(NS), keys=KEYS, max_chunk_bytes=max_chunk_bytes
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        replies = pb_grpc.KVStoreStub(channel).GetBlocks(request)
        first = await asyncio.wait_for(replies.read(), GUARD_S)
        # Block 0's read is held after its layer 0: the rest of its file is unread.
        assert not held.done.is_set()
        assert first.num_blocks == NUM_BLOCKS
        if first.chunks:
            chunks = [chunk for chunk in first.chunks if (chunk.block_index, chunk.layer) == (0, 0)]
            sent = b"".join(chunk.data for chunk in chunks)
            assert sent
            assert layer_bytes_of(data, 0, 0).startswith(sent)
        else:
            run = first.runs[0]
            assert (run.first_block, run.layer) == (0, 0)
            assert run.data[: LAYOUT.layer_bytes] == layer_bytes_of(data, 0, 0)
        held.release()
        rest = []
        while (reply := await replies.read()) is not grpc.aio.EOF:
            rest.append(reply)
    assert held.done.is_set()
    assert rest
    async with KVClient(f"127.0.0.1:{server.port}", NS) as client:
        dest = torch.empty_like(data)
        assert await client.get_into(KEYS, dest, form=KVForm.BLOCKS) == NUM_BLOCKS
        assert torch.equal(dest.view(torch.uint8), data.view(torch.uint8))


def damage_layer(ssd: SsdTier, key: bytes, layer: int) -> Path:
    """Flip a byte inside layer `layer`'s stored bytes of the block's file."""
    path = ssd.path_for(NS, key)
    raw = bytearray(path.read_bytes())
    header, payload_offset = decode_header(bytes(raw[: header_bytes(bytes(raw))]))
    start = payload_offset + sum(stored_layer_bytes(header, index) for index in range(layer))
    raw[start + stored_layer_bytes(header, layer) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("compression", ["off", "lz4"])
@pytest.mark.parametrize("max_chunk_bytes", [4 * KiB, 256 * KiB], ids=["chunks", "runs"])
async def test_a_block_whose_later_layer_fails_after_its_layer_0_went_out_is_never_counted(
    server_factory: Any, tmp_path: Path, poll: Any, compression: str, max_chunk_bytes: int
) -> None:
    server, data = await ssd_only_server(server_factory, tmp_path / "ssd", compression)
    ssd = server.store.pool.ssd
    assert ssd is not None
    damaged = damage_layer(ssd, KEYS[3], LAYOUT.num_layers - 1)
    request = pb.GetBlocksRequest(
        namespace=namespace_to_wire(NS), keys=KEYS, max_chunk_bytes=max_chunk_bytes
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        replies = [reply async for reply in pb_grpc.KVStoreStub(channel).GetBlocks(request)]
    # Layer 0 of block 3 went out (verified), then its last layer failed: the get is
    # shortened to 3 blocks before any byte of layer 1.
    sent = [(chunk.block_index, chunk.layer) for reply in replies for chunk in reply.chunks]
    sent += [
        (block, run.layer)
        for reply in replies
        for run in reply.runs
        for block in range(run.first_block, run.first_block + len(run.layer_checksums))
    ]
    assert (3, 0) in sent
    shortened = next(index for index, reply in enumerate(replies) if reply.num_blocks == 3)
    assert all(layer == 0 for reply in replies[:shortened] for _, layer in _pieces(reply))
    assert all(block < 3 for reply in replies[shortened:] for block, _ in _pieces(reply))

    async def file_gone() -> bool:  # deleted on an I/O thread
        return not damaged.exists()

    await poll(file_gone)
    for data_plane in (True, False):
        async with KVClient(
            f"127.0.0.1:{server.port}", NS, options=ClientOptions(data_plane=data_plane)
        ) as client:
            dest = torch.zeros_like(data)
            assert await client.get_into(KEYS, dest, form=KVForm.BLOCKS) == 3
            assert torch.equal(dest[:3].view(torch.uint8), data[:3].view(torch.uint8))
            assert (await client.lookup_keys(KEYS)).num_matched == 3


def _pieces(reply: pb.GetBlocksResponse) -> list[tuple[int, int]]:
    pieces = [(chunk.block_index, chunk.layer) for chunk in reply.chunks]
    pieces += [
        (block, run.layer)
        for run in reply.runs
        for block in range(run.first_block, run.first_block + len(run.layer_checksums))
    ]
    return pieces


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
@pytest.mark.parametrize("compression", ["off", "lz4"])
async def test_a_later_layer_failing_mid_get_through_the_client(
    server_factory: Any, tmp_path: Path, poll: Any, data_plane: bool, compression: str
) -> None:
    """The client counts only whole blocks: iter_layers yields each layer of the 3 whole
    blocks, get_into counts 3, though layer 0 of block 3 arrived."""
    server, data = await ssd_only_server(server_factory, tmp_path / "ssd", compression)
    ssd = server.store.pool.ssd
    assert ssd is not None
    damaged = damage_layer(ssd, KEYS[3], 1)
    options = ClientOptions(data_plane=data_plane)
    async with KVClient(f"127.0.0.1:{server.port}", NS, options=options) as client:
        arrivals = [arrival async for arrival in client.iter_layers(KEYS, form=KVForm.BLOCKS)]
        assert [arrival.layer for arrival in arrivals] == list(range(LAYOUT.num_layers))
        assert {arrival.num_blocks for arrival in arrivals} == {3}
        for arrival in arrivals:
            assert torch.equal(
                arrival.kv.view(torch.uint8), data[:3, arrival.layer].view(torch.uint8)
            )

        async def file_gone() -> bool:
            return not damaged.exists()

        await poll(file_gone)
        # The server keeps serving: the same get now stops before the dropped block.
        dest = torch.zeros_like(data)
        assert await client.get_into(KEYS, dest, form=KVForm.BLOCKS) == 3
        assert torch.equal(dest[:3].view(torch.uint8), data[:3].view(torch.uint8))


@pytest.mark.parametrize("compression", ["off", "lz4"])
async def test_a_first_block_failing_after_its_layer_0_went_out_ends_the_get_with_no_block(
    server_factory: Any, tmp_path: Path, compression: str
) -> None:
    """On the wire: layer 0 of the first block went out, then the stream says the get
    serves none (`served_none`), before any byte of layer 1, and ends without an error."""
    server, _ = await ssd_only_server(server_factory, tmp_path / "ssd", compression)
    ssd = server.store.pool.ssd
    assert ssd is not None
    damage_layer(ssd, KEYS[0], 2)
    request = pb.GetBlocksRequest(namespace=namespace_to_wire(NS), keys=KEYS)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        replies = [reply async for reply in pb_grpc.KVStoreStub(channel).GetBlocks(request)]
    assert replies[0].num_blocks == len(KEYS)
    assert (0, 0) in [piece for reply in replies for piece in _pieces(reply)]
    last = next(index for index, reply in enumerate(replies) if reply.served_none)
    assert last == len(replies) - 1
    assert all(layer == 0 for reply in replies for _, layer in _pieces(reply))
    assert _pieces(replies[last]) == []


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
@pytest.mark.parametrize("compression", ["off", "lz4"])
@pytest.mark.parametrize("api", ["get_into", "iter_layers"])
async def test_a_first_block_failing_after_its_layer_0_went_out_is_a_miss(
    server_factory: Any, tmp_path: Path, poll: Any, data_plane: bool, compression: str, api: str
) -> None:
    """The client uses none of what arrived: get_into counts 0 (rows past the count
    hold nothing the caller may use), iter_layers yields nothing; the block is dropped,
    and the next get misses it."""
    server, data = await ssd_only_server(server_factory, tmp_path / "ssd", compression)
    ssd = server.store.pool.ssd
    assert ssd is not None
    damaged = damage_layer(ssd, KEYS[0], 2)
    options = ClientOptions(data_plane=data_plane)
    async with KVClient(f"127.0.0.1:{server.port}", NS, options=options) as client:
        if api == "get_into":
            assert await client.get_into(KEYS, torch.zeros_like(data), form=KVForm.BLOCKS) == 0
        else:
            assert [a async for a in client.iter_layers(KEYS, form=KVForm.BLOCKS)] == []

        async def file_gone() -> bool:
            return not damaged.exists()

        await poll(file_gone)
        assert (await client.lookup_keys(KEYS)).num_matched == 0
        assert [arrival async for arrival in client.iter_layers(KEYS, form=KVForm.BLOCKS)] == []


SMALL = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=1)
SMALL_NS = Namespace(tenant="stream", model_fingerprint="small", layout=SMALL)


async def test_blocks_already_in_memory_go_out_in_as_few_messages_as_fit(
    server_factory: Any,
) -> None:
    # Streaming layer 0 as blocks come in must not cut a get of in-memory blocks into
    # a message per block, nor into a message per layer: 64 tiny blocks, 2 layers, fit
    # one message, a run per layer.
    running = await server_factory()
    keys = [b"small-%d" % index for index in range(64)]
    shape = (len(keys), SMALL.num_layers, *SMALL.layer_shape)
    async with KVClient(f"127.0.0.1:{running.port}", SMALL_NS) as client:
        await client.put_blocks(keys, torch.ones(shape, dtype=torch.float16), form=KVForm.BLOCKS)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.KVStoreStub(channel)
        request = pb.GetBlocksRequest(namespace=namespace_to_wire(SMALL_NS), keys=keys)
        replies = [reply async for reply in stub.GetBlocks(request)]
    (reply,) = replies
    assert [(run.layer, len(run.layer_checksums)) for run in reply.runs] == [
        (layer, len(keys)) for layer in range(SMALL.num_layers)
    ]
