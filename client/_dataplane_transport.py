"""The data-plane transport: puts and gets over pooled TCP connections
(kvstore.client._dataplane), and how a client finds the server's data plane."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from kvstore.client._auto_transport import PlaneChain
from kvstore.client._credentials import call_metadata
from kvstore.client._dataplane import DataConnection, DataPlanePool
from kvstore.client._settle import CallSettle
from kvstore.client._shm import ShmPool
from kvstore.client._tls import ClientTLS
from kvstore.client._transport import Parts
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire.chunks import GetMessage
from kvstore.wire.frames import VERSION as DATAPLANE_VERSION

logger = logging.getLogger("kvstore.client")
# A same-host connection's buffer holds this many of the largest messages, so that the
# next is written while the daemon still reads the last.
SHM_BUFFER_MESSAGES = 4


class DataPlaneTransport:
    """Each transfer on a connection of `pool`. A new connection must be made within
    `connect_timeout_s` (the control timeout, not the whole transfer's: the transfer
    still has its time for gRPC if this fails).

    Every call raises DataPlaneUnreachable, before it has sent anything, when no
    connection could be made.
    """

    def __init__(self, pool: DataPlanePool, connect_timeout_s: float) -> None:
        self._pool = pool
        self._connect_timeout_s = connect_timeout_s

    @property
    def address(self) -> str:
        return self._pool.address

    @property
    def pool(self) -> DataPlanePool:
        return self._pool

    async def _acquire(self, timeout_s: float) -> DataConnection:
        now = asyncio.get_running_loop().time()
        return await self._pool.acquire(now + timeout_s, now + self._connect_timeout_s)

    async def lookup(
        self, request: pb.LookupPrefixRequest, deadline: float
    ) -> pb.LookupPrefixResponse:
        """One lookup on a pooled connection, by `deadline` (loop time)."""
        now = asyncio.get_running_loop().time()
        connection = await self._pool.acquire(deadline, now + self._connect_timeout_s)
        try:
            return await connection.lookup(request)
        finally:
            connection.release()

    async def put(self, messages: AsyncIterator[Parts], timeout_s: float) -> pb.PutBlocksResponse:
        connection = await self._acquire(timeout_s)
        try:
            return await connection.put(messages)
        finally:
            connection.release()

    async def open_put(self, timeout_s: float) -> DataPutStream:
        return DataPutStream(await self._acquire(timeout_s))

    async def open_get(self, request: pb.GetBlocksRequest, timeout_s: float) -> DataGetStream:
        return DataGetStream(await self._acquire(timeout_s), request)

    def retire(self) -> None:
        """Take no more transfers; those in flight finish."""
        self._pool.retire()

    def close(self) -> None:
        """Take no more transfers, and cut those in flight."""
        self._pool.close()


class DataPutStream:
    """A put on one connection, written frame by frame."""

    def __init__(self, connection: DataConnection) -> None:
        self._connection = connection

    async def send(self, parts: Parts) -> None:
        await self._connection.send_put(parts)

    async def finish(self) -> pb.PutBlocksResponse:
        try:
            return await self._connection.finish_put()
        finally:
            self._connection.release()

    def cancel(self) -> None:
        self._connection.close()  # the server sees the connection end and frees the put
        self._connection.release()


class DataGetStream:
    """A get on one connection. Closing it before the end closes the connection, and
    the server then frees the blocks."""

    def __init__(self, connection: DataConnection, request: pb.GetBlocksRequest) -> None:
        self._connection = connection
        self._replies = connection.get(request)

    def __aiter__(self) -> AsyncIterator[GetMessage]:
        # The connection's own generator: no extra step per message.
        return self._replies

    async def aclose(self) -> None:
        try:
            await self._replies.aclose()
        finally:
            self._connection.release()


async def find_data_plane(
    stub: pb_grpc.KVStoreStub,
    host: str,
    *,
    max_frame_bytes: int,
    timeout_s: float,
    settle: CallSettle,
    token: str | None = None,
    tls: ClientTLS | None = None,
    shared_memory: bool | None = None,
) -> DataPlaneTransport | PlaneChain | None:
    """The server's data planes, asked for over gRPC: its same-host path where its
    socket opens here (unless `shared_memory` is False), then its TCP data plane on
    `host` (unless `shared_memory` is True). None when the server offers none this
    client can use: none at all, another framing version, no answer, or, for a client
    that uses TLS, a plaintext TCP one (its bytes would travel in the clear)."""
    try:
        with settle.tracking():
            reply = await stub.GetDataPlane(
                pb.DataPlaneRequest(), timeout=timeout_s, metadata=call_metadata(token)
            )
    except grpc.aio.AioRpcError:
        return None  # an older server, or none at all: the gRPC call will say
    if reply.version != DATAPLANE_VERSION:
        return None
    hello_token = token.encode() if token else b""
    planes: list[DataPlaneTransport] = []
    # The socket is on this host only if the daemon is: a path that does not connect
    # falls through to TCP, and the socket's HELLO names the daemon's instance, so a
    # socket of another daemon at the same path is not taken for it.
    # The listener must run as the daemon's user (SO_PEERCRED) before a token is sent
    # there; a server that does not say its user gets no token over the socket.
    daemon_uid = reply.shm_uid if reply.HasField("shm_uid") else None
    if (
        shared_memory is not False
        and reply.shm_path
        and (daemon_uid is not None or not hello_token)
    ):
        pool = ShmPool(
            reply.shm_path,
            reply.shm_instance,
            max_frame_bytes,
            buffer_bytes=SHM_BUFFER_MESSAGES * max_frame_bytes,
            token=hello_token,
            daemon_uid=daemon_uid,
        )
        planes.append(DataPlaneTransport(pool, timeout_s))
    tcp = (
        None
        if shared_memory
        else _tcp_plane(reply, host, max_frame_bytes, timeout_s, tls, hello_token)
    )
    if tcp is not None:
        planes.append(tcp)
    if len(planes) > 1:
        return PlaneChain(list(planes))
    return planes[0] if planes else None


def _tcp_plane(
    reply: pb.DataPlaneResponse,
    host: str,
    max_frame_bytes: int,
    timeout_s: float,
    tls: ClientTLS | None,
    hello_token: bytes,
) -> DataPlaneTransport | None:
    if not reply.port:
        return None
    if reply.tls != (tls is not None):
        logger.debug(
            "the data plane on port %d %s TLS and this client %s: transfers use gRPC",
            reply.port,
            "speaks" if reply.tls else "does not speak",
            "does" if tls is not None else "does not",
        )
        return None
    pool = DataPlanePool(
        host,
        reply.port,
        max_frame_bytes,
        token=hello_token,
        tls_context=tls.data_plane_context if tls is not None else None,
        server_name=tls.server_name if tls is not None else None,
    )
    return DataPlaneTransport(pool, timeout_s)


def target_host(target: str) -> str | None:
    """The host in a gRPC target ("host:port", "[::1]:port", "dns:///host:port"), where
    the data plane listens too; None for targets it cannot be read from (unix sockets,
    lists of addresses)."""
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if "," in target or target.startswith("unix") or "/" in target:
        return None
    host, _, _ = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or None
