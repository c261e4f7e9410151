"""The frame reader's memory follows the bytes that arrived, not the announced length.

A header may announce a payload of up to the reader's limit; a peer that sends the
header and then stalls must not make the reader hold that much (issue 14, item 5).
Runs over a Unix socketpair and TCP on 127.0.0.1, as tests/wire/test_frames.py does.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import torch
from socket_pairs import Pair  # tests/socket_pairs.py

from kvstore.wire.frames import (
    FIRST_BUFFER_BYTES,
    FrameKind,
    FrameReader,
    frame_header,
    send_frame,
    send_parts,
)

MiB = 1 << 20


def random_bytes(nbytes: int, seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator).numpy().tobytes()
    )


async def consumed(reader_task: asyncio.Task[object], receiver: socket.socket) -> None:
    """Until the reader has taken every byte the kernel held for it (still mid-frame)."""
    for _ in range(10_000):  # a bounded poll, not a timed assertion
        await asyncio.sleep(0.001)
        assert not reader_task.done(), "the frame is incomplete: the read must still wait"
        try:
            receiver.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
    raise AssertionError("the reader did not take the bytes sent")


@pytest.mark.parametrize("sent_bytes", [100 << 10, 5 * MiB])
async def test_a_stalled_frame_holds_about_what_arrived_not_what_was_announced(
    pair: Pair, sent_bytes: int
) -> None:
    sender, receiver = pair
    announced = 64 * MiB
    reader = FrameReader(receiver, announced)
    reading = asyncio.create_task(reader.read())
    data = random_bytes(announced, seed=1)
    await send_parts(sender, [frame_header(FrameKind.PUT, announced), data[:sent_bytes]])
    await consumed(reading, receiver)

    # The first buffer is FIRST_BUFFER_BYTES at most; past it, at most twice what came.
    assert reader.buffer_bytes <= max(FIRST_BUFFER_BYTES, 2 * sent_bytes)
    assert reader.buffer_bytes < announced // 8

    await send_parts(sender, [data[sent_bytes:]])
    kind, payload = await reading
    assert kind == FrameKind.PUT
    assert payload == data
    assert reader.buffer_bytes == announced


async def test_a_grown_buffer_is_reused_and_frames_keep_their_bytes(pair: Pair) -> None:
    sender, receiver = pair
    reader = FrameReader(receiver, 16 * MiB)
    sizes = [3 * MiB + 7, 0, 1, 2 * MiB, 9 * MiB + 3, 4096]
    frames = [random_bytes(size, seed=size) for size in sizes]

    async def send_all() -> None:
        for payload in frames:
            await send_frame(sender, FrameKind.GET_DATA, [payload])

    sending = asyncio.create_task(send_all())
    largest = 0
    for payload in frames:
        kind, view = await reader.read()
        assert (kind, bytes(view)) == (FrameKind.GET_DATA, payload)
        largest = max(largest, len(payload))
        # Never more than the largest frame so far (or the first buffer) is kept.
        assert reader.buffer_bytes <= max(largest, FIRST_BUFFER_BYTES)
    await sending


async def test_a_view_of_an_earlier_frame_survives_growth(pair: Pair) -> None:
    sender, receiver = pair
    reader = FrameReader(receiver, 8 * MiB)
    first, second = random_bytes(512 << 10, seed=3), random_bytes(6 * MiB, seed=4)
    parts = [frame_header(FrameKind.PUT, len(first)), first]
    parts += [frame_header(FrameKind.PUT, len(second)), second]
    sending = asyncio.create_task(send_parts(sender, parts))
    _, kept = await reader.read()
    _, grown = await reader.read()
    await sending
    assert bytes(grown) == second
    assert bytes(kept) == first, "growth makes a new buffer; it never resizes a viewed one"
