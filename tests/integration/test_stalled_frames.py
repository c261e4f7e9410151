"""A data-plane frame's announced length costs the server nothing until its bytes come.

Many connections each announce a PUT frame of the message limit and send a few bytes
(issue 14, item 5): the server's RSS grows by about what arrived, not by what was
announced, and the frame timeout then cuts each connection.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from kvstore.server import RunningServer
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire.frames import HELLO_PAYLOAD, FrameKind

MiB = 1 << 20
NUM_CONNECTIONS = 32
ANNOUNCED_BYTES = 64 * MiB
SENT_BYTES = 4096
Poll = Callable[..., Awaitable[None]]


def frame_header(kind: int, length: int) -> bytes:
    return struct.pack("<BI", kind, length)


async def open_stalled_put(port: int) -> socket.socket:
    """A connection that said HELLO, announced a huge PUT frame, and sent a few bytes."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, frame_header(FrameKind.HELLO, 6) + HELLO_PAYLOAD)
    reply = b""
    while len(reply) < 11:
        reply += await loop.sock_recv(sock, 11 - len(reply))
    assert reply == frame_header(FrameKind.HELLO, 6) + HELLO_PAYLOAD
    await loop.sock_sendall(
        sock, frame_header(FrameKind.PUT, ANNOUNCED_BYTES) + bytes(range(256)) * (SENT_BYTES // 256)
    )
    return sock


def unread_bytes_at(port: int) -> int | None:
    """Bytes received but not yet read by the sockets listening side at local `port`
    (/proc/net/tcp's rx_queue); None where the kernel does not say."""
    total = 0
    try:
        with open("/proc/net/tcp") as table:
            rows = table.read().splitlines()[1:]
    except OSError:
        return None
    for row in rows:
        fields = row.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port:
            total += int(fields[4].split(":")[1], 16)
    return total


async def test_stalled_frames_cost_what_arrived_and_are_cut(
    server_factory: Callable[..., Awaitable[RunningServer]], poll: Poll
) -> None:
    overrides: dict[str, Any] = {
        "limits.max_message_bytes": ANNOUNCED_BYTES,
        "limits.default_chunk_bytes": MiB,
        "limits.frame_timeout_s": 3.0,
    }
    running = await server_factory(**overrides)
    port = running.servicer.data_plane_port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.KVStoreStub(channel)
        before = (await stub.Stats(pb.StatsRequest())).rss_bytes
        connections = [await open_stalled_put(port) for _ in range(NUM_CONNECTIONS)]
        try:

            async def all_read() -> bool:
                return unread_bytes_at(port) in (0, None)

            await poll(all_read)
            # Each connection's reader is now mid-frame: announced 64 MiB, holding ~1 MiB.
            stats = await stub.Stats(pb.StatsRequest())
            grown = stats.rss_bytes - before
            announced = NUM_CONNECTIONS * ANNOUNCED_BYTES  # 2 GiB
            assert grown < announced // 8, f"RSS grew {grown >> 20} MiB for 4 KiB sent"
            assert stats.data_plane_connections == NUM_CONNECTIONS

            async def all_cut() -> bool:
                stats = await stub.Stats(pb.StatsRequest())
                return bool(stats.data_plane_connections == 0)

            await poll(all_cut, timeout_s=30.0)
        finally:
            for sock in connections:
                sock.close()
