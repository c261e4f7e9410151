"""What the client needs from a transport: the calls that carry block bytes, and lookups.

KVClient (policy: which blocks, which tensors, what to verify) sits on a Transport
(where the bytes go). Three implement it:

- `GrpcTransport` (kvstore.client._grpc_transport): everything over the gRPC channel;
- `DataPlaneTransport` (kvstore.client._dataplane_transport): puts and gets over the
  server's TCP data plane; it carries block bytes only (a `BlockTransport`);
- `AutoTransport` (kvstore.client._auto_transport): finds the data plane, uses it while
  it answers, and falls back to gRPC.

Messages are lists of wire parts (kvstore.wire.chunks): header bytes and views of the
tensors, joined only when they are written.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import GetMessage

Parts = list[bytes | memoryview]


class PutStream(Protocol):
    """One open PutBlocks stream. It ends with exactly one of `finish` or `cancel`."""

    async def send(self, parts: Parts) -> None:
        """Send one PutBlocksRequest."""

    async def finish(self) -> pb.PutBlocksResponse:
        """End the stream and return the server's reply."""

    def cancel(self) -> None:
        """Abandon the put: the server frees whatever it had reserved for it."""


class GetStream(Protocol):
    """The decoded replies of one GetBlocks call; each message's data are views valid
    until the next. Close it (also after the last message) to end the call."""

    def __aiter__(self) -> AsyncIterator[GetMessage]: ...

    async def aclose(self) -> None: ...


class BlockTransport(Protocol):
    """The block-carrying calls. Every `timeout_s` is the whole transfer's."""

    async def put(self, messages: AsyncIterator[Parts], timeout_s: float) -> pb.PutBlocksResponse:
        """One whole put: send every message, return the server's reply."""

    async def open_put(self, timeout_s: float) -> PutStream:
        """A put stream the caller feeds message by message (a layer put)."""

    async def open_get(self, request: pb.GetBlocksRequest, timeout_s: float) -> GetStream:
        """A get under way; nothing is read until the stream is iterated."""


class Transport(BlockTransport, Protocol):
    """Everything KVClient sends through a transport."""

    @property
    def data_plane(self) -> str | None:
        """The data plane ("host:port") transfers use now; None while they use gRPC."""

    async def lookup(
        self, request: pb.LookupPrefixRequest, deadline: float
    ) -> pb.LookupPrefixResponse:
        """The server's answer by `deadline` (loop time)."""

    async def close(self) -> None:
        """Stop: transfers in flight end (they raise), and nothing new starts."""
