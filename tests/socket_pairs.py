"""Connected socket pairs, tuned as the data plane tunes its sockets: for tests of the
framing that need no server."""

from __future__ import annotations

import socket

Pair = tuple[socket.socket, socket.socket]


def tcp_pair() -> Pair:
    """(client, server) ends of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        left = socket.create_connection(listener.getsockname())
        right, _ = listener.accept()
    return left, right
