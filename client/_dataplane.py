"""The client's side of the TCP data plane (kvstore.wire.frames): pooled connections that
carry the bytes of puts and gets.

A connection carries one transfer at a time and goes back to the pool only when its
transfer ended cleanly; any error, deadline or early stop closes it, which is also how
the server learns that a transfer was abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError

from kvstore.client._errors import (
    DeadlineExceeded,
    KVStoreClientError,
    Unavailable,
    Unknown,
    error_for_code,
    protocol_error,
)
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import GetMessage, TailedParts, decode_get_message
from kvstore.wire.errors import WireError
from kvstore.wire.frames import (
    HELLO_PAYLOAD,
    TAIL_PREFIX,
    ConnectionClosed,
    FrameKind,
    FrameReader,
    FrameTooLarge,
    decode_error,
    encode_deadline,
    send_frame,
    send_frames,
    tune_socket,
)
from kvstore.wire.tls import TLSStream

# How long to wait for the server's ERROR frame once it has cut a transfer short.
_ERROR_WAIT_S = 1.0
# Pooled connections idle longer are not reused: well inside the server's idle timeout
# (300 s, kvstore.server.dataplane), so the server never closes one as it is picked up.
_MAX_IDLE_S = 60.0
# The frames that start a transfer, after its DEADLINE frame.
_TRANSFER_STARTS = (
    FrameKind.PUT,
    FrameKind.PUT_TAIL,
    FrameKind.GET,
    FrameKind.PUT_SHM,
    FrameKind.GET_SHM,
)


class DataPlaneUnreachable(OSError):
    """No connection could be made; nothing was sent, so the transfer can use gRPC."""


class DataConnection:
    """One connection, one transfer at a time. Every read and write honours the
    transfer's deadline (loop time), set by `DataPlanePool.acquire`."""

    def __init__(
        self, sock: socket.socket, max_frame_bytes: int, tls: TLSStream | None = None
    ) -> None:
        self._sock = sock if tls is None else tls.sock  # a TLS stream owns the socket
        self._tls = tls  # None: plaintext
        self._stream = sock if tls is None else tls
        self._reader = FrameReader(self._stream, max_frame_bytes)
        self.deadline = 0.0
        self._deadline_sent = False
        self.clean = True  # False from the start of a transfer until it ends well
        self.closed = False
        self.idle_since = 0.0  # time.monotonic() it went back to the pool
        self.pool: DataPlanePool | None = None

    def begin(self, deadline: float) -> None:
        """Start a transfer that must end by `deadline` (loop time)."""
        self.deadline = deadline
        self._deadline_sent = False
        self.clean = False

    def release(self) -> None:
        """Hand the connection back to its pool (or close it) once the transfer is over."""
        if self.pool is not None:
            self.pool.release(self)
        else:
            self.close()

    @property
    def plaintext_socket(self) -> socket.socket | None:
        """The bare socket, where no TLS stream wraps it."""
        return self._sock if self._tls is None else None

    def stale(self) -> bool:
        """Whether the server spoke or hung up while the connection sat idle."""
        return self._server_spoke()

    def shutdown(self) -> None:
        """End a transfer in flight from outside: its reads and writes fail at once."""
        with contextlib.suppress(OSError):
            if self._tls is not None:
                self._tls.shutdown(socket.SHUT_RDWR)
            else:
                self._sock.shutdown(socket.SHUT_RDWR)

    async def hello(self, token: bytes = b"") -> None:
        """Say HELLO, with the caller's token where it has one (kvstore.wire.frames)."""
        await self.send(FrameKind.HELLO, [HELLO_PAYLOAD, token])
        payload = await self.expect(FrameKind.HELLO)
        if bytes(payload) != HELLO_PAYLOAD:
            raise Unknown(f"the data plane answered HELLO with {bytes(payload)!r}")

    def close(self) -> None:
        self.closed = True
        if self._tls is not None:
            self._tls.close_notify()
        self._sock.close()

    async def send(self, kind: FrameKind, parts: Sequence[bytes | memoryview] = ()) -> None:
        """Send one frame; if the server has already answered (an ERROR, always), raise it.

        The transfer's first frame goes after a DEADLINE frame: the server drops the
        transfer, and frees what it holds, once the deadline passes, as over gRPC.
        """
        await self._check_server()
        try:
            async with asyncio.timeout_at(self.deadline):
                if not self._deadline_sent and kind in _TRANSFER_STARTS:
                    left = self.deadline - asyncio.get_running_loop().time()
                    self._deadline_sent = True
                    deadline = (FrameKind.DEADLINE, [encode_deadline(left)])
                    await send_frames(self._stream, [deadline, (kind, parts)])
                else:
                    await send_frame(self._stream, kind, parts)
        except TimeoutError:
            raise self._deadline_error() from None
        except ConnectionClosed:
            await self._raise_server_error()

    async def expect(self, kind: FrameKind) -> memoryview:
        """The payload of the next frame, which must be `kind` (or an ERROR, raised)."""
        received, payload = await self._read()
        if received != kind:
            raise Unknown(f"the data plane sent frame kind {received} where {kind.name} was due")
        return payload

    async def put(self, messages: AsyncIterator[list[bytes | memoryview]]) -> pb.PutBlocksResponse:
        async for parts in messages:
            await self.send_put(parts)
        return await self.finish_put()

    async def send_put(self, parts: list[bytes | memoryview]) -> None:
        """One put message: a PUT_TAIL frame where it ends with a run's data (the server
        receives that where it stores it), else a PUT frame."""
        if isinstance(parts, TailedParts) and parts.tail_bytes:
            before_tail = sum(memoryview(part).nbytes for part in parts) - parts.tail_bytes
            await self.send(FrameKind.PUT_TAIL, [TAIL_PREFIX.pack(before_tail), *parts])
        else:
            await self.send(FrameKind.PUT, parts)

    async def finish_put(self) -> pb.PutBlocksResponse:
        await self.send(FrameKind.PUT_END)
        reply = _parsed(pb.PutBlocksResponse, await self.expect(FrameKind.PUT_DONE))
        self.clean = True
        return reply

    async def lookup(self, request: pb.LookupPrefixRequest) -> pb.LookupPrefixResponse:
        """One LOOKUP frame, answered by LOOKUP_RESULT (or an ERROR, raised)."""
        await self.send(FrameKind.LOOKUP, [request.SerializeToString()])
        reply = _parsed(pb.LookupPrefixResponse, await self.expect(FrameKind.LOOKUP_RESULT))
        self.clean = True
        return reply

    async def get(self, request: pb.GetBlocksRequest) -> AsyncGenerator[GetMessage, None]:
        """Each reply of a get, decoded; its data are views valid until the next one."""
        await self.send(FrameKind.GET, [request.SerializeToString()])
        while True:
            kind, payload = await self._read()
            if kind == FrameKind.GET_END:
                self.clean = True
                return
            if kind != FrameKind.GET_DATA:
                raise Unknown(f"the data plane sent frame kind {kind} during a get")
            try:
                message = decode_get_message(payload)
            except WireError as error:
                raise protocol_error(error) from error
            yield message

    async def _read(self) -> tuple[int, memoryview]:
        try:
            async with asyncio.timeout_at(self.deadline):
                kind, payload = await self._reader.read()
        except TimeoutError:
            raise self._deadline_error() from None
        except ConnectionClosed as error:
            raise Unavailable(f"the data plane connection was lost: {error}") from None
        except FrameTooLarge as error:
            raise Unknown(f"the data plane sent an oversized frame: {error}") from None
        if kind == FrameKind.ERROR:
            raise error_for_code(*decode_error(payload))
        return kind, payload

    async def _check_server(self) -> None:
        """Before a frame goes out: the server speaks mid-transfer only to cut it short."""
        if self._server_spoke():
            await self._raise_server_error()

    def _server_spoke(self) -> bool:
        """Whether the server sent something (or hung up) while we were sending."""
        if self._tls is not None:
            return self._tls.has_input()
        try:
            self._sock.recv(1, socket.MSG_PEEK)  # data, or b"" when it hung up
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            pass
        return True

    async def _raise_server_error(self) -> None:
        """The server cut the transfer short: raise the ERROR it sent, if it did."""
        try:
            async with asyncio.timeout(_ERROR_WAIT_S):
                kind, payload = await self._reader.read()
        except (TimeoutError, ConnectionClosed, FrameTooLarge):
            raise Unavailable("the data plane connection was lost mid-transfer") from None
        if kind == FrameKind.ERROR:
            raise error_for_code(*decode_error(payload))
        raise Unknown(f"the data plane sent frame kind {kind} before the transfer ended")

    def _deadline_error(self) -> KVStoreClientError:
        return DeadlineExceeded("the data plane transfer passed its deadline")


