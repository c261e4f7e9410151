"""The gRPC transport: lookups, puts and gets over the client's channel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import NoReturn

import grpc

from kvstore.client._credentials import Metadata
from kvstore.client._errors import (
    Unknown,
    error_for,
    protocol_error,
    raise_if_closed_during_call,
    translate_errors,
)
from kvstore.client._lookup_stream import LookupStreams
from kvstore.client._settle import CallSettle
from kvstore.client._transport import Parts
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire.chunks import GetMessage, decode_get_message
from kvstore.wire.errors import WireError

# How long a failed write waits for the call's own status before reporting the write's.
_FINAL_STATUS_WAIT_S = 1.0


@contextlib.contextmanager
def tracked_call(settle: CallSettle) -> Iterator[None]:
    """Around every awaited call: gRPC errors become client errors, and a call cancelled
    midway makes the client's close() wait for gRPC to finish it (kvstore.client._settle)."""
    with settle.tracking(), translate_errors():
        yield


class GrpcTransport:
    """Every call over `channel`; `settle` learns of each call cancelled or left open."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        settle: CallSettle,
        *,
        num_lookup_streams: int,
        metadata: Metadata = (),
    ) -> None:
        self._settle = settle
        self._metadata = metadata  # sent with every call: the caller's token, if any
        self._stub = pb_grpc.KVStoreStub(channel)
        self.lookup_streams = LookupStreams(channel, num_lookup_streams, settle, metadata)
        # The block-carrying RPCs bypass the generated classes (see kvstore.wire.chunks).
        # Replies are decoded here, not by a gRPC deserializer: gRPC would turn a
        # malformed reply into a vague INTERNAL, and this way it is a ProtocolError.
        self._put_blocks = channel.stream_unary(
            "/kvstore.v1.KVStore/PutBlocks",
            request_serializer=_join,
            response_deserializer=pb.PutBlocksResponse.FromString,
        )
        self._get_blocks = channel.unary_stream(
            "/kvstore.v1.KVStore/GetBlocks",
            request_serializer=pb.GetBlocksRequest.SerializeToString,
        )

    @property
    def data_plane(self) -> str | None:
        return None

    async def lookup(
        self, request: pb.LookupPrefixRequest, deadline: float
    ) -> pb.LookupPrefixResponse:
        reply = await self.lookup_streams.lookup(request, deadline)
        if reply is None:
            timeout_s = max(0.0, deadline - asyncio.get_running_loop().time())
            with tracked_call(self._settle):
                reply = await self._stub.LookupPrefix(
                    request, timeout=timeout_s, metadata=self._metadata
                )
        return reply

    async def put(self, messages: AsyncIterator[Parts], timeout_s: float) -> pb.PutBlocksResponse:
        with tracked_call(self._settle):
            reply: pb.PutBlocksResponse = await self._put_blocks(
                messages, timeout=timeout_s, metadata=self._metadata
            )
        return reply

    async def open_put(self, timeout_s: float) -> GrpcPutStream:
        with translate_errors():  # a closed channel refuses here already
            call = self._put_blocks(timeout=timeout_s, metadata=self._metadata)
        return GrpcPutStream(call, self._settle)

    async def open_get(self, request: pb.GetBlocksRequest, timeout_s: float) -> GrpcGetStream:
        with translate_errors():
            call = self._get_blocks(request, timeout=timeout_s, metadata=self._metadata)
        return GrpcGetStream(call, self._settle)

    async def close(self) -> None:
        await self.lookup_streams.close()


class GrpcPutStream:
    """A PutBlocks call written message by message."""

    def __init__(self, call: grpc.aio.StreamUnaryCall, settle: CallSettle) -> None:
        self._call = call
        self._settle = settle
        # In flight from here to finish() or cancel(), also between writes: the
        # client's close() waits for it. Closed once, whichever ends it, however often.
        settle.opened()
        self._open = True

    async def send(self, parts: Parts) -> None:
        with self._settle.tracking():
            try:
                await self._call.write(parts)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
                await _raise_status_of_ended_call(self._call, error)

    async def finish(self) -> pb.PutBlocksResponse:
        try:
            with tracked_call(self._settle):
                try:
                    await self._call.done_writing()
                    reply: pb.PutBlocksResponse = await self._call
                except grpc.aio.AioRpcError as error:
                    await _raise_status_of_ended_call(self._call, error)
        finally:
            self._close()
        return reply

    def cancel(self) -> None:
        if self._call.cancel():
            self._settle.note_cancel()
        self._close()

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._settle.closed()


class GrpcGetStream:
    """A GetBlocks call's replies, decoded; errors arrive as client errors."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, settle: CallSettle) -> None:
        self._call = call
        self._settle = settle
        self._open = True
        settle.opened()

    def __aiter__(self) -> GrpcGetStream:
        return self

    async def __anext__(self) -> GetMessage:
        # The hot loop of every gRPC get: read() is what gRPC's own iterator awaits,
        # and try blocks cost nothing until they catch.
        try:
            raw = await self._call.read()
        except grpc.aio.AioRpcError as error:
            raise error_for(error) from error
        except asyncio.CancelledError:
            self._settle.note_cancel()
            raise_if_closed_during_call()
            raise
        if raw is grpc.aio.EOF:
            raise StopAsyncIteration
        try:
            return decode_get_message(raw)
        except WireError as error:
            raise protocol_error(error) from error

    async def aclose(self) -> None:
        """End the call: a consumer that stopped early, or a bad stream, thus makes the
        server free the blocks it was reading."""
        if not self._open:
            return
        self._open = False
        if self._call.cancel():
            self._settle.note_cancel()
        self._settle.closed()


async def _raise_status_of_ended_call(
    call: grpc.aio.StreamUnaryCall, write_error: grpc.aio.AioRpcError | asyncio.InvalidStateError
) -> NoReturn:
    """Raise the client error for why a call ended that a write found ended.

    grpc.aio fails a write to a call the server has already ended (RESOURCE_EXHAUSTED
    for a put that cannot fit, DEADLINE_EXCEEDED for one idle too long) with INTERNAL
    "Internal error from Core", or with InvalidStateError once it knows the call is
    over; the call's own status, which has arrived by then, is the server's answer.
    """
    try:
        async with asyncio.timeout(_FINAL_STATUS_WAIT_S):
            await call
    except grpc.aio.AioRpcError as final:
        raise error_for(final) from final
    except TimeoutError:
        pass
    else:
        raise Unknown("the server answered the put before the client had sent all of it")
    if isinstance(write_error, grpc.aio.AioRpcError):
        raise error_for(write_error) from write_error
    raise Unknown(f"the put's call ended without a status: {write_error}") from write_error


def _join(parts: Parts) -> bytes:
    return b"".join(parts)
