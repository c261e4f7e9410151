"""The ssl module's own ceiling, for `kvstore-bench tls`: one process streams bytes to
another over a bare loopback socket, plaintext and TLS, with blocking `sendall` and
`recv_into` and no kvstore code on either side. Its TLS ÷ plaintext ratio is what any
data plane built on Python's ssl module can reach on this machine; the daemons' ratio
is read against it.

The TLS contexts are the daemon's and the client's own (`kvstore.wire.tls`), so both
sides negotiate what the data plane negotiates. The sender is a child process
(`python -m kvstore.bench.tls_ceiling`), started once per stream and kept for every
round: each round it waits for a go byte, sends the round's bytes in `write_bytes`
pieces, then the CPU seconds that took it, as 8 bytes. The receiver is the calling
process, reading into one reused buffer of `write_bytes`, and it times the round from
the go byte to the last payload byte, wall and CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import ssl
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from types import TracebackType

from kvstore.wire.tls import client_context, server_context

_CPU_SECONDS = struct.Struct("<d")
_GO, _STOP = b"g", b"s"
_ACCEPT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class StreamCertificates:
    ca_file: str
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class StreamRound:
    """One round of a bare stream: its GB/s, and each side's CPU seconds per GB."""

    gbps: float
    send_cpu_s_per_gb: float
    recv_cpu_s_per_gb: float


class BareStream:
    """A sending child process and this process's receiving socket, plaintext or (with
    `certificates`) TLS; `round()` streams `nbytes` once. A context manager."""

    def __init__(
        self, nbytes: int, write_bytes: int, certificates: StreamCertificates | None = None
    ) -> None:
        if nbytes < 1 or write_bytes < 1:
            raise ValueError("a bare stream moves at least one byte, in writes of at least one")
        self._nbytes = nbytes
        self._buffer = memoryview(bytearray(write_bytes))
        self._certificates = certificates
        self._sock: socket.socket | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self.version = "plaintext"

    def __enter__(self) -> BareStream:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(_ACCEPT_TIMEOUT_S)
            port = listener.getsockname()[1]
            command = [sys.executable, "-m", "kvstore.bench.tls_ceiling", "127.0.0.1", str(port)]
            command += [str(self._nbytes), str(len(self._buffer))]
            if self._certificates is not None:
                command += ["--ca-file", self._certificates.ca_file]
            self._child = subprocess.Popen(command)
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                self._stop_child()
                raise RuntimeError("the bare stream's sender never connected") from None
        sock.settimeout(None)
        if self._certificates is not None:
            context = server_context(
                self._certificates.cert_file, self._certificates.key_file, None
            )
            sock = context.wrap_socket(sock, server_side=True)
            self.version = sock.version() or "unknown"
        self._sock = sock
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):  # a sender already gone needs no stop
                self._sock.sendall(_STOP)
            self._sock.close()
        self._stop_child()

    def _stop_child(self) -> None:
        if self._child is None:
            return
        try:
            self._child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()

    def round(self) -> StreamRound:
        sock = self._sock
        assert sock is not None, "a BareStream is used inside its `with`"
        buffer = self._buffer
        cpu_start = time.process_time()
        start = time.perf_counter()
        sock.sendall(_GO)
        left = self._nbytes
        while left:
            count = sock.recv_into(buffer[: min(left, len(buffer))])
            if count == 0:
                raise ConnectionError(f"the sender stopped with {left} of {self._nbytes} B unsent")
            left -= count
        seconds = time.perf_counter() - start
        recv_cpu_s = time.process_time() - cpu_start
        (send_cpu_s,) = _CPU_SECONDS.unpack(_read_exactly(sock, _CPU_SECONDS.size))
        gigabytes = self._nbytes / 1e9
        return StreamRound(
            gbps=gigabytes / seconds,
            send_cpu_s_per_gb=send_cpu_s / gigabytes,
            recv_cpu_s_per_gb=recv_cpu_s / gigabytes,
        )


def _read_exactly(sock: socket.socket, nbytes: int) -> bytes:
    data = bytearray()
    while len(data) < nbytes:
        piece = sock.recv(nbytes - len(data))
        if not piece:
            raise ConnectionError("the sender closed the stream before its CPU seconds")
        data += piece
    return bytes(data)


def _send_rounds(sock: socket.socket, nbytes: int, write_bytes: int) -> None:
    """Each go byte: `nbytes` in writes of `write_bytes`, then the CPU seconds it took;
    until the stop byte."""
    payload = memoryview(os.urandom(write_bytes))
    while sock.recv(1) == _GO:
        cpu_start = time.process_time()
        left = nbytes
        while left:
            piece = payload[: min(left, write_bytes)]
            sock.sendall(piece)
            left -= len(piece)
        sock.sendall(_CPU_SECONDS.pack(time.process_time() - cpu_start))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="the sending side of kvstore-bench tls's bare stream (started by it)"
    )
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("nbytes", type=int)
    parser.add_argument("write_bytes", type=int)
    parser.add_argument("--ca-file", help="TLS: the CA the receiver's certificate chains to")
    args = parser.parse_args(argv)
    sock = socket.create_connection((args.host, args.port))
    if args.ca_file is not None:
        context: ssl.SSLContext = client_context(args.ca_file, None, None)
        sock = context.wrap_socket(sock, server_hostname=args.host)
    with sock:
        _send_rounds(sock, args.nbytes, args.write_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
