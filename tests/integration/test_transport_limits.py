"""What one stream may cost the server, on both transports (kvstore.server.pacing):
idle puts and gets are cut and freed, trickled data-plane frames are cut, no transfer
outlives limits.max_transfer_s whatever deadline it asked for, and a get's chunk size
has a floor.

Each server here runs with limits of a fraction of a second; the tests wait on Stats
(polled) or on the server's answer, never on a sleep of their own past a limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
import torch
import xxhash
from raw_data_plane import Raw, frame  # tests/raw_data_plane.py

from kvstore.checksum import ChecksumKind
from kvstore.client import (
    ClientOptions,
    DeadlineExceeded,
    DType,
    KVClient,
    KVForm,
    KVLayout,
    Namespace,
    Timeouts,
    Unavailable,
)
from kvstore.server import RunningServer
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import PUT_RUNS, decode_get_message, encode_put_header, run_parts
from kvstore.wire.frames import FrameKind
from kvstore.wire.namespace import namespace_to_wire

KiB, MiB = 1 << 10, 1 << 20
LAYOUT = KVLayout(num_layers=8, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=16)
NS = Namespace(tenant="acme", model_fingerprint="limits", layout=LAYOUT)
# 4 MiB blocks of 1 MiB layers: a get of ten outlasts the sockets' buffers.
BIG = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, dtype=DType.FLOAT16, block_tokens=256)
BIG_NS = Namespace(tenant="acme", model_fingerprint="limits-big", layout=BIG)
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
TRANSPORTS = pytest.mark.parametrize("data_plane", [False, True], ids=["grpc", "data-plane"])

ServerFactory = Callable[..., Awaitable[RunningServer]]
MakeKV = Callable[..., torch.Tensor]
Poll = Callable[..., Awaitable[None]]


def client_for(running: RunningServer, data_plane: bool, namespace: Namespace = NS) -> KVClient:
    """A client whose own deadline (an hour) never fires first: the server's limits must."""
    options = ClientOptions(data_plane=data_plane, timeouts=Timeouts(transfer=3600.0))
    return KVClient(f"127.0.0.1:{running.port}", namespace, options=options)


async def dram_used(client: KVClient) -> int:
    (tier,) = [tier for tier in (await client.stats()).tiers if tier.tier == pb.DRAM]
    return int(tier.used_bytes)


def first_put_message(keys: list[bytes]) -> bytes:
    """A put's first message: the namespace and `keys` declared as a chain, no bytes."""
    return encode_put_header(
        namespace=namespace_to_wire(NS).SerializeToString(),
        checksum_kind=ChecksumKind.XXH3_64.value,
        blocks=[(key, keys[index - 1] if index else b"") for index, key in enumerate(keys)],
    )


def busy_put_message(number: int) -> bytes:
    """A put message that keeps a stream busy and holds nothing: 16 blocks whose parent
    is absent (checked, not kept), their layers in runs of 16 KiB, so that the put
    floor (docs/protocol.md) lets them through. `number` (from 0) makes the keys."""
    per_message = 16
    layers = bytes(per_message * LAYOUT.layer_bytes)
    checksums = [xxhash.xxh3_64_intdigest(bytes(LAYOUT.layer_bytes))] * per_message
    keys = [b"orphan-%d-%d" % (number, i) for i in range(per_message)]
    parts = [encode_put_header(blocks=[(key, b"absent-parent") for key in keys])]
    first = 1 + number * per_message  # after the first message's one block
    for layer in range(LAYOUT.num_layers):
        parts += run_parts(PUT_RUNS, layer, first, checksums, [layers])
    return b"".join(parts)


async def trickle(raw: Raw, data: bytes, pause_s: float = 0.02) -> None:
    """Send `data` a byte at a time, until it is all sent or the server hangs up."""
    with contextlib.suppress(OSError):
        for byte in data:
            await raw.send(bytes([byte]))
            await asyncio.sleep(pause_s)


# -- idle streams -------------------------------------------------------------------------


@TRANSPORTS
async def test_an_idle_layer_put_is_cut_and_its_reservation_freed(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll, data_plane: bool
) -> None:
    running = await server_factory(limits__stream_idle_timeout_s=0.3)
    keys = [b"idle-%d" % i for i in range(3)]
    kv = make_kv(LAYOUT, len(keys), form=KVForm.BLOCKS)
    async with client_for(running, data_plane) as client:
        used = await dram_used(client)
        abandoned = (await client.stats()).puts_abandoned

        async def freed() -> bool:
            stats = await client.stats()
            return stats.puts_abandoned == abandoned + 1 and await dram_used(client) == used

        async def stall_after_layer_zero() -> None:
            async with client.layer_put(keys) as put:
                await put.send_layer(0, kv[:, 0])

                async def reserved() -> bool:  # the put's first message has arrived
                    return await dram_used(client) > used

                await poll(reserved, timeout_s=10.0)
                await poll(freed, timeout_s=10.0)  # a prefill worker stuck on its layer
                await put.send_layer(1, kv[:, 1])

        with pytest.raises(DeadlineExceeded, match=r"limits\.stream_idle_timeout_s"):
            await stall_after_layer_zero()
        assert (await client.lookup_keys(keys)).num_matched == 0
        assert (await client.put_blocks(keys, kv)).num_committed == len(keys)


