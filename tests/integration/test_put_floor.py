"""The put floor (server/put_floor.py, docs/protocol.md), on both transports: a put cut
into tiny pieces or padded with empty messages is refused INVALID_ARGUMENT before the
offending message is applied; it frees what it reserved, commits nothing and harms no
stored block; kvstore's own client meets the floor whatever chunk size it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
import torch
from raw_puts import checksum, opening, raw_put  # tests/raw_puts.py

from kvstore.client import ClientOptions, DType, KVClient, KVForm, KVLayout, Namespace
from kvstore.server import RunningServer
from kvstore.server.servicer import REFUSED_PUT_READ_ON_S
from kvstore.wire.chunks import (
    MIN_PUT_PIECE_BYTES,
    PUT_CHUNKS,
    PUT_RUNS,
    chunk_parts,
    run_parts,
)

KiB = 1 << 10
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
TRANSPORTS = pytest.mark.parametrize("data_plane", [False, True], ids=["grpc", "data-plane"])
# 64 KiB layers (K half 32 KiB): larger than the 16 KiB floor.
WIDE = KVLayout(num_layers=2, num_kv_heads=8, head_dim=128, dtype=DType.FLOAT16, block_tokens=16)
WIDE_NS = Namespace(tenant="acme", model_fingerprint="floor-wide", layout=WIDE)
# 512 B layers: many blocks share one run.
NARROW = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
NARROW_NS = Namespace(tenant="acme", model_fingerprint="floor-narrow", layout=NARROW)

ServerFactory = Callable[..., Awaitable[RunningServer]]
MakeKV = Callable[..., torch.Tensor]
Poll = Callable[..., Awaitable[None]]


async def seeded(running: RunningServer, namespace: Namespace, make_kv: MakeKV) -> KVClient:
    """A client whose namespace holds a stored chain, `seed-0..3`, to check afterwards."""
    client = KVClient(f"127.0.0.1:{running.port}", namespace)
    kv = make_kv(namespace.layout, 4, form=KVForm.BLOCKS, seed=9)
    keys = [b"seed-%d" % i for i in range(4)]
    assert (await client.put_blocks(keys, kv)).num_committed == 4
    client.seeded_kv = kv  # type: ignore[attr-defined]
    return client


async def assert_unharmed(client: KVClient, poll: Poll) -> None:
    """Nothing reserved, the seeded chain served byte for byte."""

    async def freed() -> bool:
        return (await client.stats()).put_reserved_bytes == 0

    await poll(freed)
    keys = [b"seed-%d" % i for i in range(4)]
    kv = client.seeded_kv  # type: ignore[attr-defined]
    dest = torch.zeros_like(kv)
    assert await client.get_into(keys, dest, form=KVForm.BLOCKS) == 4
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))


@TRANSPORTS
async def test_a_layer_in_one_byte_chunks_is_refused(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll, data_plane: bool
) -> None:
    """64 KiB sent as 65,536 one-byte chunks in one message would cost the server
    65,536 decodes and copies: refused for its pieces, before any is applied."""
    running = await server_factory()
    async with await seeded(running, WIDE_NS, make_kv) as client:
        layer = bytes(range(256)) * (WIDE.layer_bytes // 256)
        parts: list[bytes | memoryview] = []
        for offset in range(4096):
            parts += chunk_parts(
                PUT_CHUNKS, 0, 0, offset, checksum(layer), [layer[offset : offset + 1]]
            )
        message = opening(WIDE_NS, [b"tiny"]) + b"".join(bytes(part) for part in parts)
        code, details = await raw_put(running, [message], data_plane)
        assert code == INVALID_ARGUMENT, details
        assert "4096 chunks and runs in 1 put messages carry 4096 bytes" in details
        assert "put floor" in details
        assert (await client.lookup_keys([b"tiny"])).num_matched == 0
        await assert_unharmed(client, poll)


@TRANSPORTS
async def test_a_short_chunk_in_the_middle_of_a_layer_is_refused(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll, data_plane: bool
) -> None:
    """One message per short chunk stays under the pieces-per-message rule; the chunk
    that does not end its layer (or K half) is what breaks the floor."""
    running = await server_factory()
    async with await seeded(running, WIDE_NS, make_kv) as client:
        layer = bytes(WIDE.layer_bytes)
        messages = [opening(WIDE_NS, [b"short"])]
        for offset in range(0, 8 * KiB, KiB):
            piece = [layer[offset : offset + KiB]]
            messages.append(b"".join(chunk_parts(PUT_CHUNKS, 0, 0, offset, checksum(layer), piece)))  # type: ignore[arg-type]
        code, details = await raw_put(running, messages, data_plane)
        assert code == INVALID_ARGUMENT, details
        assert "1024-byte chunk at offset 0 that does not end its layer" in details
        await assert_unharmed(client, poll)


@TRANSPORTS
async def test_empty_messages_are_refused(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll, data_plane: bool
) -> None:
    running = await server_factory()
    async with await seeded(running, WIDE_NS, make_kv) as client:
        messages = [opening(WIDE_NS, [b"padded"])] + [b""] * 1000
        code, details = await raw_put(running, messages, data_plane)
        assert code == INVALID_ARGUMENT, details
        assert "an empty put message" in details
        await assert_unharmed(client, poll)


@TRANSPORTS
async def test_short_messages_that_each_end_a_half_are_refused_past_the_budget(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll, data_plane: bool
) -> None:
    """Every piece obeys the floor (each ends a 256 B K or V half), but one message per
    half of 40 blocks' 512 B layers (320 messages for 80 KiB) runs past the budget of
    3 + layers + bytes // floor (7 here): refused at the 8th."""
    running = await server_factory()
    async with await seeded(running, NARROW_NS, make_kv) as client:
        keys = [b"many-%d" % i for i in range(40)]
        half = NARROW.layer_bytes // 2
        data = bytes(NARROW.layer_bytes)
        messages = [opening(NARROW_NS, keys)]
        for block in range(len(keys)):
            for layer in range(NARROW.num_layers):
                for start in (0, half):
                    piece = chunk_parts(
                        PUT_CHUNKS,
                        block,
                        layer,
                        start,
                        checksum(data),
                        [data[start : start + half]],
                    )
                    messages.append(b"".join(bytes(part) for part in piece))
        code, details = await raw_put(running, messages, data_plane)
        assert code == INVALID_ARGUMENT, details
        assert "8 put messages for 1792 bytes of layer data" in details
        assert "put floor" in details
        assert (await client.lookup_keys(keys)).num_matched == 0
        await assert_unharmed(client, poll)


