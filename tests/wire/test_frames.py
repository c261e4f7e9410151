"""The data plane's framing (kvstore.wire.frames) over real non-blocking socket pairs.

Each test runs over a Unix socketpair and over a TCP connection on 127.0.0.1, inside
the test's event loop: the sender and the reader are tasks of that loop.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import struct

import pytest
import torch
from socket_pairs import Pair, counting, tcp_pair  # tests/socket_pairs.py

from kvstore.wire.errors import WireError
from kvstore.wire.frames import (
    HEADER,
    HELLO_PAYLOAD,
    TAIL_PREFIX,
    ConnectionClosed,
    FrameKind,
    FrameReader,
    FrameTooLarge,
    decode_deadline,
    decode_error,
    encode_deadline,
    encode_error,
    frame_header,
    send_frame,
    send_frames,
    send_parts,
    tune_socket,
)

MiB = 1 << 20


def tensor_bytes(nbytes: int, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)


async def recv_exactly(sock: socket.socket, count: int) -> bytes:
    loop = asyncio.get_running_loop()
    received = bytearray()
    while len(received) < count:
        chunk = await loop.sock_recv(sock, count - len(received))
        assert chunk, f"the peer closed after {len(received)} of {count} bytes"
        received += chunk
    return bytes(received)


# -- the wire format ---------------------------------------------------------------------------


def test_wire_constants_are_the_documented_protocol() -> None:
    assert HEADER.size == 5
    assert frame_header(FrameKind.PUT, 0x01020304) == b"\x02\x04\x03\x02\x01"
    assert HELLO_PAYLOAD == b"KVDP\x04\x00"
    assert {kind.name: kind.value for kind in FrameKind} == {
        "HELLO": 1,
        "PUT": 2,
        "PUT_END": 3,
        "PUT_DONE": 4,
        "GET": 5,
        "GET_DATA": 6,
        "GET_END": 7,
        "ERROR": 8,
        "DEADLINE": 9,
        "REGISTER": 10,
        "REGISTERED": 11,
        "PUT_SHM": 12,
        "GET_SHM": 13,
        "GET_DATA_SHM": 14,
        "SHM_DONE": 15,
        "LOOKUP": 16,
        "LOOKUP_RESULT": 17,
        "PUT_TAIL": 18,
    }


async def test_send_frame_writes_header_then_parts_back_to_back(pair: Pair) -> None:
    sender, receiver = pair
    parts: list[bytes | memoryview] = [b"head", memoryview(b""), memoryview(bytearray(b"tail"))]
    await send_frame(sender, FrameKind.GET_DATA, parts)
    await send_frame(sender, FrameKind.GET_END)
    wire = await recv_exactly(receiver, 5 + 8 + 5)
    assert wire == b"\x06" + struct.pack("<I", 8) + b"headtail" + b"\x07\x00\x00\x00\x00"


async def test_send_frames_sends_several_frames_in_one_call(pair: Pair) -> None:
    sender, receiver = pair
    sender = counting(sender)
    try:
        frames = [
            (FrameKind.DEADLINE, [encode_deadline(2.5)]),
            (FrameKind.GET, [b"req", memoryview(bytearray(b"uest"))]),
        ]
        await send_frames(sender, frames)
        assert sender.sendmsg_calls == 1, "both frames wake the peer once"
        reader = FrameReader(receiver, MiB)
        kind, payload = await reader.read()
        assert (kind, decode_deadline(payload)) == (FrameKind.DEADLINE, 2.5)
        kind, payload = await reader.read()
        assert (kind, bytes(payload)) == (FrameKind.GET, b"request")
    finally:
        sender.close()


# -- round trips -------------------------------------------------------------------------------


async def test_frames_round_trip_with_tensor_views(pair: Pair) -> None:
    sender, receiver = pair
    data = tensor_bytes(10_000, seed=1)
    other = tensor_bytes(3000, seed=2)
    parts: list[bytes | memoryview] = [
        b"prefix",
        data.numpy().data[:4000],
        memoryview(b""),
        data.numpy().data[4000:],
        memoryview(bytearray(b"middle")),
        other.numpy().data,
        b"suffix",
    ]
    expected = b"prefix" + data.numpy().tobytes() + b"middle" + other.numpy().tobytes() + b"suffix"
    reader = FrameReader(receiver, 1 * MiB)

    # Three frames written before any is read come back in order, each whole.
    await send_frame(sender, FrameKind.PUT, parts)
    await send_frame(sender, FrameKind.PUT_END)
    await send_frame(sender, FrameKind.HELLO, [HELLO_PAYLOAD])

    kind, payload = await reader.read()
    assert kind == FrameKind.PUT
    assert isinstance(payload, memoryview)
    assert len(payload) == len(expected)
    assert bytes(payload) == expected
    assert await reader.read() == (FrameKind.PUT_END, memoryview(b""))
    kind, payload = await reader.read()
    assert (kind, bytes(payload)) == (FrameKind.HELLO, HELLO_PAYLOAD)


async def test_views_that_are_not_flat_bytes_are_framed_by_their_byte_size(pair: Pair) -> None:
    sender, receiver = pair
    grid = tensor_bytes(64 * 32, seed=5).reshape(64, 32)  # a 2-D view
    halves = torch.arange(100, dtype=torch.float16)  # format "e"
    parts: list[bytes | memoryview] = [grid.numpy().data, halves.numpy().data]
    await send_frame(sender, FrameKind.PUT, parts)
    await send_frame(sender, FrameKind.PUT_END)
    reader = FrameReader(receiver, 1 * MiB)
    kind, payload = await asyncio.wait_for(reader.read(), timeout=5)
    assert (kind, len(payload)) == (FrameKind.PUT, 64 * 32 + 200)
    assert bytes(payload) == grid.numpy().tobytes() + halves.numpy().tobytes()
    assert (await asyncio.wait_for(reader.read(), timeout=5))[0] == FrameKind.PUT_END


async def test_reader_returns_kinds_it_does_not_know(pair: Pair) -> None:
    sender, receiver = pair
    await send_parts(sender, [struct.pack("<BI", 200, 3), b"abc"])
    kind, payload = await FrameReader(receiver, 100).read()
    assert (kind, bytes(payload)) == (200, b"abc")


async def test_an_earlier_payload_survives_a_larger_frame(pair: Pair) -> None:
    """The reader grows its buffer by replacing it, so an earlier view is not clobbered."""
    sender, receiver = pair
    reader = FrameReader(receiver, 1 * MiB)
    await send_frame(sender, FrameKind.GET_DATA, [b"small"])
    await send_frame(sender, FrameKind.GET_DATA, [b"x" * 100_000])
    _, first = await reader.read()
    _, second = await reader.read()
    assert bytes(first) == b"small"
    assert bytes(second) == b"x" * 100_000


async def test_more_than_1024_parts_arrive_in_order(pair: Pair) -> None:
    sender, receiver = pair
    rng = random.Random(7)
    source = tensor_bytes(200_000, seed=3).numpy()
    parts: list[bytes | memoryview] = []
    position = 0
    for index in range(3000):
        size = rng.choice([0, 1, 2, 17, 64])
        if index % 2:
            parts.append(source.data[position : position + size])
        else:
            parts.append(bytes(source[position : position + size]))
        position += size
    expected = source[:position].tobytes()
    assert sum(1 for part in parts if len(part)) > 2 * 1024

    reader = FrameReader(receiver, 1 * MiB)
    sending = asyncio.create_task(send_frame(sender, FrameKind.PUT, parts))
    kind, payload = await asyncio.wait_for(reader.read(), timeout=10)
    await asyncio.wait_for(sending, timeout=10)
    assert kind == FrameKind.PUT
    assert bytes(payload) == expected


async def test_a_payload_far_larger_than_the_socket_buffers_arrives_intact(pair: Pair) -> None:
    sender, receiver = pair
    # 16 KiB (the kernel doubles it): far below 8 MiB, and not so small that TCP on
    # loopback crawls through delayed ACKs.
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
    data = tensor_bytes(8 * MiB, seed=4)
    view = data.numpy().data
    # Parts larger and smaller than the buffers, so sends stop inside a part.
    cuts = [0, 1, 5000, 5001, 3 * MiB, 3 * MiB + 123, 8 * MiB]
    parts: list[bytes | memoryview] = [view[a:b] for a, b in itertools.pairwise(cuts)]

    sending = asyncio.create_task(send_frame(sender, FrameKind.GET_DATA, parts))
    await asyncio.sleep(0.05)
    assert not sending.done(), "8 MiB cannot fit in the buffers: the sender must wait"
    reader = FrameReader(receiver, 16 * MiB)
    kind, payload = await asyncio.wait_for(reader.read(), timeout=30)
    await asyncio.wait_for(sending, timeout=10)
    assert kind == FrameKind.GET_DATA
    assert len(payload) == 8 * MiB
    assert torch.equal(torch.frombuffer(payload, dtype=torch.uint8), data)


# -- PUT_TAIL: a frame whose tail is read where the caller says -------------------------------


def tail_frame(before: bytes, tail: bytes | memoryview) -> list[bytes | memoryview]:
    return [TAIL_PREFIX.pack(len(before)), before, tail]


async def test_a_tail_lands_in_scattered_views_exactly(pair: Pair) -> None:
    """The frame's tail goes into the caller's views, in order, each filled exactly;
    nothing before or after them is touched, and the next frame reads as usual."""
    sender, receiver = pair
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
    tail = tensor_bytes(3 * MiB + 5, seed=11)
    reader = FrameReader(receiver, 8 * MiB)
    sending = asyncio.create_task(
        send_frame(sender, FrameKind.PUT_TAIL, tail_frame(b"head", tail.numpy().data))
    )
    kind, before = await asyncio.wait_for(reader.read(), timeout=10)
    assert (kind, bytes(before), reader.tail_bytes) == (FrameKind.PUT_TAIL, b"head", len(tail))
    # Thousands of views of uneven sizes inside one larger buffer, with gaps between them.
    sizes = [1, 4096, 17, 300, 0, 999]
    cuts, position = [], 0
    while position < len(tail):
        size = min(sizes[len(cuts) % len(sizes)], len(tail) - position)
        cuts.append(size)
        position += size
    landing = bytearray(b"\xee" * (len(tail) + 8 * len(cuts)))
    views, offset = [], 0
    for size in cuts:
        views.append(memoryview(landing)[offset + 4 : offset + 4 + size])
        offset += size + 8
    assert len(views) > 1024  # more than one scatter call's worth
    await asyncio.wait_for(reader.read_tail_into(views), timeout=30)
    await asyncio.wait_for(sending, timeout=10)
    assert b"".join(bytes(view) for view in views) == tail.numpy().tobytes()
    offset = 0
    for size in cuts:  # the gaps are as they were
        assert landing[offset : offset + 4] == b"\xee" * 4
        assert landing[offset + 4 + size : offset + 8 + size] == b"\xee" * 4
        offset += size + 8
    await send_frame(sender, FrameKind.PUT_END)
    assert await asyncio.wait_for(reader.read(), timeout=10) == (FrameKind.PUT_END, b"")


async def test_a_tail_may_be_read_into_the_readers_own_buffer(pair: Pair) -> None:
    sender, receiver = pair
    reader = FrameReader(receiver, 4 * MiB)
    first = tensor_bytes(2 * MiB, seed=12).numpy().tobytes()

    async def send_all() -> None:
        for before, tail in ((b"", b"x"), (b"ab", first), (b"c", b"yz")):
            await send_frame(sender, FrameKind.PUT_TAIL, tail_frame(before, tail))

    sending = asyncio.create_task(send_all())
    assert bytes((await asyncio.wait_for(reader.read(), timeout=10))[1]) == b""
    assert bytes(await reader.read_tail()) == b"x"
    assert bytes((await reader.read())[1]) == b"ab"
    assert bytes(await asyncio.wait_for(reader.read_tail(), timeout=10)) == first
    assert bytes((await reader.read())[1]) == b"c"
    assert bytes(await reader.read_tail()) == b"yz"
    await asyncio.wait_for(sending, timeout=10)


async def test_the_next_frame_waits_for_the_tail_to_be_taken(pair: Pair) -> None:
    sender, receiver = pair
    reader = FrameReader(receiver, 1 * MiB)
    await send_frame(sender, FrameKind.PUT_TAIL, tail_frame(b"a", b"bc"))
    await reader.read()
    with pytest.raises(RuntimeError, match="tail was not read"):
        await reader.read()
    with pytest.raises(ValueError, match="3 bytes asked of a tail with 2 left"):
        await reader.read_tail_into([memoryview(bytearray(3))])
    with pytest.raises(ValueError, match="0 bytes asked"):
        await reader.read_tail_into([])


async def test_a_tail_may_be_read_in_parts_each_awaited_first(pair: Pair) -> None:
    sender, receiver = pair
    reader = FrameReader(receiver, 1 * MiB)
    tail = tensor_bytes(300_000, seed=13).numpy().tobytes()
    sending = asyncio.create_task(send_frame(sender, FrameKind.PUT_TAIL, tail_frame(b"head", tail)))
    assert bytes((await asyncio.wait_for(reader.read(), timeout=10))[1]) == b"head"
    parts = []
    for size in (1, 2, 100_000, 77, 199_920):
        await asyncio.wait_for(reader.await_tail(), timeout=10)
        await reader.await_tail()  # idempotent: the byte read ahead is kept once
        if size % 2:  # into views of the caller's, or the reader's own buffer
            landing = [memoryview(bytearray(size - size // 2)), memoryview(bytearray(size // 2))]
            await asyncio.wait_for(reader.read_tail_into(landing), timeout=10)
            parts.append(b"".join(bytes(view) for view in landing))
        else:
            parts.append(bytes(await asyncio.wait_for(reader.read_tail(size), timeout=10)))
    assert reader.tail_bytes == 0
    assert b"".join(parts) == tail
    await asyncio.wait_for(sending, timeout=10)
    await send_frame(sender, FrameKind.PUT_END)
    assert await asyncio.wait_for(reader.read(), timeout=10) == (FrameKind.PUT_END, b"")


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"\x01\x00\x00", "too short"),
        (TAIL_PREFIX.pack(5) + b"abcd", "says 5 of them come before its tail"),
        (TAIL_PREFIX.pack(2**32 - 1), "before its tail"),
        (TAIL_PREFIX.pack(3) + b"abc", "with no tail"),
    ],
)
async def test_a_tail_frame_that_contradicts_itself_is_a_wire_error(
    pair: Pair, payload: bytes, fragment: str
) -> None:
    sender, receiver = pair
    await send_frame(sender, FrameKind.PUT_TAIL, [payload])
    with pytest.raises(WireError, match=fragment):
        await FrameReader(receiver, 1 * MiB).read()


# -- limits and broken connections -------------------------------------------------------------


async def test_a_frame_over_the_limit_is_refused_before_its_payload_is_read(pair: Pair) -> None:
    sender, receiver = pair
    reader = FrameReader(receiver, 100)
    await send_frame(sender, FrameKind.PUT, [b"a" * 100])  # exactly the limit: fine
    kind, payload = await reader.read()
    assert (kind, bytes(payload)) == (FrameKind.PUT, b"a" * 100)

    await send_frame(sender, FrameKind.GET, [b"b" * 101])
    with pytest.raises(FrameTooLarge, match="101-byte frame") as raised:
        await reader.read()
    assert raised.value.kind == FrameKind.GET
    assert "100-byte limit" in str(raised.value)
    # The payload is still in the socket, unread.
    assert await recv_exactly(receiver, 101) == b"b" * 101


async def test_a_read_may_set_a_tighter_limit_than_the_reader(pair: Pair) -> None:
    sender, receiver = pair
    reader = FrameReader(receiver, 1 * MiB)
    await send_frame(sender, FrameKind.HELLO, [b"c" * 7])
    with pytest.raises(FrameTooLarge, match="6-byte limit"):
        await reader.read(limit=6)
    assert await recv_exactly(receiver, 7) == b"c" * 7  # unread, and no buffer made
    await send_frame(sender, FrameKind.HELLO, [b"d" * 6])
    kind, payload = await reader.read(limit=6)
    assert (kind, bytes(payload)) == (FrameKind.HELLO, b"d" * 6)


def test_deadline_payloads_round_trip_in_whole_milliseconds() -> None:
    assert decode_deadline(encode_deadline(1.5)) == 1.5
    assert decode_deadline(encode_deadline(0.0001)) == 0.001  # at least 1 ms
    assert decode_deadline(encode_deadline(1e12)) == 0xFFFFFFFF / 1000  # capped at u32
    with pytest.raises(ValueError, match="4 bytes"):
        decode_deadline(b"\x01\x02")


async def test_a_huge_announced_length_allocates_nothing(pair: Pair) -> None:
    sender, receiver = pair
    await send_parts(sender, [struct.pack("<BI", FrameKind.PUT, 0xFFFFFFFF)])
    with pytest.raises(FrameTooLarge):
        await FrameReader(receiver, 2 * MiB).read()


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="before-a-frame"),
        pytest.param(b"\x02\x64", id="inside-the-header"),
        pytest.param(b"\x02\x64\x00\x00\x00" + b"x" * 10, id="inside-the-payload"),
    ],
)
async def test_a_peer_that_closes_mid_frame_is_connection_closed(pair: Pair, sent: bytes) -> None:
    sender, receiver = pair
    reader = FrameReader(receiver, 1000)
    await send_parts(sender, [sent])
    sender.close()
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(reader.read(), timeout=5)
    assert issubclass(ConnectionClosed, ConnectionError)


async def test_sending_to_a_closed_peer_is_connection_closed(pair: Pair) -> None:
    sender, receiver = pair
    receiver.close()

    async def keep_sending() -> None:
        # TCP may take the first megabyte before the peer's reset comes back.
        for _ in range(50):
            await send_frame(sender, FrameKind.PUT, [b"z" * MiB])

    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(keep_sending(), timeout=10)


# -- error payloads and socket options ---------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message"),
    [(3, "a transfer starts with a PUT or GET frame"), (15, "checksum ✗ — not stored"), (8, "")],
)
def test_error_payload_round_trip(code: int, message: str) -> None:
    payload = encode_error(code, message)
    assert payload[:4] == struct.pack("<I", code)
    assert decode_error(payload) == (code, message)
    assert decode_error(memoryview(bytearray(payload))) == (code, message)


@pytest.mark.parametrize("payload", [b"", b"\x03", b"\x03\x00\x00"])
def test_a_too_short_error_payload_is_unknown(payload: bytes) -> None:
    code, message = decode_error(payload)
    assert code == 2  # UNKNOWN
    assert "malformed" in message


def test_an_error_message_that_is_not_utf8_still_decodes() -> None:
    assert decode_error(b"\x0e\x00\x00\x00bad \xff byte") == (14, "bad \ufffd byte")


def test_tune_socket() -> None:
    left, right = tcp_pair()
    try:
        tune_socket(left)
        assert not left.getblocking()
        assert left.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert left.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    finally:
        left.close()
        right.close()
    unix, other = socket.socketpair()
    try:
        tune_socket(unix)  # no TCP options on a Unix socket, and no error
        assert not unix.getblocking()
    finally:
        unix.close()
        other.close()