@TRANSPORTS
async def test_a_put_that_keeps_sending_is_not_cut_however_long_it_runs(
    server_factory: ServerFactory, make_kv: MakeKV, data_plane: bool
) -> None:
    """Each message resets the idle clock: a layer put whose pauses stay under the idle
    limit runs as long as it needs, here nearly twice the limit. The data-plane frame
    timeout (0.2 s) does not count the pauses between frames either."""
    running = await server_factory(limits__stream_idle_timeout_s=1.0, limits__frame_timeout_s=0.2)
    keys = [b"steady-%d" % i for i in range(2)]
    layout = KVLayout(
        num_layers=3, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=16
    )
    kv = make_kv(layout, len(keys), form=KVForm.BLOCKS, seed=1)
    namespace = Namespace(tenant="acme", model_fingerprint="steady", layout=layout)
    async with client_for(running, data_plane, namespace) as client:
        async with client.layer_put(keys) as put:
            for layer in range(layout.num_layers):
                await asyncio.sleep(0.6)  # a forward pass's layer
                await put.send_layer(layer, kv[:, layer])
        assert put.result is not None
        assert put.result.num_committed == len(keys)


@TRANSPORTS
async def test_a_get_whose_client_stops_reading_is_cut_and_unpinned(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll, data_plane: bool
) -> None:
    running = await server_factory(store__dram_bytes=96 * MiB, limits__stream_idle_timeout_s=0.3)
    keys = [b"unread-%d" % i for i in range(10)]  # 40 MiB: more than the sockets buffer
    kv = make_kv(BIG, len(keys), form=KVForm.BLOCKS, seed=2)
    async with client_for(running, data_plane, BIG_NS) as client:
        assert (await client.put_blocks(keys, kv)).num_committed == len(keys)
        layers = client.iter_layers(keys)
        try:
            assert (await anext(layers)).layer == 0
            # The decode worker stalls: it takes nothing more.

            async def unpinned() -> bool:
                return (await client.stats()).num_pinned == 0

            await poll(unpinned, timeout_s=10.0)
            if data_plane:
                # Cut mid-frame (the server was blocked writing one): no frame boundary
                # is left for an ERROR, so the connection just closes.
                expected: tuple[type[Exception], ...] = (Unavailable, DeadlineExceeded)
            else:
                expected = (DeadlineExceeded,)
            with pytest.raises(expected) as raised:
                async for _ in layers:
                    pass
            if isinstance(raised.value, DeadlineExceeded):
                assert "limits.stream_idle_timeout_s" in raised.value.details
        finally:
            await layers.aclose()
        dest = torch.zeros_like(kv)
        assert await client.get_into(keys, dest, form=KVForm.BLOCKS) == len(keys)
        assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))


# -- the server's cap on deadlines ------------------------------------------------------------


async def test_a_grpc_put_with_no_deadline_ends_at_max_transfer_s(
    server_factory: ServerFactory, poll: Poll
) -> None:
    running = await server_factory(limits__max_transfer_s=0.5)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
        client_for(running, False) as client,
    ):
        used = await dram_used(client)
        put_blocks = channel.stream_unary(
            "/kvstore.v1.KVStore/PutBlocks", response_deserializer=pb.PutBlocksResponse.FromString
        )
        call = put_blocks()  # no timeout: it would run forever
        await call.write(first_put_message([b"forever"]))

        # Busy for its first 0.2 s (a message every 20 ms), then waiting on its reply:
        # the idle limit (30 s) is far off, so only max_transfer_s can end it. No write
        # races the server's ending: grpc.aio can lose the server's status to a write
        # that fails as it arrives ("Internal error from Core").
        for number in range(10):
            await call.write(busy_put_message(number))
            await asyncio.sleep(0.02)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async with asyncio.timeout(10):
                await call
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        details = raised.value.details() or ""
        assert "limits.max_transfer_s" in details
        assert "0.5 s" in details

        async def freed() -> bool:
            return await dram_used(client) == used

        await poll(freed)


