"""Lookups from the calling thread, for callers that block: the sync facade and the vLLM
connector's scheduler side.

Both run the async client on a loop thread of their own. A lookup through it wakes that
thread, and then the caller with the answer: two thread wake-ups that cost more than the
lookup itself (`kvstore-bench sync-lookup` on the 2-core reference machine, a 64-key
lookup: p50 0.43 ms through a loop thread against 0.26 ms from the caller's, and 1.28
against 0.74 ms after 40 ms without a call). `BlockingLookups`
borrows an idle connection from the async client's data-plane pool (one the client made
and checked: HELLO, the caller's token, the owner of the same-host socket), sends the
LOOKUP frame on it from the calling thread, and hands it back. It opens no connection of
its own, so a tenant's data-plane connection quota counts nothing more.

It only ever saves time: wherever it cannot answer (no data plane found yet, TLS, no idle
connection, the connection lost, an ERROR frame), `lookup_keys` returns None and the
caller takes the loop as before, which answers or raises as it always did. Only a lookup
that ran out of time here raises, as the loop's would.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from google.protobuf.message import DecodeError

from kvstore.client._async import KVClient
from kvstore.client._dataplane import DataPlanePool
from kvstore.client._errors import DeadlineExceeded
from kvstore.client._replies import prefix_match
from kvstore.client._results import PrefixMatch
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.frames import HEADER, FrameKind, frame_header


class BlockingLookups:
    """Lookups of `client`'s namespace from whichever thread calls; any number at once,
    each on a connection of its own while it lasts."""

    def __init__(self, client: KVClient) -> None:
        self._client = client
        # None where lookups are not one node's LOOKUP frame: a cluster client's fan out
        # over its members, and a client without a data plane has none to send.
        single_node = type(client).lookup_keys is KVClient.lookup_keys
        self._pool_of: Callable[[], DataPlanePool | None] | None = (
            getattr(client.transport, "lookup_pool", None) if single_node else None
        )
        self._namespace = pb.Namespace.FromString(client.namespace_bytes)
        self._block_tokens = client.namespace.layout.block_tokens
        self._answered = 0
        self._answered_lock = threading.Lock()  # callers may be many threads

    @property
    def answered(self) -> int:
        """Lookups answered from a calling thread so far."""
        return self._answered

    @property
    def available(self) -> bool:
        """Whether lookups may be answered here (not whether the next one will be)."""
        return self._pool_of is not None

    def close(self) -> None:
        self._pool_of = None

    def lookup_keys(self, keys: list[bytes]) -> PrefixMatch | None:
        """The match, or None: take the loop."""
        pool_of = self._pool_of
        pool = pool_of() if pool_of is not None else None
        connection = pool.borrow_idle() if pool is not None else None
        if pool is None or connection is None:
            return None
        sock = connection.plaintext_socket
        assert sock is not None  # borrow_idle lends plaintext connections only
        request = pb.LookupPrefixRequest(namespace=self._namespace, keys=keys).SerializeToString()
        deadline_s = time.monotonic() + self._client.options.timeouts.lookup
        try:
            kind, payload = _exchange(
                sock, request, deadline_s, self._client.options.max_message_bytes
            )
            reply = pb.LookupPrefixResponse.FromString(payload) if kind == _ANSWER else None
        except TimeoutError:
            connection.close()  # a late answer must not be read as another lookup's
            raise DeadlineExceeded(
                "no lookup result from the data plane before the deadline"
            ) from None
        except (OSError, DecodeError):  # lost (a restarted daemon), or garbled
            connection.close()
            return None
        if reply is None:
            connection.close()  # an ERROR ends the connection; the loop's lookup raises it
            return None
        sock.setblocking(False)  # the pool's connections belong to the loop again
        pool.give_back(connection)
        with self._answered_lock:
            self._answered += 1
        return prefix_match(reply, keys, self._block_tokens)


_ANSWER = FrameKind.LOOKUP_RESULT


def _exchange(
    sock: socket.socket, request: bytes, deadline_s: float, max_frame_bytes: int
) -> tuple[int, bytes]:
    """Send a LOOKUP frame and read the next frame, by `deadline_s` (time.monotonic())."""
    _set_timeout(sock, deadline_s)
    sock.sendall(frame_header(FrameKind.LOOKUP, len(request)) + request)
    kind, length = HEADER.unpack(_receive(sock, HEADER.size, deadline_s))
    if length > max_frame_bytes:
        raise ConnectionError(f"the data plane sent a {length}-byte frame")
    return kind, _receive(sock, length, deadline_s)


def _receive(sock: socket.socket, length: int, deadline_s: float) -> bytes:
    buffer = bytearray(length)
    view = memoryview(buffer)
    received = 0
    while received < length:
        _set_timeout(sock, deadline_s)
        count = sock.recv_into(view[received:])
        if count == 0:
            raise ConnectionResetError("the data plane closed the connection")
        received += count
    return bytes(buffer)


def _set_timeout(sock: socket.socket, deadline_s: float) -> None:
    left_s = deadline_s - time.monotonic()
    if left_s <= 0:
        raise TimeoutError
    sock.settimeout(left_s)
