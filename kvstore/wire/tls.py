"""TLS for the data plane: contexts from PEM files, and a TLS byte stream over the same
non-blocking socket the plaintext data plane uses.

A plaintext connection is a bare socket, read with `loop.sock_recv_into` and written with
`sendmsg` (kvstore.wire.frames): nothing here sits on that path. A TLS connection is a
`TLSStream`: an `ssl.SSLObject` between two memory BIOs, pumped through the raw socket
by the event loop, so that TLS adds encryption and one copy each way, not an extra
task, thread or protocol object per connection. FrameReader and send_frame take either.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import ssl
import struct
import termios
from collections.abc import Mapping, Sequence
from typing import cast

# Bytes read from the socket at a time: several 16 KiB TLS records per read.
_RAW_READ_BYTES = 256 << 10
# Plaintext encrypted before it is handed to the socket: large enough to amortise the
# send, small enough that the outgoing BIO never holds more than a fraction of a frame.
_WRITE_BYTES = 256 << 10
# Payload pieces smaller than a TLS record are joined before encryption: a frame's
# 5-byte header must not become a record of its own.
_RECORD_BYTES = 16 << 10
_QUEUED = struct.Struct("i")


class TLSFilesError(ValueError):
    """A certificate, key or CA file that cannot be read or does not parse; names it."""


def server_context(cert_file: str, key_file: str, client_ca_file: str | None) -> ssl.SSLContext:
    """A server context: TLS 1.2 at least, this certificate and key, and with a client
    CA, client certificates required and verified against it (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No session resumption: tickets would be bytes a client has to read after the
    # handshake, and connections are long-lived anyway.
    context.num_tickets = 0
    load_cert_chain(context, cert_file, key_file)
    if client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        load_verify_file(context, client_ca_file)
    return context


def client_context(
    ca_file: str | None, cert_file: str | None, key_file: str | None
) -> ssl.SSLContext:
    """A client context: TLS 1.2 at least, the server's name checked, trusting `ca_file`
    (None: the system's trust store), presenting a certificate where one is given."""
    if ca_file is None:
        context = ssl.create_default_context()
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # names checked, certs required
        load_verify_file(context, ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None and key_file is not None:
        load_cert_chain(context, cert_file, key_file)
    return context


def load_cert_chain(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    for path in (cert_file, key_file):
        read_pem(path)
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as error:
        raise TLSFilesError(
            f"certificate {cert_file} and key {key_file} do not load together "
            f"(bad PEM, or a key that is not the certificate's): {error}"
        ) from None


def load_verify_file(context: ssl.SSLContext, ca_file: str) -> None:
    read_pem(ca_file)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as error:
        raise TLSFilesError(f"CA file {ca_file} holds no usable certificate: {error}") from None


def read_pem(path: str) -> bytes:
    """The bytes of a PEM file; TLSFilesError naming it if it cannot be read or is not PEM."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise TLSFilesError(f"cannot read TLS file {path}: {error.strerror or error}") from None
    if b"-----BEGIN " not in data:
        raise TLSFilesError(f"TLS file {path} is not PEM (no -----BEGIN line)")
    return data


def common_name(certificate: Mapping[str, object] | None) -> str | None:
    """The subject common name of a verified peer certificate (`getpeercert()`)."""
    if not certificate:
        return None
    subject = certificate.get("subject", ())
    assert isinstance(subject, tuple)
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class TLSStream:
    """A TLS connection over a connected non-blocking socket.

    `handshake()` first; then `recv_into` returns 0 at the end of the stream (a
    close_notify, or the peer hanging up), and errors are OSError (ssl.SSLError is one),
    as a socket's are.
    """

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._raw = memoryview(bytearray(_RAW_READ_BYTES))
        self._eof = False

    async def handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
        await self._flush()

    def peer_common_name(self) -> str | None:
        """The verified peer certificate's subject common name; None without one."""
        return common_name(self._ssl.getpeercert())

    async def recv_into(self, view: memoryview) -> int:
        """Decrypted bytes into `view`, as many as are ready (waiting for at least one);
        0 at the end of the stream."""
        received = 0
        while received < len(view):
            try:
                # With a buffer, read() returns a count (typeshed says bytes).
                count = cast(int, self._ssl.read(len(view) - received, view[received:]))
            except ssl.SSLWantReadError:
                if received:
                    return received
                await self._flush()  # a post-handshake message may want an answer
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return received  # 0: the peer ended the stream (a cut mid-record too)
            else:
                if count == 0:  # after the peer's close_notify
                    return received
                received += count
        return received

    async def send_views(self, views: Sequence[memoryview]) -> None:
        """Encrypt and send every byte of `views`, in order."""
        batch = bytearray()
        for view in views:
            if len(view) < _RECORD_BYTES:
                batch += view
                if len(batch) >= _RECORD_BYTES:
                    await self._write(memoryview(batch))
                    batch = bytearray()
                continue
            if batch:
                await self._write(memoryview(batch))
                batch = bytearray()
            await self._write(view)
        if batch:
            await self._write(memoryview(batch))

    async def _write(self, view: memoryview) -> None:
        for start in range(0, len(view), _WRITE_BYTES):
            piece = view[start : start + _WRITE_BYTES]
            written = 0
            while written < len(piece):
                written += self._ssl.write(piece[written:])
            await self._flush()

    def queued_bytes(self) -> int:
        """About how many bytes a read could take now without waiting."""
        return self._ssl.pending() + self._incoming.pending + _socket_queued(self.sock)

    def has_input(self) -> bool:
        """Whether the peer sent something (or hung up) that is not yet read."""
        if self._eof or self._ssl.pending() or self._incoming.pending:
            return True
        try:
            self.sock.recv(1, socket.MSG_PEEK)  # data, or b"" when it hung up
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            pass
        return True

    async def wait_readable(self) -> None:
        """Until the peer has sent a byte (or hung up)."""
        if self.has_input():
            return
        ready = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.add_reader(self.sock.fileno(), wake)
        try:
            await ready
        finally:
            self._loop.remove_reader(self.sock.fileno())

    def close_notify(self) -> None:
        """Say close_notify, best effort and without waiting: the peer learns the stream
        ended on purpose, not that it was cut."""
        with contextlib.suppress(ssl.SSLError, ValueError):
            self._ssl.unwrap()
        data = self._outgoing.read()
        with contextlib.suppress(OSError):
            self.sock.send(data)

    async def _fill(self) -> None:
        """Bytes from the socket into the incoming BIO (its end, when the peer hung up)."""
        if self._eof:
            raise ConnectionResetError("the peer closed the TLS connection")
        count = await self._loop.sock_recv_into(self.sock, self._raw)
        if count == 0:
            self._eof = True
            self._incoming.write_eof()
        else:
            self._incoming.write(self._raw[:count])

    async def _flush(self) -> None:
        if self._outgoing.pending:
            await self._loop.sock_sendall(self.sock, self._outgoing.read())


def _socket_queued(sock: socket.socket) -> int:
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.FIONREAD, _QUEUED.pack(0))
    except OSError:
        return 0
    return int(_QUEUED.unpack(queued)[0])
