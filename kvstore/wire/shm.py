"""The same-host data path: data-plane frames over a Unix socket, payloads in shared memory.

A client on the daemon's host registers a buffer it owns (a sealed memfd, passed with
SCM_RIGHTS) and then speaks the data plane's framing (kvstore.wire.frames) on the Unix
socket, with three changes: a put's PutBlocksRequest messages are written into the
client's buffer and the PUT_SHM frame names where; a get's GetBlocksResponse messages
are written by the daemon into a region of the client's buffer and each GET_DATA_SHM
frame names where; and whoever reads a message in the buffer hands its space back with
a SHM_DONE frame. Only block bytes move through the buffer; frames stay on the socket.

    client                               server
    HELLO  b"KVDP" + version + token ->
                                    <-   HELLO  b"KVDP" + version + instance (16 bytes)
    REGISTER  size (u64), one fd     ->  (between transfers; any number, up to a cap)
                                    <-   REGISTERED  buffer id (u32)
    PUT_SHM   region                 ->  (instead of PUT; the message lies in the region)
                                    <-   SHM_DONE  (one per PUT_SHM, once it is applied)
    PUT_END                          ->
                                    <-   PUT_DONE  a PutBlocksResponse
    GET_SHM   region + GetBlocksRequest -> (the region is where replies may be written)
                                    <-   GET_DATA_SHM  region (the reply lies there)
    SHM_DONE                         ->  (one per GET_DATA_SHM, once it is read)
                                    <-   GET_END  (once every reply is handed back)

A region is a buffer id (u32), an offset (u64) and a length (u64) in that buffer. Buffer
ids name buffers registered on the same connection only: there is no way to name
another connection's buffer, and the daemon never maps any memory but the buffers its
clients hand it (and never hands them any of its own). The buffer must be a memfd sealed
against shrinking (F_SEAL_SHRINK): otherwise its owner could truncate it under the
daemon's mapping, and the daemon's next access would fault.

Messages are written into the buffer as a ring (RegionRing): in order, each one at the
end of the one before, or at the start of the buffer when the end has no room, and
freed oldest first as SHM_DONE frames arrive. The writer waits for a SHM_DONE when the
ring is full, so a reader that stops reading stalls the writer, as a full socket does.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.wire.errors import WireError

REGION = struct.Struct("<IQQ")
BUFFER_SIZE = struct.Struct("<Q")
BUFFER_ID = struct.Struct("<I")
# A PUT_SHM message may carry this much even where the daemon's max_message_bytes is
# less: a message in shared memory costs the daemon no buffer, and fewer, larger ones
# cost fewer frames. Clients join a put's messages up to this size (protobuf messages
# concatenate into one), and ask for get replies this large. Not more: the daemon
# applies a put's message in one go, and lookups wait meanwhile.
SHM_MESSAGE_BYTES = 2 << 20
# Said by the daemon after HELLO_PAYLOAD on the Unix socket, and in GetDataPlane: a
# client checks that the socket it reached belongs to the daemon it talks to over gRPC.
INSTANCE_BYTES = 16


@dataclass(frozen=True, slots=True)
class Region:
    buffer_id: int
    offset: int
    length: int

    def encode(self) -> bytes:
        return REGION.pack(self.buffer_id, self.offset, self.length)

    @property
    def end(self) -> int:
        return self.offset + self.length


def decode_region(payload: bytes | memoryview) -> Region:
    """The region at the start of `payload`; WireError if it is too short."""
    if len(payload) < REGION.size:
        raise WireError(f"a shared-memory region is {REGION.size} bytes, got {len(payload)}")
    buffer_id, offset, length = REGION.unpack_from(payload)
    return Region(buffer_id, offset, length)


def decode_buffer_size(payload: bytes | memoryview) -> int:
    if len(payload) != BUFFER_SIZE.size:
        raise WireError(f"a REGISTER frame carries {BUFFER_SIZE.size} bytes, not {len(payload)}")
    return int(BUFFER_SIZE.unpack(payload)[0])


class RegionRing:
    """Space for messages in `[start, start + size)` of a buffer, handed out in order and
    freed oldest first (see the module's docstring)."""

    def __init__(self, size: int, start: int = 0) -> None:
        self.size = size
        self._start = start
        self._in_use: deque[tuple[int, int]] = deque()  # (offset, end), relative

    @property
    def num_in_use(self) -> int:
        return len(self._in_use)

    def reserve(self, length: int) -> int | None:
        """The offset (absolute) of `length` free bytes, now in use; None while the
        ring has no room for them (free the oldest and try again). ValueError when it
        never could."""
        if length > self.size:
            raise ValueError(f"a {length}-byte message does not fit a {self.size}-byte ring")
        offset = self._place(length)
        if offset is None:
            return None
        self._in_use.append((offset, offset + length))
        return self._start + offset

    def _place(self, length: int) -> int | None:
        if not self._in_use:
            return 0
        oldest, newest_end = self._in_use[0][0], self._in_use[-1][1]
        wrapped = self._in_use[-1][0] < oldest
        if not wrapped:
            if newest_end + length <= self.size:
                return newest_end
            return 0 if length <= oldest else None
        return newest_end if newest_end + length <= oldest else None

    def shrink_newest(self, length: int) -> None:
        """The newest message turned out `length` bytes long (at most what it reserved)."""
        offset, end = self._in_use[-1]
        if length > end - offset:
            raise ValueError(f"{length} bytes is more than the {end - offset} reserved")
        self._in_use[-1] = (offset, offset + length)

    def free_oldest(self) -> None:
        """The oldest message's space is free again; WireError if none is in use (the
        peer acknowledged a message it was never sent)."""
        if not self._in_use:
            raise WireError("SHM_DONE for no message: every region was already handed back")
        self._in_use.popleft()


def copy_parts(buffer: memoryview, offset: int, parts: Sequence[bytes | memoryview]) -> int:
    """Write `parts` back to back at `offset` of `buffer`; the bytes written."""
    position = offset
    for part in parts:
        view = memoryview(part)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        end = position + len(view)
        buffer[position:end] = view
        position = end
    return position - offset
