"""The daemon's side of the same-host path (kvstore.wire.shm): the buffers a connection
registered, and the socket stream that receives them.

A connection's buffers are its own: a region names a buffer by an id that only that
connection's table resolves, every region is checked against its buffer's bounds, and
only memfds sealed against shrinking are mapped, so no client can make the daemon read
or write another client's memory, or fault on a truncated mapping.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import mmap
import os
import socket
import stat
import threading
from collections.abc import Sequence

from kvstore.errors import CapacityExhausted, InvalidRequest
from kvstore.wire.frames import send_parts
from kvstore.wire.shm import Region

# Buffers one connection may register; a client needs one.
MAX_BUFFERS = 2
# The largest buffer the daemon maps (its address space, not its memory).
MAX_BUFFER_BYTES = 16 << 30
# All clients' buffers together, mapped at once: address space again, but a process has
# 128 TiB of it, and 1,024 connections of 16 GiB buffers would take all of it (then the
# daemon's own mmaps, thread stacks and allocations would fail).
MAX_MAPPED_BYTES = 1 << 40
# File descriptors one read may bring; more are closed and the connection refused.
_MAX_FDS_PER_READ = 4
# Descriptors a connection may have sent and the daemon not yet used: a REGISTER passes
# one, and the daemon takes it when that frame is read. A client that sends more (a
# frame trickled a byte at a time, each byte with descriptors) would otherwise make the
# daemon hold them until the frame ends, and fill its descriptor table.
_MAX_HELD_FDS = 1
_FD_BYTES = array.array("i").itemsize
_OUT_OF_RESOURCES = {errno.ENOMEM, errno.EMFILE, errno.ENFILE}


class FdStream:
    """A non-blocking Unix stream socket read with recvmsg, so that descriptors sent
    with SCM_RIGHTS are kept (`take_fds`) rather than dropped by a plain recv."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._fds: list[int] = []
        self._refused = False  # too many descriptors came: from now on each is closed
        self._ancillary_bytes = socket.CMSG_SPACE(_MAX_FDS_PER_READ * _FD_BYTES)

    def take_fds(self) -> list[int]:
        """The descriptors received so far (the caller owns them now)."""
        fds, self._fds = self._fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.take_fds():
            os.close(fd)

    async def recv_into(self, view: memoryview) -> int:
        while True:
            try:
                count, ancillary, flags, _ = self.sock.recvmsg_into([view], self._ancillary_bytes)
            except (BlockingIOError, InterruptedError):
                await _readable(self.sock)
                continue
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(data) - len(data) % _FD_BYTES
                    self._fds.extend(array.array("i", data[:usable]))
            if self._refused:  # the connection is closing: what it sends is discarded
                self.close_fds()
            elif flags & socket.MSG_CTRUNC or len(self._fds) > _MAX_HELD_FDS:
                held = len(self._fds)
                self.close_fds()  # the kernel closed any that did not fit (MSG_CTRUNC)
                self._refused = True
                raise InvalidRequest(
                    f"{held if held > _MAX_HELD_FDS else 'too many'} descriptors sent before "
                    f"the daemon used one; a connection passes one descriptor, with its "
                    f"REGISTER frame"
                )
            return count

    async def send_views(self, views: Sequence[memoryview]) -> None:
        await send_parts(self.sock, list(views))

    def queued_bytes(self) -> int:
        return 0  # only used to size a growing frame buffer; frames here are small


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


class MappedBytes:
    """The bytes of client buffers the daemon has mapped, against MAX_MAPPED_BYTES (read
    when it is made). Buffers are unmapped off the loop: the count takes a lock."""

    def __init__(self) -> None:
        self.limit = MAX_MAPPED_BYTES
        self._mapped = 0
        self._lock = threading.Lock()

    @property
    def mapped(self) -> int:
        return self._mapped

    def reserve(self, size: int) -> None:
        with self._lock:
            if self._mapped + size > self.limit:
                raise CapacityExhausted(
                    f"the daemon maps at most {self.limit} bytes of client buffers and "
                    f"{self._mapped} are mapped; register a smaller buffer or retry later"
                )
            self._mapped += size

    def release(self, size: int) -> None:
        with self._lock:
            self._mapped -= size