async def test_a_data_plane_deadline_of_49_days_is_capped_at_max_transfer_s(
    server_factory: ServerFactory, poll: Poll
) -> None:
    running = await server_factory(limits__max_transfer_s=0.5)
    async with client_for(running, True) as client:
        used = await dram_used(client)
        raw = await Raw.open(running)
        try:
            await raw.send(
                frame(FrameKind.DEADLINE, struct.pack("<I", 0xFFFFFFFF))
                + frame(FrameKind.PUT, first_put_message([b"forever"]))
            )

            async def keep_sending() -> None:
                with contextlib.suppress(OSError):
                    for number in range(500):  # a PUT every 20 ms, for up to 10 s
                        await raw.send(frame(FrameKind.PUT, busy_put_message(number)))
                        await asyncio.sleep(0.02)

            sending = asyncio.create_task(keep_sending())
            code, message = await raw.read_error()
            sending.cancel()
            assert code == DEADLINE_EXCEEDED, message
            assert "limits.max_transfer_s" in message
            assert "0.5 s" in message
        finally:
            raw.close()

        async def freed() -> bool:
            return await dram_used(client) == used

        await poll(freed)


# -- slow senders -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["first-frame", "later-frame", "header"])
async def test_a_trickled_data_plane_frame_is_cut(
    server_factory: ServerFactory, poll: Poll, where: str
) -> None:
    """A frame that began to arrive must arrive whole within limits.frame_timeout_s; at
    a byte every 20 ms it would take minutes. The idle limit (60 s) is not what cuts it."""
    running = await server_factory(limits__frame_timeout_s=0.3, limits__stream_idle_timeout_s=60.0)
    async with client_for(running, True) as client:
        used = await dram_used(client)
        raw = await Raw.open(running)
        try:
            body = frame(FrameKind.PUT, first_put_message([b"slow"]) + bytes(4000))
            if where == "first-frame":
                await raw.send(body[:10])
                rest = body[10:]
            elif where == "later-frame":
                await raw.send(frame(FrameKind.PUT, first_put_message([b"slow"])) + body[:10])
                rest = body[10:]
            else:
                await raw.send(frame(FrameKind.PUT, first_put_message([b"slow"])))
                rest = body
            sending = asyncio.create_task(trickle(raw, rest))
            code, message = await raw.read_error()
            sending.cancel()
            assert code == DEADLINE_EXCEEDED, message
            assert "limits.frame_timeout_s" in message
        finally:
            raw.close()

        async def freed() -> bool:
            return await dram_used(client) == used

        await poll(freed)


# -- the chunk floor ----------------------------------------------------------------------------


CHUNKED = KVLayout(num_layers=2, num_kv_heads=8, head_dim=128, dtype=DType.FLOAT16, block_tokens=16)
CHUNKED_NS = Namespace(tenant="acme", model_fingerprint="chunked", layout=CHUNKED)


@TRANSPORTS
async def test_a_tiny_max_chunk_bytes_is_raised_to_64KiB(
    server_factory: ServerFactory, make_kv: MakeKV, data_plane: bool
) -> None:
    """4 blocks of 128 KiB with max_chunk_bytes=2 once took 65,536 messages; at the floor
    they take 8 of 64 KiB."""
    running = await server_factory()
    keys = [b"chunk-%d" % i for i in range(4)]
    kv = make_kv(CHUNKED, len(keys), form=KVForm.BLOCKS, seed=3)
    assert CHUNKED.block_bytes == 128 * KiB
    async with client_for(running, data_plane, CHUNKED_NS) as client:
        assert (await client.put_blocks(keys, kv)).num_committed == len(keys)
    request = pb.GetBlocksRequest(
        namespace=namespace_to_wire(CHUNKED_NS), keys=keys, max_chunk_bytes=2
    )
    payloads = [payload async for payload in get_payloads(running, request, data_plane)]
    assert len(payloads) == 8
    received: dict[tuple[int, int], bytearray] = {}
    for payload in payloads:
        message = decode_get_message(payload)
        assert sum(len(chunk.data) for chunk in message.chunks) == 64 * KiB
        for chunk in message.chunks:
            received.setdefault((chunk.block_index, chunk.layer), bytearray()).extend(chunk.data)
    for (block, layer), data in received.items():
        assert bytes(data) == kv[block, layer].contiguous().view(torch.uint8).numpy().tobytes()


async def get_payloads(
    running: RunningServer, request: pb.GetBlocksRequest, data_plane: bool
) -> AsyncIterator[bytes]:
    """The GetBlocksResponse payloads of a raw get, over gRPC or the data plane."""
    if data_plane:
        raw = await Raw.open(running)
        try:
            await raw.send(frame(FrameKind.GET, request.SerializeToString()))
            while (received := await raw.read_frame())[0] != FrameKind.GET_END:
                assert received[0] == FrameKind.GET_DATA
                yield received[1]
        finally:
            raw.close()
        return
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        get_blocks = channel.unary_stream(
            "/kvstore.v1.KVStore/GetBlocks",
            request_serializer=pb.GetBlocksRequest.SerializeToString,
        )
        async for payload in get_blocks(request, timeout=30):
            yield payload
