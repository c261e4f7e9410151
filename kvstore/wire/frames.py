"""The data plane's framing: put and get bytes over a plain TCP connection.

gRPC in Python hands every message over as a `bytes` object: a megabyte message is
copied two or three times in user space on each side, and HTTP/2 adds its own framing
work. On the 2-core reference machine that, not the network, sets the transfer rate.
The data plane carries the same PutBlocksRequest and GetBlocksResponse messages
(kvstore.wire.chunks) in frames of its own: the sender hands the payload views straight
to the kernel (`sendmsg`), and the receiver reads each frame into one reused buffer.
Everything that is not bulk bytes (lookups, pins, stats) stays on gRPC, which also
tells the client where the data plane listens (`GetDataPlane`).

A frame is a 5-byte header, kind (u8) and payload length (u32, little-endian), then
the payload. A connection carries one transfer at a time:

    client                               server
    HELLO  b"KVDP" + version (u16)  ->   then the caller's token (UTF-8, at most 4 KiB),
                                         where the server authenticates; else nothing
                                    <-   HELLO, b"KVDP" + version: the caller is admitted
    DEADLINE  ms left (u32)         ->   (optional, before the transfer's first frame)
    PUT    a PutBlocksRequest       ->   (any number; the first names the namespace)
      or PUT_TAIL: u32 n, then the same message whose last field is a LayerRun, cut
         after its first n bytes: the rest is that run's data, which the server can
         receive straight into its arena rather than into a buffer and then copy
    PUT_END                         ->
                                    <-   PUT_DONE  a PutBlocksResponse
    GET    a GetBlocksRequest       ->
                                    <-   GET_DATA  a GetBlocksResponse (one or more)
                                    <-   GET_END

A transfer must end within its DEADLINE (the client's call deadline, as gRPC sends
it), or within DEFAULT_TRANSFER_S when none was sent; past it the server drops the
transfer, freeing what it held, and answers DEADLINE_EXCEEDED.

On any error the server sends ERROR, a gRPC status code (u32) and a UTF-8 message,
then closes the connection; the client raises the same exception a gRPC call would.
A client cancels a transfer by closing the connection: the server then frees what the
put had reserved, or ends the read, exactly as when a gRPC call is cancelled.
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import socket
import struct
import termios
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Protocol

from kvstore.wire.errors import WireError

MAGIC = b"KVDP"
# 2: transfers may start with a DEADLINE frame, which version-1 servers refuse.
# 3: HELLO may carry a token after the version, which version-2 servers refuse.
# 4: a put's messages may come as PUT_TAIL frames, which version-3 servers refuse.
VERSION = 4
HEADER = struct.Struct("<BI")
HELLO_PAYLOAD = MAGIC + struct.pack("<H", VERSION)
_ERROR_CODE = struct.Struct("<I")
_DEADLINE = struct.Struct("<I")
# The deadline of a transfer that did not send one: the client library's default.
DEFAULT_TRANSFER_S = 120.0
# A frame larger than the reader's buffer is first read into this much (or its length,
# if less), and the buffer grows as bytes arrive (FrameReader).
FIRST_BUFFER_BYTES = 1 << 20
_QUEUED = struct.Struct("i")
# Linux's IOV_MAX: sendmsg takes at most this many buffers per call.
_MAX_BUFFERS = 1024
# The most bytes one send or receive moves before it lets the event loop run other
# callbacks. A socket that keeps up never makes a coroutine wait, so without this a
# 32 MiB get would hold the loop for the whole of it, and every lookup behind it.
LOOP_SLICE_BYTES = 1 << 20


class FrameKind(enum.IntEnum):
    HELLO = 1
    PUT = 2
    PUT_END = 3
    PUT_DONE = 4
    GET = 5
    GET_DATA = 6
    GET_END = 7
    ERROR = 8
    DEADLINE = 9
    # The same-host path's frames (kvstore.wire.shm), on its Unix socket only.
    REGISTER = 10
    REGISTERED = 11
    PUT_SHM = 12
    GET_SHM = 13
    GET_DATA_SHM = 14
    SHM_DONE = 15
    # A lookup: a LookupPrefixRequest, answered by a LookupPrefixResponse (or ERROR).
    LOOKUP = 16
    LOOKUP_RESULT = 17
    # A PUT whose last run's data, the frame's tail, is read where it is stored.
    PUT_TAIL = 18


# A PUT_TAIL frame's payload starts with the length of the message before its tail.
TAIL_PREFIX = struct.Struct("<I")


class ByteStream(Protocol):
    """A connection that is not a bare socket (kvstore.wire.tls.TLSStream): what
    FrameReader and send_frame need of it. A bare socket takes the direct path."""

    def recv_into(self, view: memoryview) -> Awaitable[int]: ...

    async def send_views(self, views: Sequence[memoryview]) -> None: ...

    def queued_bytes(self) -> int: ...


Stream = socket.socket | ByteStream


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (or reset it) in the middle of a frame."""


