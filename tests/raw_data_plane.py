"""A plain socket to a server's data port, frames packed by hand: for tests that send
what kvstore's own client never would."""

from __future__ import annotations

import asyncio
import socket
import struct

from kvstore.server import RunningServer
from kvstore.wire.frames import HELLO_PAYLOAD, FrameKind

HELLO = HELLO_PAYLOAD


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack("<BI", kind, len(payload)) + payload


class Raw:
    """A plain socket to the data port, frames packed by hand."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, running: RunningServer) -> Raw:
        """Connected, nothing said yet."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        raw = cls(sock)
        await raw.loop.sock_connect(sock, ("127.0.0.1", running.servicer.data_plane_port))
        return raw

    @classmethod
    async def open(cls, running: RunningServer, token: bytes = b"") -> Raw:
        """Connected and admitted: HELLO (with `token`) said and answered."""
        raw = await cls.connect(running)
        await raw.send(frame(FrameKind.HELLO, HELLO + token))
        assert await raw.read_frame() == (FrameKind.HELLO, HELLO)
        return raw

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def recv_exactly(self, count: int) -> bytes:
        received = bytearray()
        while len(received) < count:
            chunk = await self.loop.sock_recv(self.sock, count - len(received))
            if not chunk:
                raise ConnectionError(f"closed after {len(received)} of {count} bytes")
            received += chunk
        return bytes(received)

    async def read_frame(self) -> tuple[int, bytes]:
        async with asyncio.timeout(10):
            kind, length = struct.unpack("<BI", await self.recv_exactly(5))
            return kind, await self.recv_exactly(length)

    async def read_error(self) -> tuple[int, str]:
        kind, payload = await self.read_frame()
        assert kind == FrameKind.ERROR, (kind, payload[:100])
        (code,) = struct.unpack_from("<I", payload)
        return code, payload[4:].decode()

    def close(self) -> None:
        self.sock.close()
