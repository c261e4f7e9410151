"""The daemon's TCP data plane: puts and gets framed as kvstore.datawire describes.

Each connection serves one transfer at a time through the same code as the gRPC
PutBlocks and GetBlocks handlers (`KVStoreServicer.put_stream` / `get_stream`), so
validation, status codes and the reclaiming of abandoned puts are identical. A bad
frame gets an ERROR frame with the status code gRPC would have answered, and the
connection is closed: the stream cannot be trusted after it. Other connections and
stored blocks are untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import grpc

from kvstore.datawire import (
    DEFAULT_TRANSFER_S,
    HELLO_PAYLOAD,
    ConnectionClosed,
    FrameKind,
    FrameReader,
    FrameTooLarge,
    decode_deadline,
    encode_error,
    frame_header,
    send_frame,
    tune_socket,
)
from kvstore.errors import InvalidRequest
from kvstore.server.config import Limits
from kvstore.server.servicer import KVStoreServicer
from kvstore.server.status import status_for
from kvstore.server.wire import MalformedRequest
from kvstore.v1 import kvstore_pb2 as pb

logger = logging.getLogger("kvstore.server")
# After an ERROR frame, how long to wait for the client to read it and hang up.
_LINGER_S = 2.0
# A connection that has not said HELLO by then is not a kvstore client: close it.
_HELLO_TIMEOUT_S = 10.0


class _Rejected(Exception):
    """Answer with this status and close the connection."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class DataPlane:
    def __init__(self, servicer: KVStoreServicer, limits: Limits) -> None:
        self._servicer = servicer
        self._limits = limits
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        # Connections waiting for their next transfer: a drain closes these at once.
        self._idle: set[asyncio.Task[None]] = set()
        self.transfers = 0  # puts and gets served, for tests and logs
        self.accepted = 0  # connections served (not those turned away at the cap)

    async def start(self, host: str, port: int) -> int:
        """Listen on `host:port` (0: any free port); returns the bound port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(64)
            listener.setblocking(False)
        except OSError as error:
            listener.close()
            raise OSError(f"data plane cannot listen on {host}:{port}: {error}") from error
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept_loop(listener))
        bound: int = listener.getsockname()[1]
        return bound

    async def drain(self, grace_s: float) -> None:
        """Stop accepting, close idle connections, and give transfers in flight
        `grace_s` to finish before they are cut."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
        for task in list(self._idle):
            task.cancel()
        if self._connections:
            _, pending = await asyncio.wait(set(self._connections), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as error:  # out of file descriptors, say: keep serving
                logger.warning("data plane accept failed: %s", error)
                await asyncio.sleep(0.1)
                continue
            tune_socket(sock)
            if len(self._connections) >= self._limits.max_data_connections:
                _refuse(sock, self._limits.max_data_connections)
                continue
            self.accepted += 1
            task = asyncio.create_task(self._serve(sock))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, sock: socket.socket) -> None:
        task = asyncio.current_task()
        assert task is not None
        reader = FrameReader(sock, self._limits.max_message_bytes)
        try:
            self._idle.add(task)
            try:
                await self._handshake(sock, reader)
            finally:
                self._idle.discard(task)
            # A drain ends the connection between transfers; the client's pool sees it.
            while not self._servicer.draining:
                reader.release_buffer()  # an idle connection holds no megabyte buffer
                self._idle.add(task)
                try:
                    kind, payload = await reader.read()
                finally:
                    self._idle.discard(task)
                if self._servicer.draining:
                    raise _Rejected(
                        grpc.StatusCode.UNAVAILABLE,
                        "server is draining for shutdown; retry elsewhere",
                    )
                seconds = DEFAULT_TRANSFER_S
                if kind == FrameKind.DEADLINE:
                    seconds = _deadline_of(payload)
                try:
                    async with asyncio.timeout(seconds):
                        if kind == FrameKind.DEADLINE:
                            kind, payload = await reader.read()
                        await self._transfer(sock, reader, kind, payload)
                except TimeoutError:
                    # The client's deadline, as over gRPC: what the transfer held is freed.
                    raise _Rejected(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"the transfer did not finish within its deadline of {seconds:g} s",
                    ) from None
                self.transfers += 1
        except (ConnectionClosed, asyncio.CancelledError):
            pass  # the client went away, or a drain closed an idle connection
        except FrameTooLarge as error:
            await self._reject(sock, reader, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except _Rejected as error:
            await self._reject(sock, reader, error.code, str(error))
        except Exception as error:
            code, message = status_for(error)
            await self._reject(sock, reader, code, message)
        finally:
            sock.close()

    async def _transfer(
        self, sock: socket.socket, reader: FrameReader, kind: int, payload: memoryview
    ) -> None:
        if kind == FrameKind.PUT:
            reply = await self._servicer.put_stream(self._put_messages(reader, payload))
            await send_frame(sock, FrameKind.PUT_DONE, [reply.SerializeToString()])
        elif kind == FrameKind.GET:
            await self._get(sock, payload)
        else:
            raise InvalidRequest(
                f"a transfer starts with a PUT or GET frame (after an optional DEADLINE), "
                f"not kind {kind}"
            )

    async def _handshake(self, sock: socket.socket, reader: FrameReader) -> None:
        try:
            async with asyncio.timeout(_HELLO_TIMEOUT_S):
                # Nothing larger than a HELLO is read, or buffered, before it.
                kind, payload = await reader.read(limit=len(HELLO_PAYLOAD))
            hello = kind == FrameKind.HELLO and bytes(payload) == HELLO_PAYLOAD
        except FrameTooLarge:  # an HTTP request, say: its first bytes read as a huge length
            hello = False
        except TimeoutError:
            raise _Rejected(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no HELLO frame within {_HELLO_TIMEOUT_S:.0f} s of connecting",
            ) from None
        if not hello:
            raise _Rejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                "not a kvstore data-plane client: a connection starts with a HELLO frame "
                f"carrying {HELLO_PAYLOAD!r} (see kvstore.datawire)",
            )
        await send_frame(sock, FrameKind.HELLO, [HELLO_PAYLOAD])

    async def _put_messages(
        self, reader: FrameReader, first: memoryview
    ) -> AsyncIterator[memoryview]:
        payload = first
        while True:
            yield payload
            kind, payload = await reader.read()
            if kind == FrameKind.PUT_END:
                return
            if kind != FrameKind.PUT:
                raise InvalidRequest(
                    f"a put goes on with PUT frames and ends with PUT_END, not kind {kind}"
                )

    async def _get(self, sock: socket.socket, payload: memoryview) -> None:
        request: pb.GetBlocksRequest | MalformedRequest
        try:
            request = pb.GetBlocksRequest.FromString(bytes(payload))
        except Exception as error:  # protobuf's DecodeError and its kin
            request = MalformedRequest("kvstore.v1.GetBlocksRequest", str(error))
        async with contextlib.aclosing(self._servicer.get_stream(request)) as messages:
            async for parts in messages:
                await send_frame(sock, FrameKind.GET_DATA, parts)
        await send_frame(sock, FrameKind.GET_END)

    async def _reject(
        self, sock: socket.socket, reader: FrameReader, code: grpc.StatusCode, message: str
    ) -> None:
        """Send ERROR, then let the client read it before the connection closes:
        closing with unread input would reset the connection and could lose it."""
        try:
            await send_frame(sock, FrameKind.ERROR, [encode_error(code.value[0], message)])
            sock.shutdown(socket.SHUT_WR)
            scratch = memoryview(bytearray(64 << 10))
            async with asyncio.timeout(_LINGER_S):
                while True:  # discard what the client still sends, until it hangs up
                    await reader.read_into(scratch)
        except (ConnectionClosed, OSError, TimeoutError, asyncio.CancelledError):
            pass


def _deadline_of(payload: memoryview) -> float:
    try:
        seconds = decode_deadline(payload)
    except ValueError as error:
        raise InvalidRequest(str(error)) from None
    return seconds


def _refuse(sock: socket.socket, limit: int) -> None:
    """Turn a connection away at once: the client falls back to gRPC."""
    error = encode_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        f"the data plane has {limit} connections (limits.max_data_connections); use gRPC",
    )
    with contextlib.suppress(OSError):
        sock.send(frame_header(FrameKind.ERROR, len(error)) + error)
    sock.close()