def frame_header(kind: FrameKind, length: int) -> bytes:
    return HEADER.pack(kind, length)


def encode_deadline(seconds: float) -> bytes:
    """A DEADLINE payload: `seconds` left, in whole ms (at least 1, at most u32)."""
    return _DEADLINE.pack(min(max(1, round(seconds * 1000)), 0xFFFFFFFF))


def decode_deadline(payload: bytes | memoryview) -> float:
    """Seconds left, from a DEADLINE payload; ValueError if it is not 4 bytes."""
    if len(payload) != _DEADLINE.size:
        raise ValueError(f"a DEADLINE frame carries 4 bytes, not {len(payload)}")
    (millis,) = _DEADLINE.unpack(payload)
    return float(millis) / 1000


def encode_error(code: int, message: str) -> bytes:
    return _ERROR_CODE.pack(code) + message.encode("utf-8", "replace")


def decode_error(payload: bytes | memoryview) -> tuple[int, str]:
    if len(payload) < _ERROR_CODE.size:
        return 2, "the data plane sent a malformed error frame"  # UNKNOWN
    (code,) = _ERROR_CODE.unpack_from(payload)
    return code, bytes(payload[_ERROR_CODE.size :]).decode("utf-8", "replace")


class FrameReader:
    """Reads frames from a non-blocking socket into one buffer that it reuses.

    A payload is a view into that buffer: valid until the next `read`.

    Memory follows the bytes that arrived, not the length a header announces: a frame
    larger than the buffer is read into one of at most FIRST_BUFFER_BYTES, grown
    (doubling) only as bytes fill it, so a peer that announces a huge frame and stalls
    makes the reader hold about twice what it sent, never the announced length.
    """

    def __init__(self, stream: Stream, max_payload: int) -> None:
        self._recv_into: Callable[[memoryview], Awaitable[int]]
        self._queued: Callable[[], int]
        if isinstance(stream, socket.socket):
            # The plaintext hot path: the loop's own recv, no layer in between.
            self._recv_into = partial(asyncio.get_running_loop().sock_recv_into, stream)
            self._queued = partial(_queued_bytes, stream)
        else:
            self._recv_into = stream.recv_into
            self._queued = stream.queued_bytes
        self._max_payload = max_payload
        self._header = bytearray(HEADER.size)
        self._buffer = bytearray(0)
        self._tail_buffer = bytearray(0)
        self._unyielded_bytes = 0  # received since the loop last ran other callbacks
        self._sock = stream if isinstance(stream, socket.socket) else None
        # The tail of the last PUT_TAIL frame, not read yet: read_tail or read_tail_into.
        self.tail_bytes = 0
        # The tail's next byte, read ahead by `await_tail` (counted in tail_bytes).
        self._held = bytearray(1)
        self._holding = False

    @property
    def buffer_bytes(self) -> int:
        """The size of the payload buffer now held (for tests and accounting)."""
        return len(self._buffer)

    async def read(self, limit: int | None = None) -> tuple[int, memoryview]:
        """The next frame's kind (possibly unknown to FrameKind) and payload.

        Raises ConnectionClosed at the end of the stream, and FrameTooLarge when the
        header announces more than `limit` (default: `max_payload`) bytes; the payload
        is then not read, nor any buffer made for it.
        """
        if self.tail_bytes:
            raise RuntimeError("the last PUT_TAIL frame's tail was not read")
        await self.read_into(memoryview(self._header))
        kind, length = HEADER.unpack(self._header)
        limit = self._max_payload if limit is None else min(limit, self._max_payload)
        if length > limit:
            raise FrameTooLarge(kind, length, limit)
        if kind == FrameKind.PUT_TAIL:
            return kind, await self._read_before_tail(length)
        return kind, await self._read_payload(length)

    async def _read_before_tail(self, length: int) -> memoryview:
        """A PUT_TAIL frame's message up to its tail; `tail_bytes` says what is left."""
        if length < TAIL_PREFIX.size:
            raise WireError(f"a {length}-byte PUT_TAIL frame is too short for its prefix length")
        await self.read_into(memoryview(self._header)[: TAIL_PREFIX.size])
        (before,) = TAIL_PREFIX.unpack_from(self._header)
        if before > length - TAIL_PREFIX.size:
            raise WireError(
                f"a PUT_TAIL frame of {length} bytes says {before} of them come before its tail"
            )
        tail_bytes = length - TAIL_PREFIX.size - before
        if not tail_bytes:
            raise WireError("a PUT_TAIL frame with no tail; send that message as a PUT frame")
        payload = await self._read_payload(before)
        self.tail_bytes = tail_bytes
        return payload

    async def await_tail(self) -> None:
        """Wait until the tail's next byte has arrived (it is kept for the next read of
        the tail): room for a tail's bytes is made only once they come."""
        if self.tail_bytes and not self._holding:
            await self.read_into(memoryview(self._held))
            self._holding = True

    async def read_tail_into(self, views: Sequence[memoryview]) -> None:
        """The next `sum(len(view))` bytes of the last PUT_TAIL frame's tail (all of it,
        or a part), into `views` (flat byte views), one after another: on a bare
        socket, scattered by the kernel, with no copy on this side."""
        nbytes = sum(len(view) for view in views)
        if not 0 < nbytes <= self.tail_bytes:
            raise ValueError(f"{nbytes} bytes asked of a tail with {self.tail_bytes} left")
        self.tail_bytes -= nbytes
        views = [view for view in views if len(view)]
        if self._holding:
            self._holding = False
            views[0][0] = self._held[0]
            views[0] = views[0][1:]
        if self._sock is not None:
            await self._recv_scattered(self._sock, [view for view in views if len(view)])
            return
        for view in views:
            await self.read_into(view)

    async def read_tail(self, nbytes: int | None = None) -> memoryview:
        """The next `nbytes` of the last PUT_TAIL frame's tail (default: all that is
        left), in a buffer of the reader's own that stays valid until the next
        `read_tail` (not the next `read`)."""
        length = self.tail_bytes if nbytes is None else nbytes
        if not 0 < length <= self.tail_bytes:
            raise ValueError(f"{length} bytes asked of a tail with {self.tail_bytes} left")
        if len(self._tail_buffer) >= length:
            tail = memoryview(self._tail_buffer)[:length]
            await self.read_tail_into([tail])
            return tail
        self._tail_buffer = bytearray(0)  # the old one goes before the new is made
        self.tail_bytes -= length
        start = self._held if self._holding else b""
        self._holding = False
        self._tail_buffer = await self._read_growing(length, start)
        return memoryview(self._tail_buffer)[:length]

    async def _recv_scattered(self, sock: socket.socket, views: list[memoryview]) -> None:
        loop = asyncio.get_running_loop()
        first = 0
        while first < len(views):
            try:
                count = sock.recvmsg_into(_slice_of(views[first : first + _MAX_BUFFERS]))[0]
            except (BlockingIOError, InterruptedError):
                await _readable(loop, sock)
                continue
            except OSError as error:  # a reset: the peer is gone
                raise ConnectionClosed(str(error)) from error
            if count == 0:
                raise ConnectionClosed("the peer closed the connection")
            self._unyielded_bytes += count
            first = _past(views, first, count)
            if self._unyielded_bytes >= LOOP_SLICE_BYTES:
                self._unyielded_bytes = 0
                await asyncio.sleep(0)

    async def _read_payload(self, length: int) -> memoryview:
        if len(self._buffer) >= length:  # the common case: the buffer is reused
            payload = memoryview(self._buffer)[:length]
            await self.read_into(payload)
            return payload
        self._buffer = await self._read_growing(length)
        return memoryview(self._buffer)

    async def _read_growing(self, length: int, start: bytes | bytearray = b"") -> bytearray:
        """A payload larger than the buffer, read into buffers that grow as it arrives.

        Each growth is a new buffer, not a resize: views of the old one may still be
        referenced. The new size is double the old, or what has arrived plus what the
        kernel already holds for us, whichever is more: a frame whose bytes are all
        there grows once, to its length, and pays one copy of its first part. `start`:
        bytes of the payload already read.
        """
        size = min(length, max(FIRST_BUFFER_BYTES, len(self._buffer)))
        buffer = bytearray(size)
        buffer[: len(start)] = start
        received = len(start)
        while True:
            view = memoryview(buffer)
            await self.read_into(view[received:size])
            received = size
            if received == length:
                break
            size = min(length, max(2 * size, received + self._queued()))
            grown = bytearray(size)
            grown[:received] = view
            buffer = grown
        return buffer

    def release_buffer(self) -> None:
        """Drop the payload buffers (views of them stay valid); the next frame makes one."""
        self._buffer = bytearray(0)
        self._tail_buffer = bytearray(0)

    async def read_into(self, view: memoryview) -> None:
        received = 0
        while received < len(view):
            try:
                count = await self._recv_into(view[received : received + LOOP_SLICE_BYTES])
            except OSError as error:  # a reset: the peer is gone
                raise ConnectionClosed(str(error)) from error
            if count == 0:
                raise ConnectionClosed("the peer closed the connection")
            received += count
            self._unyielded_bytes += count
            if self._unyielded_bytes >= LOOP_SLICE_BYTES:
                self._unyielded_bytes = 0
                await asyncio.sleep(0)