class ClientBuffers:
    """The buffers one connection registered, mapped, by id."""

    def __init__(self, budget: MappedBytes) -> None:
        self._budget = budget
        self._maps: dict[int, mmap.mmap] = {}
        self._views: dict[int, memoryview] = {}
        self._next_id = 1

    def register(self, fds: list[int], size: int) -> int:
        """Map the one memfd in `fds` (each fd is closed here) of `size` bytes; its id."""
        try:
            if len(fds) != 1:
                raise InvalidRequest(
                    f"REGISTER passes exactly one file descriptor (SCM_RIGHTS), got {len(fds)}"
                )
            if len(self._maps) >= MAX_BUFFERS:
                raise CapacityExhausted(
                    f"a connection registers at most {MAX_BUFFERS} buffers; reuse one"
                )
            if not 0 < size <= MAX_BUFFER_BYTES:
                raise InvalidRequest(
                    f"a buffer is 1 byte to {MAX_BUFFER_BYTES} bytes, not {size}; pass a memfd"
                )
            fd = fds[0]
            _check_sealed_memfd(fd, size)
            self._budget.reserve(size)
            try:
                mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            except (OSError, ValueError) as error:
                self._budget.release(size)
                if (
                    getattr(error, "errno", None) in _OUT_OF_RESOURCES
                ):  # the daemon's, not the client's
                    raise CapacityExhausted(
                        f"the daemon cannot map the buffer now: {error}"
                    ) from None
                raise InvalidRequest(f"the buffer cannot be mapped read-write: {error}") from None
        finally:
            for fd in fds:
                os.close(fd)
        buffer_id = self._next_id
        self._next_id += 1
        self._maps[buffer_id] = mapped
        self._views[buffer_id] = memoryview(mapped)
        return buffer_id

    def view(self, region: Region, max_length: int) -> memoryview:
        """The bytes of `region`, after checking it names a buffer of this connection and
        lies inside it, and is at most `max_length` bytes."""
        buffer = self._views.get(region.buffer_id)
        if buffer is None:
            raise InvalidRequest(
                f"no buffer {region.buffer_id} is registered on this connection "
                f"(registered: {sorted(self._views) or 'none'}); REGISTER it first"
            )
        if region.length > max_length:
            raise CapacityExhausted(
                f"a {region.length}-byte message exceeds the {max_length}-byte limit on messages"
            )
        if region.end > len(buffer):
            raise InvalidRequest(
                f"region [{region.offset}, {region.end}) lies outside buffer "
                f"{region.buffer_id} of {len(buffer)} bytes"
            )
        return buffer[region.offset : region.end]

    def close(self) -> None:
        for view in self._views.values():
            view.release()
        for mapped in self._maps.values():
            self._budget.release(len(mapped))
            # A put's decoded views may still be alive; the mapping then goes with them.
            with contextlib.suppress(BufferError):
                mapped.close()
        self._views.clear()
        self._maps.clear()


def _check_sealed_memfd(fd: int, size: int) -> None:
    """A regular, shrink-sealed file of at least `size` bytes, or InvalidRequest."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise InvalidRequest("the descriptor passed is not a memfd (not a regular file)")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise InvalidRequest(
            "the descriptor passed is not a sealable memfd: create it with "
            "os.memfd_create(name, os.MFD_ALLOW_SEALING) and seal it with F_SEAL_SHRINK"
        ) from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise InvalidRequest(
            "the buffer is not sealed against shrinking: fcntl(fd, F_ADD_SEALS, "
            "F_SEAL_SHRINK) before passing it, so it cannot be truncated under the daemon"
        )
    if info.st_size < size:
        raise InvalidRequest(f"the buffer holds {info.st_size} bytes, not the {size} declared")
