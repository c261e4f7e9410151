"""Fixtures of the framing tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from socket_pairs import Pair, tcp_pair  # tests/socket_pairs.py

from kvstore.wire.frames import tune_socket


@pytest.fixture(params=["unix", "tcp"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """(sender, receiver), both tuned as the data plane tunes its sockets."""
    left, right = socket.socketpair() if request.param == "unix" else tcp_pair()
    for sock in (left, right):
        tune_socket(sock)
    try:
        yield left, right
    finally:
        left.close()
        right.close()