def _queued_bytes(sock: socket.socket) -> int:
    """Bytes the kernel holds, received but not yet read, on `sock` (0 if unknown)."""
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.FIONREAD, _QUEUED.pack(0))
    except OSError:
        return 0
    return int(_QUEUED.unpack(queued)[0])


class FrameTooLarge(Exception):
    def __init__(self, kind: int, length: int, limit: int) -> None:
        super().__init__(
            f"a {length}-byte frame (kind {kind}) exceeds the {limit}-byte limit on messages"
        )
        self.kind = kind


async def send_frame(
    stream: Stream, kind: FrameKind, parts: Sequence[bytes | memoryview] = ()
) -> None:
    """One frame whose payload is `parts` back to back; a bare socket's parts are not
    copied."""
    framed = _framed(kind, parts)
    if isinstance(stream, socket.socket):  # the plaintext hot path, as direct as before
        await _send_views(stream, framed)
    else:
        await _send(stream, framed)


async def send_frames(
    stream: Stream, frames: Sequence[tuple[FrameKind, Sequence[bytes | memoryview]]]
) -> None:
    """Several frames back to back, in one send where they fit: a transfer's DEADLINE
    and first frame then reach the peer together, and wake it once, not twice."""
    await _send(stream, [view for kind, parts in frames for view in _framed(kind, parts)])


