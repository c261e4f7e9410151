"""Connected socket pairs, tuned as the data plane tunes its sockets: for tests of the
framing that need no server."""

from __future__ import annotations

import socket
from typing import Any

Pair = tuple[socket.socket, socket.socket]


def tcp_pair() -> Pair:
    """(client, server) ends of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        left = socket.create_connection(listener.getsockname())
        right, _ = listener.accept()
    return left, right


class CountingSocket(socket.socket):
    """A real socket that counts its `sendmsg` calls."""

    sendmsg_calls = 0

    def sendmsg(self, *args: Any, **kwargs: Any) -> int:
        self.sendmsg_calls += 1
        return super().sendmsg(*args, **kwargs)


def counting(sock: socket.socket) -> CountingSocket:
    """`sock` itself (its descriptor, taken over; non-blocking), counting its sends."""
    counted = CountingSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    counted.setblocking(False)
    return counted
