"""The client's side of the same-host path (kvstore.wire.shm): connections to the
daemon's Unix socket, each with a shared buffer of its own that carries the bytes.

Each connection creates a memfd, seals it against shrinking and growing, maps it and
passes it to the daemon once (REGISTER). A put writes each message into the buffer (the
one copy on this side: tensor to buffer) and names it in a PUT_SHM frame; a get hands
the daemon the whole buffer for its replies, reads each reply where a GET_DATA_SHM frame
says (the tensor copies out of it once) and hands the space back. The daemon maps only
this buffer, and this client maps none of the daemon's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import mmap
import os
import socket
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from kvstore.client._dataplane import DataConnection, DataPlanePool, DataPlaneUnreachable
from kvstore.client._errors import (
    KVStoreClientError,
    Unavailable,
    Unknown,
    error_for_code,
    protocol_error,
)
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import GetMessage, decode_get_message
from kvstore.wire.errors import WireError
from kvstore.wire.frames import (
    HELLO_PAYLOAD,
    ConnectionClosed,
    FrameKind,
    FrameTooLarge,
    decode_error,
    frame_header,
    send_frame,
    tune_socket,
)
from kvstore.wire.shm import (
    BUFFER_ID,
    BUFFER_SIZE,
    SHM_MESSAGE_BYTES,
    Region,
    RegionRing,
    copy_parts,
    decode_region,
)

_ERROR_WAIT_S = 1.0
# What a get reply holds beyond its chunk's bytes, at most (the daemon asks a region of
# max_chunk_bytes + 4 KiB).
_REPLY_HEADROOM_BYTES = 4 << 10
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class SharedBuffer:
    """A memfd this process owns, sealed at its size, mapped read-write."""

    def __init__(self, size: int) -> None:
        fd = os.memfd_create("kvstore-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.size = size
        self.view = memoryview(self._map)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a caller's view still alive: GC unmaps
            self.view.release()
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class ShmConnection(DataConnection):
    """A data-plane connection on the Unix socket, with its registered buffer."""

    def __init__(self, sock: socket.socket, max_frame_bytes: int, buffer: SharedBuffer) -> None:
        super().__init__(sock, max_frame_bytes)
        self._unix_sock = sock
        self._buffer = buffer
        self._ring = RegionRing(buffer.size)
        self.buffer_id = 0  # set by register

    def close(self) -> None:
        super().close()
        self._buffer.close()

    async def hello_instance(self, token: bytes, instance: bytes) -> None:
        """HELLO, and check that the socket's daemon is the one gRPC reached."""
        await self.send(FrameKind.HELLO, [HELLO_PAYLOAD, token])
        payload = bytes(await self.expect(FrameKind.HELLO))
        if payload != HELLO_PAYLOAD + instance:
            raise Unavailable(
                "the Unix socket belongs to another daemon than the one reached over gRPC"
            )

    async def register(self) -> None:
        """Pass the buffer to the daemon (SCM_RIGHTS) and learn its id."""
        data = frame_header(FrameKind.REGISTER, BUFFER_SIZE.size) + BUFFER_SIZE.pack(
            self._buffer.size
        )
        loop = asyncio.get_running_loop()
        while True:
            try:
                sent = socket.send_fds(self._unix_sock, [data], [self._buffer.fd])
                break
            except (BlockingIOError, InterruptedError):
                await asyncio.sleep(0.001)
        if sent < len(data):
            await loop.sock_sendall(self._unix_sock, data[sent:])
        payload = await self.expect(FrameKind.REGISTERED)
        if len(payload) != BUFFER_ID.size:
            raise Unknown(f"the daemon answered REGISTER with {bytes(payload)!r}")
        self.buffer_id = int(BUFFER_ID.unpack(payload)[0])

    async def send(self, kind: FrameKind, parts: Sequence[bytes | memoryview] = ()) -> None:
        """As DataConnection.send; a PUT's message goes into the buffer, and a PUT_SHM
        frame names it."""
        if kind == FrameKind.PUT:
            length = sum(memoryview(part).nbytes for part in parts)
            offset = await self._reserve(length)
            copy_parts(self._buffer.view, offset, parts)
            kind, parts = FrameKind.PUT_SHM, [Region(self.buffer_id, offset, length).encode()]
        await super().send(kind, parts)

    async def send_put(self, parts: list[bytes | memoryview]) -> None:
        """One put message, through the shared buffer (a PUT_SHM frame)."""
        await self.send(FrameKind.PUT, parts)

    async def put(self, messages: AsyncIterator[list[bytes | memoryview]]) -> pb.PutBlocksResponse:
        """A whole put, its messages joined into PUT_SHM messages of about
        SHM_MESSAGE_BYTES (concatenated PutBlocksRequests are one message). Each is
        copied in as soon as it is made, while the bytes its checksums just read are
        still in the cache."""
        start: int | None = None  # the open region's offset
        capacity = filled = 0
        async for parts in messages:
            length = sum(memoryview(part).nbytes for part in parts)
            if start is not None and filled + length > capacity:
                await self._send_region(start, filled)
                start = None
            if start is None:
                capacity = min(max(SHM_MESSAGE_BYTES, length), self._ring.size)
                start = await self._reserve(capacity)
                filled = 0
            filled += copy_parts(self._buffer.view, start + filled, parts)
        if start is not None:
            await self._send_region(start, filled)
        return await self.finish_put()

    async def _send_region(self, offset: int, length: int) -> None:
        self._ring.shrink_newest(length)
        await super().send(FrameKind.PUT_SHM, [Region(self.buffer_id, offset, length).encode()])

    async def _reserve(self, length: int) -> int:
        try:
            offset = self._ring.reserve(length)
        except ValueError:
            raise Unknown(
                f"a {length}-byte put message does not fit the {self._buffer.size}-byte "
                f"shared buffer"
            ) from None
        while offset is None:
            kind, _ = await self._read()
            if kind != FrameKind.SHM_DONE:
                raise Unknown(f"the daemon sent frame kind {kind} during a put")
            self._ring.free_oldest()
            offset = self._ring.reserve(length)
        return offset

    async def expect(self, kind: FrameKind) -> memoryview:
        """As DataConnection.expect; acknowledgements of put messages are taken first."""
        while True:
            received, payload = await self._read()
            if received == FrameKind.SHM_DONE and kind != FrameKind.SHM_DONE:
                self._free_oldest()
                continue
            if received != kind:
                raise Unknown(
                    f"the data plane sent frame kind {received} where {kind.name} was due"
                )
            return payload

    def _free_oldest(self) -> None:
        try:
            self._ring.free_oldest()
        except WireError as error:
            raise protocol_error(error) from error

    async def _check_server(self) -> None:
        """Take the acknowledgements that arrived; anything else cut the transfer short."""
        while self._server_spoke():
            await self._read_acknowledgement()

    async def _read_acknowledgement(self) -> None:
        kind, _ = await self._read()
        if kind != FrameKind.SHM_DONE:
            raise Unknown(f"the daemon sent frame kind {kind} before the transfer ended")
        self._free_oldest()

    async def _raise_server_error(self) -> None:
        try:
            async with asyncio.timeout(_ERROR_WAIT_S):
                while True:  # what the daemon sent before it stopped, then its ERROR
                    kind, payload = await self._reader.read()
                    if kind not in (FrameKind.SHM_DONE, FrameKind.GET_DATA_SHM):
                        break
        except (TimeoutError, ConnectionClosed, FrameTooLarge):
            raise Unavailable("the same-host connection was lost mid-transfer") from None
        if kind == FrameKind.ERROR:
            raise error_for_code(*decode_error(payload))
        raise Unknown(f"the daemon sent frame kind {kind} before the transfer ended")

    async def get(self, request: pb.GetBlocksRequest) -> AsyncGenerator[GetMessage, None]:
        """Each reply of a get, decoded from the buffer; its data are views valid until
        the next one (the daemon writes over them only once they are handed back)."""
        whole = Region(self.buffer_id, 0, self._buffer.size)
        # Larger replies cost no copy here, and fewer frames, as long as two fit the
        # buffer at once (a reply is at most its chunk and a few KiB of headers).
        # Same host: a memcpy beats any codec, so the bytes come raw whatever was asked.
        chunk_bytes = min(
            max(request.max_chunk_bytes, SHM_MESSAGE_BYTES),
            self._buffer.size // 2 - _REPLY_HEADROOM_BYTES,
        )
        if request.max_chunk_bytes != chunk_bytes or request.wire_compression:
            sized = pb.GetBlocksRequest()
            sized.CopyFrom(request)
            sized.max_chunk_bytes = chunk_bytes
            sized.ClearField("wire_compression")
            request = sized
        await self.send(FrameKind.GET_SHM, [whole.encode(), request.SerializeToString()])
        while True:
            kind, payload = await self._read()
            if kind == FrameKind.GET_END:
                self.clean = True
                return
            if kind != FrameKind.GET_DATA_SHM:
                raise Unknown(f"the daemon sent frame kind {kind} during a get")
            try:
                region = decode_region(payload)
                if region.buffer_id != self.buffer_id or region.end > self._buffer.size:
                    raise WireError(f"a reply at {region} lies outside this client's buffer")
                message = decode_get_message(self._buffer.view[region.offset : region.end])
            except WireError as error:
                raise protocol_error(error) from error
            yield message
            await self._send_now(FrameKind.SHM_DONE)

    async def _send_now(self, kind: FrameKind) -> None:
        try:
            async with asyncio.timeout_at(self.deadline):
                await send_frame(self._unix_sock, kind)
        except TimeoutError:
            raise self._deadline_error() from None
        except ConnectionClosed:
            await self._raise_server_error()


