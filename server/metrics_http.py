"""`GET /metrics` over HTTP/1.1, served on the daemon's own event loop.

On the loop, not in prometheus_client's server thread: a scrape reads the store
(BlockStore.report, the census), which only the loop's thread may touch. A scrape
costs O(tiers + tenants) there. Each connection answers one request and closes; a
client gets `_HEAD_TIMEOUT_S` to send its request head of at most `_MAX_HEAD_BYTES`,
and at most `_MAX_CONNECTIONS` are served at once (more are closed unanswered), so a
slow or hostile client cannot hold the loop or pile up connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

__all__ = ["MetricsEndpoint"]

logger = logging.getLogger("kvstore.server.metrics")

_HEAD_TIMEOUT_S = 10.0
# The longest a reply may take to leave once written: a client that does not read it
# loses its connection rather than hold one of the slots.
_WRITE_TIMEOUT_S = 10.0
_MAX_HEAD_BYTES = 16 << 10
_MAX_CONNECTIONS = 16
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}


class MetricsEndpoint:
    """Serves `registry` at /metrics (text format, or OpenMetrics when asked for)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.scrapes = 0  # /metrics answered, for tests and logs

    async def start(self, host: str, port: int) -> int:
        """Listen on `host:port` (0: any free port); returns the bound port."""
        try:
            self._server = await asyncio.start_server(
                self._serve,
                host,
                port,
                family=socket.AF_INET6 if ":" in host else socket.AF_UNSPEC,
                limit=_MAX_HEAD_BYTES,
            )
        except OSError as error:
            raise OSError(f"metrics endpoint cannot listen on {host}:{port}: {error}") from error
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._handlers) >= _MAX_CONNECTIONS or task is None:
            writer.close()
            return
        self._handlers.add(task)
        try:
            status, content_type, body = await self._answer(reader)
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + body)
            # A client that does not read must not hold a slot (or stop()) for ever.
            async with asyncio.timeout(_WRITE_TIMEOUT_S):
                await writer.drain()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            writer.transport.abort()  # gone, silent or not reading: drop what is unsent
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(_WRITE_TIMEOUT_S):
                    await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        """(status, content type, body) for the request `reader` brings."""
        try:
            async with asyncio.timeout(_HEAD_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _plain(400, f"request head over {_MAX_HEAD_BYTES} bytes\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _plain(400, "expected a request line: GET /metrics HTTP/1.1\n")
        method, path = parts[0], parts[1].split("?", 1)[0]
        if path != "/metrics":
            return _plain(404, "kvstore serves its metrics at /metrics only\n")
        if method != "GET":
            return _plain(405, f"{method} /metrics: use GET\n")
        headers = _headers(lines[1:])
        encode: Callable[[CollectorRegistry], bytes]
        try:
            encode, content_type = choose_encoder(headers.get("accept", ""))
        except Exception:  # a malformed Accept (prometheus_client raises on some)
            return _plain(400, "unsupported Accept header; send text/plain or none\n")
        try:
            body = encode(self._registry)
        except Exception:  # the endpoint's edge: a broken collector must not stop the daemon
            logger.exception("cannot collect the metrics")
            return _plain(500, "cannot collect the metrics; see the server log\n")
        self.scrapes += 1
        return 200, content_type, body


def _headers(lines: list[str]) -> dict[str, str]:
    headers = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return headers


def _plain(status: int, text: str) -> tuple[int, str, bytes]:
    return status, "text/plain; charset=utf-8", text.encode()