def half_layer_messages(num_blocks: int) -> list[bytes]:
    """Put messages of one half-layer chunk each (K, then V), every layer of
    `num_blocks` NARROW blocks: short pieces that end only half a layer, which the put
    floor refuses."""
    half = NARROW.layer_bytes // 2
    data = bytes(NARROW.layer_bytes)
    return [
        b"".join(
            bytes(part)
            for part in chunk_parts(
                PUT_CHUNKS, block, layer, start, checksum(data), [data[start : start + half]]
            )
        )
        for block in range(num_blocks)
        for layer in range(NARROW.num_layers)
        for start in (0, half)
    ]


async def test_a_put_refused_mid_stream_reaches_a_grpc_aio_client_with_its_status(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll
) -> None:
    """grpc.aio's client replaces the status of a call its write finds ended with INTERNAL
    "Internal error from Core" (grpc issue 36066). The server reads a refused put's
    remaining messages briefly before it answers, so a client still writing them
    finishes its writes and gets the server's answer: 100 puts refused at their 8th of
    321 messages, each written whole and answered INVALID_ARGUMENT (one that stalled
    past the read-on may be cut, but not sooner; at least 90 get through). Without
    that read, every call ended a few messages after the refusal, and 5 of 300 such
    puts came back INTERNAL in the run that found it."""
    running = await server_factory()
    async with await seeded(running, NARROW_NS, make_kv) as client:
        halves = half_layer_messages(40)
        quick_cuts: list[float] = []  # attempts ended early without a stall to excuse it
        answered = 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            put_blocks = channel.stream_unary("/kvstore.v1.KVStore/PutBlocks")
            for attempt in range(100):
                keys = [b"late-%d-%d" % (attempt, i) for i in range(40)]
                started = time.monotonic()
                call = put_blocks(timeout=30)
                cut_short = False
                try:
                    for message in [opening(NARROW_NS, keys), *halves]:
                        if call.done():  # ended before the client was through
                            raise asyncio.InvalidStateError
                        await call.write(message)
                    await call.done_writing()
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    cut_short = True
                elapsed_s = time.monotonic() - started
                try:
                    await call
                    code = 0
                except grpc.aio.AioRpcError as error:
                    code = error.code().value[0]
                if cut_short:
                    # A client stalled past the read-on (a loaded machine) may be cut;
                    # one cut sooner means the server did not read on.
                    if elapsed_s < REFUSED_PUT_READ_ON_S:
                        quick_cuts.append(elapsed_s)
                else:
                    assert code == INVALID_ARGUMENT, code
                    answered += 1
        assert quick_cuts == []
        assert answered >= 90
        await assert_unharmed(client, poll)


