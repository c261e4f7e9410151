"""The data plane's TLS stream (kvstore.wire.tls.TLSStream) over real non-blocking socket
pairs, Unix and TCP on 127.0.0.1, with a throwaway CA (trustme): frames larger than the
socket buffers arrive intact; decrypted bytes OpenSSL holds count as input (a reader that
peeked only the raw socket would wait forever); close_notify, a hang-up and a shutdown
end reads as a socket's would; a peer that is not TLS fails the handshake with OSError.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from socket_pairs import Pair  # tests/socket_pairs.py

from kvstore.wire.frames import ConnectionClosed, FrameKind, FrameReader, send_frame
from kvstore.wire.tls import TLSStream, client_context, server_context

MiB = 1 << 20
SERVER_NAME = "kvstore.test"

TLSPair = tuple[TLSStream, TLSStream]  # (client, server)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    directory: Path = tmp_path_factory.mktemp("tls-stream")
    ca = trustme.CA()
    leaf = ca.issue_cert(SERVER_NAME)
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    (directory / "server.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(directory / "server.key"))
    client = client_context(str(directory / "ca.pem"), None, None)
    server = server_context(str(directory / "server.pem"), str(directory / "server.key"), None)
    return client, server


@pytest.fixture
async def tls_pair(
    pair: Pair, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> AsyncIterator[TLSPair]:
    left, right = pair
    client = TLSStream(left, contexts[0], server_side=False, server_hostname=SERVER_NAME)
    server = TLSStream(right, contexts[1], server_side=True)
    await asyncio.wait_for(asyncio.gather(client.handshake(), server.handshake()), timeout=10)
    try:
        yield client, server
    finally:
        client.close()
        server.close()


async def test_a_frame_larger_than_the_socket_buffers_arrives_intact(tls_pair: TLSPair) -> None:
    client, server = tls_pair
    payload = bytes(range(256)) * (9 * MiB // 256 + 1)  # not a whole number of records
    reader = FrameReader(server, 16 * MiB)
    sending = asyncio.create_task(send_frame(client, FrameKind.PUT, [b"head", payload]))
    kind, received = await asyncio.wait_for(reader.read(), timeout=30)
    await sending
    assert kind == FrameKind.PUT
    assert received == b"head" + payload


async def test_decrypted_bytes_still_held_count_as_input(tls_pair: TLSPair) -> None:
    client, server = tls_pair
    # Two small frames in one send: one TLS record, decrypted whole by the first read.
    await client.send_views([memoryview(b"\x01\x02\x00\x00\x00ab\x01\x03\x00\x00\x00cde")])
    reader = FrameReader(server, 1000)
    assert await asyncio.wait_for(reader.read(), timeout=5) == (1, memoryview(b"ab"))
    peeked = socket.socket.recv  # the raw socket under TLS holds nothing more
    with pytest.raises(BlockingIOError):
        peeked(server.sock, 1, socket.MSG_PEEK)
    assert server.has_input()
    await asyncio.wait_for(server.wait_readable(), timeout=5)
    assert await asyncio.wait_for(reader.read(), timeout=5) == (1, memoryview(b"cde"))
    assert not server.has_input()


async def test_close_notify_ends_the_stream(tls_pair: TLSPair) -> None:
    client, server = tls_pair
    await send_frame(client, FrameKind.GET_END)
    client.close_notify()
    reader = FrameReader(server, 1000)
    assert (await asyncio.wait_for(reader.read(), timeout=5))[0] == FrameKind.GET_END
    assert server.has_input()  # the close_notify is input: the next read sees the end
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(reader.read(), timeout=5)


async def test_a_peer_that_hangs_up_mid_frame_is_connection_closed(tls_pair: TLSPair) -> None:
    client, server = tls_pair
    await client.send_views([memoryview(b"\x02\x64\x00\x00\x00" + b"x" * 10)])
    client.close()  # no close_notify
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(FrameReader(server, 1000).read(), timeout=5)


async def test_a_shutdown_ends_a_read_in_flight(tls_pair: TLSPair) -> None:
    _, server = tls_pair
    reading = asyncio.create_task(FrameReader(server, 1000).read())
    await asyncio.sleep(0.05)  # the read is waiting for bytes
    server.shutdown(socket.SHUT_RDWR)
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(reading, timeout=5)


async def test_a_peer_that_is_not_tls_fails_the_handshake(
    pair: Pair, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    left, right = pair
    server = TLSStream(right, contexts[1], server_side=True)
    await asyncio.get_running_loop().sock_sendall(left, b"GET / HTTP/1.1\r\n\r\n")
    try:
        with pytest.raises(ssl.SSLError):
            await asyncio.wait_for(server.handshake(), timeout=5)
        # What the peer sent was read before the close: it sees an end, not a reset.
        server.close()
        received = b""
        async with asyncio.timeout(5):
            while chunk := await asyncio.get_running_loop().sock_recv(left, 4096):
                received += chunk
        assert not received.startswith(b"HTTP")
    finally:
        server.close()