def check_listener_user(sock: socket.socket, path: str, daemon_uid: int) -> None:
    """Refuse a Unix socket whose listener is not the daemon's user: another user who put
    a socket at `path` must never see the HELLO's token. The kernel vouches for the uid
    (SO_PEERCRED: the listener's credentials when it called listen())."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _, uid, _ = _UCRED.unpack(credentials)
    if uid != daemon_uid:
        raise OSError(
            f"its listener runs as uid {uid}, not the daemon's uid {daemon_uid}: another "
            f"user's socket at {path}; no token is sent there"
        )


class ShmPool(DataPlanePool):
    """Connections to the daemon's Unix socket at `path`, each with its own buffer of
    `buffer_bytes`."""

    def __init__(
        self,
        path: str,
        instance: bytes,
        max_frame_bytes: int,
        buffer_bytes: int,
        token: bytes = b"",
        daemon_uid: int | None = None,
    ) -> None:
        super().__init__("unix", 0, max_frame_bytes, token=token)
        self.path = path
        self._instance = instance
        self._buffer_bytes = buffer_bytes
        self._daemon_uid = daemon_uid  # None: not checked (allowed only without a token)

    @property
    def address(self) -> str:
        return f"unix:{self.path}"

    async def _connect(self, deadline: float) -> DataConnection:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        buffer: SharedBuffer | None = None
        try:
            async with asyncio.timeout_at(deadline):
                sock.setblocking(False)
                await loop.sock_connect(sock, self.path)
                if self._daemon_uid is not None:
                    check_listener_user(sock, self.path, self._daemon_uid)
                tune_socket(sock)
                buffer = SharedBuffer(self._buffer_bytes)
                connection = ShmConnection(sock, self._max_frame_bytes, buffer)
                connection.begin(deadline)
                await connection.hello_instance(self._token, self._instance)
                await connection.register()
                return connection
        except (OSError, KVStoreClientError, TimeoutError) as error:
            sock.close()
            if buffer is not None:
                buffer.close()
            reason = (
                "no connection, HELLO and REGISTER in time"
                if isinstance(error, TimeoutError)
                else str(error)
            )
            raise DataPlaneUnreachable(
                f"cannot use the same-host path at {self.path}: {reason}"
            ) from None
        except BaseException:
            sock.close()
            if buffer is not None:
                buffer.close()
            raise
