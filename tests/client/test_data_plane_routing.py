"""Which data plane a transfer takes, and when one is given up: a plane is retired only
for a failure of its own, never for a caller's short deadline, and a plane that two
transfers find unreachable at once is retired once, the next plane kept."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from kvstore.client import DeadlineExceeded
from kvstore.client._auto_transport import PlaneChain
from kvstore.client._dataplane import DataPlanePool, DataPlaneUnreachable
from kvstore.client._dataplane_transport import DataPlaneTransport
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.frames import HEADER, HELLO_PAYLOAD, FrameKind

MAX_FRAME_BYTES = 1 << 20


@contextlib.asynccontextmanager
async def slow_hello_server(delay_s: float) -> AsyncIterator[int]:
    """A data plane that answers HELLO after `delay_s`, then every LOOKUP with a miss."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
                await reader.readexactly(length)
                if kind == FrameKind.HELLO:
                    await asyncio.sleep(delay_s)
                    reply = (FrameKind.HELLO, HELLO_PAYLOAD)
                else:
                    miss = pb.LookupPrefixResponse(num_matched=0).SerializeToString()
                    reply = (FrameKind.LOOKUP_RESULT, miss)
                writer.write(HEADER.pack(reply[0], len(reply[1])) + reply[1])
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_lookup_deadline_passing_during_hello_keeps_the_data_plane() -> None:
    async with slow_hello_server(0.3) as port:
        pool = DataPlanePool("127.0.0.1", port, MAX_FRAME_BYTES)
        plane = DataPlaneTransport(pool, connect_timeout_s=5.0)
        deadline = asyncio.get_running_loop().time() + 0.1
        request = pb.LookupPrefixRequest(keys=[b"k" * 32])
        # The lookup's own 0.1 s ran out, not the plane's 5 s to connect: not "unreachable".
        with pytest.raises(DeadlineExceeded, match="before the call's deadline"):
            await plane.lookup(request, deadline)
        deadline = asyncio.get_running_loop().time() + 5.0
        assert (await plane.lookup(request, deadline)).num_matched == 0
        pool.close()


class FailingPlane:
    """A plane whose every call fails as unreachable after a step of the loop."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.retired = 0

    async def open_get(self, request: pb.GetBlocksRequest, timeout_s: float) -> str:
        await asyncio.sleep(0)
        raise DataPlaneUnreachable(f"cannot reach {self.address}")

    def retire(self) -> None:
        self.retired += 1


class WorkingPlane(FailingPlane):
    async def open_get(self, request: pb.GetBlocksRequest, timeout_s: float) -> str:
        return self.address


async def test_two_transfers_failing_on_one_plane_retire_it_once_and_keep_the_next() -> None:
    shm, tcp = FailingPlane("unix:/run/kv.sock"), WorkingPlane("127.0.0.1:1")
    chain = PlaneChain([shm, tcp])  # type: ignore[list-item]
    request = pb.GetBlocksRequest()
    results = await asyncio.gather(chain.open_get(request, 1.0), chain.open_get(request, 1.0))
    assert results == ["127.0.0.1:1", "127.0.0.1:1"]
    assert (shm.retired, tcp.retired) == (1, 0)
    assert chain.address == "127.0.0.1:1"