async def test_a_refused_put_whose_client_writes_on_forever_is_ended_within_the_read_on(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll
) -> None:
    """The read-on of a refused gRPC put is bounded by time, not by the client: a client
    that never stops writing has its call ended within REFUSED_PUT_READ_ON_S of the
    refusal (plus slack for a loaded machine), not after everything it chooses to send."""
    running = await server_factory()
    async with await seeded(running, NARROW_NS, make_kv) as client:
        keys = [b"endless-%d" % i for i in range(40)]
        halves = half_layer_messages(40)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = channel.stream_unary("/kvstore.v1.KVStore/PutBlocks")(timeout=60)
            started = time.monotonic()
            written = 0
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(opening(NARROW_NS, keys))
                while not call.done() and time.monotonic() - started < 20:
                    await call.write(halves[written % len(halves)])  # refused at the 8th
                    written += 1
            ended_after_s = time.monotonic() - started
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call
        assert written > 7, "the put was refused before the floor's budget ran out"
        assert ended_after_s < REFUSED_PUT_READ_ON_S + 5.0, ended_after_s
        await assert_unharmed(client, poll)


@TRANSPORTS
async def test_a_short_run_that_would_commit_a_block_is_refused_before_it_does(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll, data_plane: bool
) -> None:
    """Runs of one 512 B block at a time when eight are declared: the message that
    carries block 0's every layer is refused whole, so block 0 is never committed."""
    running = await server_factory()
    async with await seeded(running, NARROW_NS, make_kv) as client:
        keys = [b"run-%d" % i for i in range(8)]
        layer = bytes(NARROW.layer_bytes)
        parts: list[bytes | memoryview] = []
        for number in range(NARROW.num_layers):
            parts += run_parts(PUT_RUNS, number, 0, [checksum(layer)], [layer])
        message = opening(NARROW_NS, keys) + b"".join(bytes(part) for part in parts)
        code, details = await raw_put(running, [message], data_plane)
        assert code == INVALID_ARGUMENT, details
        assert "does not reach the last declared block" in details
        assert (await client.lookup_keys(keys)).num_matched == 0
        await assert_unharmed(client, poll)


@TRANSPORTS
@pytest.mark.parametrize("namespace", [WIDE_NS, NARROW_NS], ids=["wide", "narrow"])
@pytest.mark.parametrize("chunk_bytes", [1, 4 * KiB, MIN_PUT_PIECE_BYTES + 1])
async def test_the_client_meets_the_floor_whatever_chunk_size_it_is_given(
    server_factory: ServerFactory,
    make_kv: MakeKV,
    data_plane: bool,
    namespace: Namespace,
    chunk_bytes: int,
) -> None:
    running = await server_factory()
    options = ClientOptions(data_plane=data_plane, chunk_bytes=chunk_bytes)
    keys = [b"client-%d" % i for i in range(24)]
    kv = make_kv(namespace.layout, len(keys), form=KVForm.BLOCKS, seed=4)
    async with KVClient(f"127.0.0.1:{running.port}", namespace, options=options) as client:
        assert (await client.put_blocks(keys, kv)).num_committed == len(keys)
        layer_keys = [b"layered-%d" % i for i in range(24)]
        async with client.layer_put(layer_keys) as put:
            for number in range(namespace.layout.num_layers):
                await put.send_layer(number, kv[:, number])
        assert put.result is not None
        assert put.result.num_committed == len(layer_keys)
        for stored in (keys, layer_keys):
            dest = torch.zeros_like(kv)
            assert await client.get_into(stored, dest, form=KVForm.BLOCKS) == len(stored)
            assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))
