"""How a data-plane transfer starts: its DEADLINE frame and its first frame leave in
one send, so the server wakes once for both; later frames of the transfer carry no
DEADLINE."""

from __future__ import annotations

import asyncio
import socket

from socket_pairs import counting  # tests/socket_pairs.py

from kvstore.client._dataplane import DataConnection
from kvstore.wire.frames import FrameKind, FrameReader, decode_deadline, tune_socket

MAX_FRAME_BYTES = 1 << 20


async def test_a_transfer_sends_its_deadline_and_first_frame_together() -> None:
    left, right = socket.socketpair()
    for sock in (left, right):
        tune_socket(sock)
    client_end = counting(left)
    connection = DataConnection(client_end, MAX_FRAME_BYTES)
    reader = FrameReader(right, MAX_FRAME_BYTES)
    try:
        connection.begin(asyncio.get_running_loop().time() + 5.0)
        await connection.send(FrameKind.GET, [b"request"])
        assert client_end.sendmsg_calls == 1
        kind, payload = await reader.read()
        assert kind == FrameKind.DEADLINE
        assert 4.0 < decode_deadline(payload) <= 5.0
        kind, payload = await reader.read()
        assert (kind, bytes(payload)) == (FrameKind.GET, b"request")

        # The same transfer's next frame goes alone.
        await connection.send(FrameKind.PUT_END)
        assert client_end.sendmsg_calls == 2
        kind, payload = await reader.read()
        assert (kind, bytes(payload)) == (FrameKind.PUT_END, b"")

        # A frame that starts no transfer (a lookup) carries no DEADLINE either.
        connection.begin(asyncio.get_running_loop().time() + 5.0)
        await connection.send(FrameKind.LOOKUP, [b"keys"])
        assert client_end.sendmsg_calls == 3
        kind, payload = await reader.read()
        assert (kind, bytes(payload)) == (FrameKind.LOOKUP, b"keys")
    finally:
        connection.close()
        right.close()