class DataPlanePool:
    """Connections to one server's data plane at `host:port`, kept for reuse."""

    def __init__(
        self,
        host: str,
        port: int,
        max_frame_bytes: int,
        max_idle: int = 4,
        token: bytes = b"",
        tls_context: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._tls_context = tls_context  # None: plaintext
        # The name the server's certificate must carry: the host, unless overridden.
        self._server_name = server_name or host
        self._token = token  # the caller's bearer token, said in each HELLO
        self._max_frame_bytes = max_frame_bytes
        self._max_idle = max_idle
        self._idle: list[DataConnection] = []
        # Guards _idle: a thread that looks up from outside the loop borrows from it too
        # (kvstore.client._blocking_lookup). Held for a list operation, never across I/O.
        self._idle_lock = threading.Lock()
        self._active: set[DataConnection] = set()
        self._closed = False

    async def acquire(self, deadline: float, connect_by: float) -> DataConnection:
        """A connection for one transfer ending by `deadline` (loop time); a new one
        must be made by `connect_by`. Raises DataPlaneUnreachable when it cannot be."""
        if self._closed:
            raise DataPlaneUnreachable("the client is closed")
        while (connection := self._take_idle()) is not None:
            if self._fresh(connection):
                break
            connection.close()  # the server restarted, drained, or may be closing it
        else:
            try:
                connection = await self._connect(min(deadline, connect_by))
            except DataPlaneUnreachable:
                if deadline < connect_by and asyncio.get_running_loop().time() >= deadline:
                    # The call's own deadline ran out first (a short lookup's): that says
                    # nothing of the data plane, which must not be given up for it.
                    raise DeadlineExceeded(
                        f"no connection to the data plane at {self.address} before the "
                        "call's deadline"
                    ) from None
                raise
        connection.begin(deadline)
        connection.pool = self
        self._active.add(connection)
        return connection

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def release(self, connection: DataConnection) -> None:
        """Back to the pool if its transfer ended cleanly, else closed."""
        self._active.discard(connection)
        self._keep_idle(connection, reusable=connection.clean)

    def borrow_idle(self) -> DataConnection | None:
        """An idle plaintext connection for a caller outside the loop's thread (a blocking
        lookup), or None; it comes back through `give_back`, or is closed by the caller."""
        if self._closed or self._tls_context is not None:
            return None
        connection = self._take_idle()
        if connection is None or self._fresh(connection):
            return connection
        connection.close()  # as `acquire` would: stale, or idle too long
        return None

    def give_back(self, connection: DataConnection) -> None:
        """A borrowed connection's lookup ended well: idle in the pool again."""
        self._keep_idle(connection, reusable=True)

    def _take_idle(self) -> DataConnection | None:
        with self._idle_lock:
            return self._idle.pop() if self._idle else None

    def _fresh(self, connection: DataConnection) -> bool:
        return not connection.stale() and time.monotonic() - connection.idle_since < _MAX_IDLE_S

    def _keep_idle(self, connection: DataConnection, *, reusable: bool) -> None:
        if reusable and not connection.closed and not self._closed:
            connection.idle_since = time.monotonic()
            with self._idle_lock:
                if len(self._idle) < self._max_idle:
                    self._idle.append(connection)
                    return
        if not connection.closed:
            connection.close()

    def retire(self) -> None:
        """Take no more transfers: close idle connections, and each one in use once
        its transfer ends."""
        self._closed = True
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def close(self) -> None:
        """Retire, and cut transfers in flight too (they raise Unavailable)."""
        self.retire()
        for connection in self._active:
            connection.shutdown()

    async def _connect(self, deadline: float) -> DataConnection:
        """Connect and say HELLO by `deadline`, trying each address of the host."""
        loop = asyncio.get_running_loop()
        failures: list[str] = []
        try:
            async with asyncio.timeout_at(deadline):
                infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
                for family, kind, proto, _, address in infos:
                    sock = socket.socket(family, kind, proto)
                    try:
                        sock.setblocking(False)
                        await loop.sock_connect(sock, address)
                        tune_socket(sock)
                        tls = None
                        if self._tls_context is not None:
                            tls = TLSStream(
                                sock,
                                self._tls_context,
                                server_side=False,
                                server_hostname=self._server_name,
                            )
                            sock = tls.sock  # the stream took the socket over
                            await tls.handshake()
                        connection = DataConnection(sock, self._max_frame_bytes, tls)
                        connection.begin(deadline)
                        await connection.hello(self._token)
                        return connection
                    except (OSError, KVStoreClientError) as error:
                        sock.close()
                        failures.append(f"{address}: {error}")
                    except BaseException:  # cancelled, or out of time: no socket left open
                        sock.close()
                        raise
        except TimeoutError:
            failures.append("no connection and HELLO within the time allowed")
        except OSError as error:  # the name did not resolve
            failures.append(str(error))
        raise DataPlaneUnreachable(
            f"cannot reach the data plane at {self.host}:{self.port}: {'; '.join(failures)}"
        )


_Reply = TypeVar("_Reply", pb.PutBlocksResponse, pb.LookupPrefixResponse)


def _parsed(message_type: type[_Reply], payload: memoryview | bytes) -> _Reply:
    """A reply frame's message; one that does not parse is Unknown (the daemon's fault)."""
    try:
        return message_type.FromString(bytes(payload))
    except DecodeError as error:
        raise Unknown(
            f"the data plane sent a {message_type.__name__} that does not parse: {error}"
        ) from None
