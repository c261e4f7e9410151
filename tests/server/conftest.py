"""A data-plane peer for the server's tests: a plain socket speaking kvstore.wire.frames.

The client library's data plane would never send the bad frames these tests need, so
the peer sends whatever it is given, frame by frame.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from kvstore.server import RunningServer
from kvstore.wire.frames import (
    HELLO_PAYLOAD,
    ConnectionClosed,
    FrameKind,
    FrameReader,
    decode_error,
    send_frame,
)

_MAX_PAYLOAD = 64 << 20


class DataPlanePeer:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader(sock, _MAX_PAYLOAD)

    @classmethod
    async def connect(cls, port: int) -> DataPlanePeer:
        """A connection to 127.0.0.1:`port` that has said HELLO and heard it back."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        peer = cls(sock)
        await peer.send(FrameKind.HELLO, HELLO_PAYLOAD)
        assert await peer.read() == (FrameKind.HELLO, HELLO_PAYLOAD)
        return peer

    async def send(self, kind: int, payload: bytes = b"") -> None:
        await send_frame(self.sock, FrameKind(kind), [payload] if payload else [])

    async def read(self) -> tuple[int, bytes]:
        async with asyncio.timeout(5):
            kind, payload = await self.reader.read()
        return kind, bytes(payload)

    async def read_error(self) -> tuple[int, str]:
        """The (code, message) of the ERROR frame the server sends next."""
        kind, payload = await self.read()
        assert kind == FrameKind.ERROR, (kind, payload[:100])
        return decode_error(payload)

    async def closed_by_server(self) -> bool:
        """Whether the server hangs up within 5 s, sending nothing more."""
        try:
            await self.read()
        except ConnectionClosed:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


ConnectPeer = Callable[[RunningServer], Awaitable[DataPlanePeer]]


@pytest.fixture
async def connect_peer() -> AsyncIterator[ConnectPeer]:
    """Connects DataPlanePeers to a running server's data plane; closed after the test."""
    peers: list[DataPlanePeer] = []

    async def connect(running: RunningServer) -> DataPlanePeer:
        peer = await DataPlanePeer.connect(running.servicer.data_plane_port)
        peers.append(peer)
        return peer

    yield connect
    for peer in peers:
        peer.close()
