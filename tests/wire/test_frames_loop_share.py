"""A big frame never holds the event loop: a send or a read lets the loop run other
callbacks after every LOOP_SLICE_BYTES, even when its socket is always ready and
nothing would make it wait.

The sockets are real loopback TCP connections whose send and receive calls are
recorded: each call notes how many bytes it moved and how often, by then, a ticker
task on the same loop had run. Between two runs of the ticker, a send or a read
moves less than two slices. The far end is a thread with a blocking socket,
and the read starts only once the kernel holds several slices, so without the slicing
it would take them all in one step of its task.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from kvstore.wire.frames import (
    HEADER,
    LOOP_SLICE_BYTES,
    FrameKind,
    FrameReader,
    frame_header,
    send_frame,
    tune_socket,
)

FRAME_BYTES = 8 * LOOP_SLICE_BYTES


class Ticker:
    """A task that counts how often the loop ran it."""

    def __init__(self) -> None:
        self.ticks = 0

    async def _tick(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self._tick())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class RecordingSocket(socket.socket):
    """A real socket that notes, for each send and receive, the ticker's count and
    the bytes moved."""

    ticker: Ticker
    moved: list[tuple[int, int]]

    def sendmsg(self, buffers: Any, *args: Any) -> int:
        sent = super().sendmsg(buffers, *args)
        self.moved.append((self.ticker.ticks, sent))
        return sent

    def recv_into(self, buffer: Any, *args: Any) -> int:
        count = super().recv_into(buffer, *args)
        self.moved.append((self.ticker.ticks, count))
        return count


def recording(sock: socket.socket, ticker: Ticker) -> RecordingSocket:
    wrapped = RecordingSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    wrapped.ticker, wrapped.moved = ticker, []
    tune_socket(wrapped)
    return wrapped


def most_between_ticks(moved: list[tuple[int, int]]) -> int:
    """The most bytes moved while the ticker did not run."""
    per_tick: defaultdict[int, int] = defaultdict(int)
    for tick, nbytes in moved:
        per_tick[tick] += nbytes
    return max(per_tick.values())


@contextlib.contextmanager
def big_buffered_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(near, far) loopback TCP ends whose kernel buffers hold several slices."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * LOOP_SLICE_BYTES)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        far = socket.socket()
        far.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * LOOP_SLICE_BYTES)
        far.connect(listener.getsockname())
        near, _ = listener.accept()
    with near, far:
        yield near, far


@contextlib.contextmanager
def in_thread(work: Callable[[], None]) -> Iterator[None]:
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(timeout=30)
        assert not thread.is_alive()


def queued_bytes(sock: socket.socket) -> int:
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    return int(struct.unpack("i", raw)[0])


async def test_a_big_send_moves_less_than_two_slices_between_runs_of_the_loop() -> None:
    ticker = Ticker()
    payload = bytes(range(256)) * (FRAME_BYTES // 256)
    received = bytearray()
    with big_buffered_pair() as (near, far), recording(near, ticker) as sender:

        def drain() -> None:
            while len(received) < HEADER.size + FRAME_BYTES:
                chunk = far.recv(4 << 20)
                assert chunk
                received.extend(chunk)

        with in_thread(drain):
            async with ticker.running():
                await send_frame(sender, FrameKind.GET_DATA, [payload])
        assert bytes(received[HEADER.size :]) == payload
        assert most_between_ticks(sender.moved) < 2 * LOOP_SLICE_BYTES


async def test_a_big_read_moves_less_than_two_slices_between_runs_of_the_loop() -> None:
    ticker = Ticker()
    payload = bytes(range(251)) * (FRAME_BYTES // 251)
    with big_buffered_pair() as (near, far):

        def write() -> None:
            far.sendall(frame_header(FrameKind.PUT, len(payload)) + payload)

        with in_thread(write):
            # Several slices wait in the kernel: a read could take them in one step.
            deadline = time.monotonic() + 10
            while queued_bytes(near) < 3 * LOOP_SLICE_BYTES:
                assert time.monotonic() < deadline, "the kernel never buffered 3 slices"
                await asyncio.sleep(0.01)
            with recording(near, ticker) as receiver:
                reader = FrameReader(receiver, max_payload=FRAME_BYTES)
                async with ticker.running():
                    kind, got = await reader.read()
        assert kind == FrameKind.PUT
        assert bytes(got) == payload
        assert most_between_ticks(receiver.moved) < 2 * LOOP_SLICE_BYTES