def _framed(kind: FrameKind, parts: Sequence[bytes | memoryview]) -> list[memoryview]:
    views = [_byte_view(part) for part in parts]
    length = sum(len(view) for view in views)  # bytes, whatever the parts' item size
    return [memoryview(frame_header(kind, length)), *views]


async def send_parts(stream: Stream, parts: Sequence[bytes | memoryview]) -> None:
    """Send every byte of `parts`, in order: through `sendmsg` on a bare socket, waiting
    while its buffer is full."""
    await _send(stream, [_byte_view(part) for part in parts])


async def _send(stream: Stream, views: list[memoryview]) -> None:
    if isinstance(stream, socket.socket):
        await _send_views(stream, views)
        return
    try:
        await stream.send_views(views)
    except OSError as error:
        raise ConnectionClosed(str(error)) from error


async def _send_views(sock: socket.socket, views: list[memoryview]) -> None:
    """send_parts for flat byte views (`views` is consumed), LOOP_SLICE_BYTES at a time."""
    loop = asyncio.get_running_loop()
    views = [view for view in views if len(view)]
    unsent = sum(len(view) for view in views)
    first = 0
    while first < len(views):
        # The common frame (a 1 MiB chunk and its headers) goes in one call, uncut.
        batch = views[first : first + _MAX_BUFFERS]
        if unsent >= 2 * LOOP_SLICE_BYTES:
            batch = _slice_of(batch)
        try:
            sent = sock.sendmsg(batch)
        except (BlockingIOError, InterruptedError):
            await _writable(loop, sock)
            continue
        except OSError as error:
            raise ConnectionClosed(str(error)) from error
        unsent -= sent
        if sent >= LOOP_SLICE_BYTES:
            await asyncio.sleep(0)
        first = _past(views, first, sent)


def _past(views: list[memoryview], first: int, count: int) -> int:
    """The index of the first of `views[first:]` not wholly moved once `count` more bytes
    have been; a view moved in part is cut to its rest, in place."""
    while count:
        head = views[first]
        if count >= len(head):
            count -= len(head)
            first += 1
        else:
            views[first] = head[count:]
            count = 0
    return first


def _slice_of(views: list[memoryview]) -> list[memoryview]:
    """The first LOOP_SLICE_BYTES of `views`."""
    batch = []
    budget = LOOP_SLICE_BYTES
    for view in views:
        if len(view) >= budget:
            batch.append(view[:budget])
            break
        batch.append(view)
        budget -= len(view)
    return batch


def _byte_view(part: bytes | memoryview) -> memoryview:
    view = memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    await _ready(loop, sock, writable=True)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    await _ready(loop, sock, writable=False)


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, writable: bool) -> None:
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(sock.fileno(), wake)
    else:
        loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(sock.fileno())
        else:
            loop.remove_reader(sock.fileno())


def tune_socket(sock: socket.socket) -> None:
    """Non-blocking, no Nagle delay (a frame's header and payload go out together
    anyway), and keepalive, so a peer that vanished is noticed."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
