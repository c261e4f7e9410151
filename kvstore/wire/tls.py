"""TLS for the data plane: contexts from PEM files, and a TLS byte stream over the same
non-blocking socket the plaintext data plane uses.

A plaintext connection is a bare socket, read with `loop.sock_recv_into` and written with
`sendmsg` (kvstore.wire.frames): nothing here sits on that path. A TLS connection is a
`TLSStream`: an `ssl.SSLSocket` in non-blocking mode, waited on through the event loop,
so OpenSSL decrypts from the kernel straight into the frame buffer and encrypts the
payload views straight to the kernel: TLS adds encryption, not copies, nor a task, thread
or protocol object per connection. FrameReader and send_frame take either.

Kernel TLS (OpenSSL's SSL_OP_ENABLE_KTLS) would take the encryption to the kernel, but
Python 3.11's ssl does not expose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import ssl
import struct
import termios
from collections.abc import Iterator, Mapping, Sequence

# Plaintext handed to OpenSSL per write call: it encrypts and sends record after record
# until the socket is full, so a call costs little Python per byte.
_WRITE_BYTES = 1 << 20
# Payload pieces smaller than a TLS record are joined before encryption: a frame's
# 5-byte header must not become a record of its own.
_RECORD_BYTES = 16 << 10
_QUEUED = struct.Struct("i")


# A client's TLS settings as command-line tools and the environment name them:
# (TLSOptions field, flag, environment variable, help). kvstore.client reads the
# variables where ClientOptions.tls is None; kvstore-bench and `kvstore-server stats`
# take the flags.
CLIENT_TLS_SETTINGS = (
    ("ca_file", "--tls-ca", "KVSTORE_TLS_CA", "PEM CA the daemon's certificate chains to"),
    ("cert_file", "--tls-cert", "KVSTORE_TLS_CERT", "PEM client certificate, for mutual TLS"),
    ("key_file", "--tls-key", "KVSTORE_TLS_KEY", "its PEM private key"),
    (
        "server_name",
        "--tls-server-name",
        "KVSTORE_TLS_SERVER_NAME",
        "name to check in the certificate",
    ),
)


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
    """A TLS connection over a connected non-blocking socket: an `ssl.SSLSocket` in
    non-blocking mode, waited on through the event loop.

    The stream takes the socket over (`ssl.SSLContext.wrap_socket` detaches it): from
    here on `sock` is the connection, to shut down and close. `handshake()` first; then
    `recv_into` returns 0 at the end of the stream (a close_notify, or the peer hanging
    up), and errors are OSError (ssl.SSLError is one), as a socket's are.
    """

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock = context.wrap_socket(
            sock,
            server_side=server_side,
            server_hostname=server_hostname,
            do_handshake_on_connect=False,
        )
        self._fd = self.sock.fileno()

    async def handshake(self) -> None:
        """The TLS handshake; OSError (ssl.SSLError included) if it fails."""
        try:
            while True:
                try:
                    self.sock.do_handshake()
                    return
                except ssl.SSLWantReadError:
                    await self._ready(reading=True)
                except ssl.SSLWantWriteError:
                    await self._ready(reading=False)
        except OSError:
            # OpenSSL stops reading at the first bad record; closing with the rest of
            # the peer's bytes unread would reset the connection rather than end it.
            self._discard_input()
            raise

    def _discard_input(self) -> None:
        scratch = bytearray(64 << 10)
        with contextlib.suppress(OSError):
            while socket.socket.recv_into(self.sock, scratch):
                pass

    def peer_common_name(self) -> str | None:
        """The verified peer certificate's subject common name; None without one."""
        return common_name(self.sock.getpeercert())

    async def recv_into(self, view: memoryview) -> int:
        """Decrypted bytes into `view`, as many as are ready (waiting for at least one);
        0 at the end of the stream."""
        # OpenSSL hands over one record per call: keep reading while records are there.
        received = 0
        while received < len(view):
            try:
                count = self.sock.recv_into(view[received:])
            except ssl.SSLWantReadError:
                if received:
                    return received
                await self._ready(reading=True)
                continue
            except ssl.SSLWantWriteError:  # a post-handshake message wants an answer
                await self._ready(reading=False)
                continue
            except ssl.SSLZeroReturnError:
                return received
            if count == 0:  # the peer's close_notify, or it hung up (a cut mid-record too)
                return received
            received += count
        return received

    async def send_views(self, views: Sequence[memoryview]) -> None:
        """Encrypt and send every byte of `views`, in order."""
        for piece in _pieces(views):
            await self._send(piece)

    async def _send(self, view: memoryview) -> None:
        written = 0
        while written < len(view):
            try:
                # A retry after SSLWantWrite passes the same bytes, as OpenSSL requires.
                written += self.sock.send(view[written:])
            except ssl.SSLWantWriteError:
                await self._ready(reading=False)
            except ssl.SSLWantReadError:
                await self._ready(reading=True)

    def queued_bytes(self) -> int:
        """About how many bytes a read could take now without waiting."""
        return self.sock.pending() + _socket_queued(self.sock)

    def has_input(self) -> bool:
        """Whether the peer sent something (or hung up) that is not yet read."""
        if self.sock.pending():
            return True
        try:
            # The raw socket under TLS: SSLSocket.recv takes no flags.
            socket.socket.recv(self.sock, 1, socket.MSG_PEEK)  # data, or b"" at the end
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            pass
        return True

    async def wait_readable(self) -> None:
        """Until the peer has sent a byte (or hung up)."""
        if not self.has_input():
            await self._ready(reading=True)

    def shutdown(self, how: int) -> None:
        """Shut the connection down under TLS (SSLSocket.shutdown would drop the TLS
        state that a read in flight, or close_notify, still uses)."""
        socket.socket.shutdown(self.sock, how)

    def close_notify(self) -> None:
        """Say close_notify, best effort and without waiting: the peer learns the stream
        ended on purpose, not that it was cut."""
        with contextlib.suppress(OSError, ValueError):
            self.sock.unwrap()  # on a non-blocking socket: sends it, waits for nothing

    def close(self) -> None:
        self.sock.close()

    async def _ready(self, *, reading: bool) -> None:
        """Until the socket is readable (or writable)."""
        ready = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if reading:
            self._loop.add_reader(self._fd, wake)
        else:
            self._loop.add_writer(self._fd, wake)
        try:
            await ready
        finally:
            if reading:
                self._loop.remove_reader(self._fd)
            else:
                self._loop.remove_writer(self._fd)


def _pieces(views: Sequence[memoryview]) -> Iterator[memoryview]:
    """`views` as pieces to encrypt: those smaller than a TLS record are joined (a
    frame's 5-byte header must not become a record of its own), larger ones go as
    they are, in writes of at most _WRITE_BYTES."""
    batch = bytearray()
    for view in views:
        if len(view) < _RECORD_BYTES:
            batch += view
            if len(batch) >= _RECORD_BYTES:
                yield memoryview(batch)
                batch = bytearray()
            continue
        if batch:
            yield memoryview(batch)
            batch = bytearray()
        for start in range(0, len(view), _WRITE_BYTES):
            yield view[start : start + _WRITE_BYTES]
    if batch:
        yield memoryview(batch)


def _socket_queued(sock: socket.socket) -> int:
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.FIONREAD, _QUEUED.pack(0))
    except OSError:
        return 0
    return int(_QUEUED.unpack(queued)[0])
