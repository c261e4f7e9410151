"""The KVStore servicer: a thin adapter that decodes requests, calls the core, encodes replies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError

from kvstore.enums import PutOutcome, TierKind
from kvstore.errors import InvalidRequest
from kvstore.mover import TierMover
from kvstore.put import PutSession
from kvstore.read import ReadSession
from kvstore.server.config import Limits
from kvstore.server.status import status_for
from kvstore.server.wire import (
    MalformedRequest,
    keys_from_wire,
    prefix_match_to_wire,
    report_to_wire,
)
from kvstore.store import BlockStore
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import (
    GET_CHUNKS,
    GET_RUNS,
    PutMessage,
    chunk_parts,
    decode_put_message,
    encode_get_header,
    run_parts,
)
from kvstore.wire.enums import checksum_kind_from_wire, outcome_to_wire
from kvstore.wire.frames import VERSION as DATAPLANE_VERSION
from kvstore.wire.namespace import namespace_from_wire, reject_unknown_fields

logger = logging.getLogger("kvstore.server")
Reply = TypeVar("Reply")


class KVStoreServicer:
    def __init__(self, store: BlockStore, mover: TierMover | None, limits: Limits) -> None:
        self._store = store
        self._mover = mover
        self._limits = limits
        self._idle_lookup_streams: set[asyncio.Task[object]] = set()
        self.draining = False
        self.data_plane_port = 0  # set once the data plane listens; 0: none
        # (open connections, transfers carried), from the data plane once it listens.
        self.data_plane_counts: Callable[[], tuple[int, int]] | None = None

    def start_draining(self) -> None:
        """Refuse new RPCs, and end lookup streams that wait for their next request."""
        self.draining = True
        for stream in list(self._idle_lookup_streams):
            stream.cancel()

    async def _unary(
        self, request: object, context: grpc.aio.ServicerContext, handle: Callable[[], Reply]
    ) -> Reply:
        await self._refuse_if_draining(context)
        try:
            if isinstance(request, MalformedRequest):
                raise request.rejection()
            return handle()
        except Exception as error:
            code, message = status_for(error)
            await context.abort(code, message)
            raise AssertionError("unreachable") from error

    async def _refuse_if_draining(self, context: grpc.aio.ServicerContext) -> None:
        if self.draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "server is draining for shutdown; retry elsewhere"
            )

    async def LookupPrefix(
        self, request: pb.LookupPrefixRequest, context: grpc.aio.ServicerContext
    ) -> pb.LookupPrefixResponse:
        return await self._unary(request, context, lambda: self._lookup(request))

    async def LookupPrefixStream(
        self,
        requests: AsyncIterator[pb.LookupPrefixRequest | MalformedRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """One result per request, in order; a bad request fails its own result only.

        A drain ends the stream with UNAVAILABLE: at once if it waits for a request,
        else once the result in hand is written. A request that arrives just as the
        drain begins gets that ending instead of a result.
        """
        stream = asyncio.current_task()
        assert stream is not None
        while not self.draining:
            # Idle here, between requests: `start_draining` cancels streams waiting here.
            self._idle_lookup_streams.add(stream)
            try:
                request = await context.read()
            except asyncio.CancelledError:
                if not self.draining:
                    raise  # the client went away
                break
            finally:
                self._idle_lookup_streams.discard(stream)
            if request is grpc.aio.EOF:
                return
            try:
                result = pb.LookupPrefixResult(match=self._lookup(request))
            except Exception as error:
                code, message = status_for(error)
                result = pb.LookupPrefixResult(code=code.value[0], message=message)
            await context.write(result)
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, "server is draining for shutdown; retry elsewhere"
        )

    def _lookup(
        self, request: pb.LookupPrefixRequest | MalformedRequest
    ) -> pb.LookupPrefixResponse:
        if isinstance(request, MalformedRequest):
            raise request.rejection()
        reject_unknown_fields(request, "LookupPrefixRequest")
        namespace = namespace_from_wire(request.namespace, request.HasField("namespace"))
        keys = keys_from_wire(request.keys, self._limits.max_keys, allow_empty=True)
        match = self._store.lookup(namespace, keys, defer_touch=True)
        # Runs after this handler returns, once gRPC has handed the reply to its transport.
        asyncio.get_running_loop().call_soon(self._store.settle_touches)
        return prefix_match_to_wire(match)

    async def Pin(
        self, request: pb.PinRequest, context: grpc.aio.ServicerContext
    ) -> pb.PinResponse:
        def handle() -> pb.PinResponse:
            reject_unknown_fields(request, "PinRequest")
            namespace = namespace_from_wire(request.namespace, request.HasField("namespace"))
            keys = keys_from_wire(request.keys, self._limits.max_keys, allow_empty=False)
            if request.ttl_ms == 0:
                raise InvalidRequest("ttl_ms is required: how long, in ms, to keep the blocks")
            count, expires_at = self._store.pin(namespace, keys, request.ttl_ms / 1000)
            return pb.PinResponse(num_pinned=count, expires_at_ms=int(expires_at * 1000))

        return await self._unary(request, context, handle)

    async def Unpin(
        self, request: pb.UnpinRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnpinResponse:
        def handle() -> pb.UnpinResponse:
            reject_unknown_fields(request, "UnpinRequest")
            namespace = namespace_from_wire(request.namespace, request.HasField("namespace"))
            keys = keys_from_wire(request.keys, self._limits.max_keys, allow_empty=False)
            return pb.UnpinResponse(num_unpinned=self._store.unpin(namespace, keys))

        return await self._unary(request, context, handle)

    async def Delete(
        self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteResponse:
        def handle() -> pb.DeleteResponse:
            reject_unknown_fields(request, "DeleteRequest")
            namespace = namespace_from_wire(request.namespace, request.HasField("namespace"))
            keys = keys_from_wire(request.keys, self._limits.max_keys, allow_empty=False)
            result = self._store.delete(namespace, keys)
            return pb.DeleteResponse(num_deleted=result.num_deleted, num_busy=result.num_busy)

        return await self._unary(request, context, handle)

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        def handle() -> pb.StatsResponse:
            reject_unknown_fields(request, "StatsRequest")
            reply = report_to_wire(self._store.report(), time.process_time())
            reply.data_plane_port = self.data_plane_port
            if self.data_plane_counts is not None:
                connections, transfers = self.data_plane_counts()
                reply.data_plane_connections = connections
                reply.data_plane_transfers = transfers
            return reply

        return await self._unary(request, context, handle)

    async def PutBlocks(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.PutBlocksResponse:
        await self._refuse_if_draining(context)
        try:
            return await self.put_stream(request_iterator)
        except Exception as error:
            code, message = status_for(error)
            await context.abort(code, message)
            raise AssertionError("unreachable") from error

    async def put_stream(self, messages: AsyncIterator[bytes | memoryview]) -> pb.PutBlocksResponse:
        """A whole put, whatever carries it (gRPC or the data plane); raises on bad input.

        Each message is applied before the next is read, so it may be a view into a
        buffer that the transport reuses.
        """
        session: PutSession | None = None
        try:
            async for raw in messages:
                request = decode_put_message(raw)
                if session is None:
                    session = self._open_put(request)
                elif request.namespace is not None:
                    raise InvalidRequest("namespace belongs in the first message of a put only")
                await self._apply_put_message(session, request)
            if session is None:
                raise InvalidRequest("the put stream was empty; send a namespace and blocks")
            outcomes = session.finish()
            return pb.PutBlocksResponse(
                outcomes=[outcome_to_wire(outcome) for outcome in outcomes],
                num_committed=sum(1 for outcome in outcomes if outcome is PutOutcome.COMMITTED),
            )
        finally:
            # A cancelled or failed stream frees whatever it had reserved.
            if session is not None:
                session.abort()

    async def _apply_put_message(self, session: PutSession, request: PutMessage) -> None:
        for header in request.blocks:
            if self._mover is not None:
                # Under pressure, wait for demotions to SSD rather than fail the put.
                await self._mover.ensure_room(TierKind.DRAM, session.block_bytes)
            session.declare(header.key, header.parent_key)
        for chunk in request.chunks:
            session.write(
                chunk.block_index, chunk.layer, chunk.offset, chunk.data, chunk.layer_checksum
            )
        for run in request.runs:
            session.write_run(
                run.first_block, run.num_blocks, run.layer, run.data, run.layer_checksums
            )
        if self._mover is not None:
            self._mover.on_committed(session.take_committed())

    def _open_put(self, request: PutMessage) -> PutSession:
        if request.namespace is None:
            raise InvalidRequest("namespace is required in the first message of a put")
        namespace = namespace_from_wire(_parse_namespace(request.namespace), True)
        kind = checksum_kind_from_wire(request.checksum_kind)
        return PutSession(self._store, namespace, kind)

    async def GetBlocks(
        self, request: pb.GetBlocksRequest | MalformedRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[list[bytes | memoryview]]:
        """Yields each message as wire parts; arena views stay valid while the session is open."""
        await self._refuse_if_draining(context)
        try:
            # Closed at once when the client cancels, so the blocks are unpinned then.
            async with contextlib.aclosing(self.get_stream(request)) as messages:
                async for parts in messages:
                    yield parts
        except Exception as error:
            code, message_text = status_for(error)
            await context.abort(code, message_text)

    async def get_stream(
        self, request: pb.GetBlocksRequest | MalformedRequest
    ) -> AsyncGenerator[list[bytes | memoryview], None]:
        """A whole get as wire parts, whatever carries it; raises on bad input.

        The blocks stay pinned, and the arena views valid, until the generator is
        closed: the transport sends each message before it asks for the next.
        """
        session: ReadSession | None = None
        try:
            if isinstance(request, MalformedRequest):
                raise request.rejection()
            reject_unknown_fields(request, "GetBlocksRequest")
            namespace = namespace_from_wire(request.namespace, request.HasField("namespace"))
            keys = keys_from_wire(request.keys, self._limits.max_keys, allow_empty=False)
            chunk_bytes = min(
                request.max_chunk_bytes or self._limits.default_chunk_bytes,
                self._limits.max_chunk_bytes,
            )
            session = ReadSession(self._store, namespace, keys)
            await session.load(self._mover)
            kind = session.entries[0].checksum_kind_value if session.entries else 0
            header = encode_get_header(
                checksum_kind=kind,
                block_bytes=namespace.layout.block_bytes,
                num_blocks=len(session.entries),
                tiers=[tier.value for tier in session.tiers],
            )
            if 2 * namespace.layout.layer_bytes <= chunk_bytes:
                messages = _run_messages(session, chunk_bytes, header)
            else:
                messages = _chunk_messages(session, chunk_bytes, header, kind)
            for parts in messages:
                yield parts
        finally:
            if session is not None:
                session.close()

    async def GetDataPlane(
        self, request: pb.DataPlaneRequest, context: grpc.aio.ServicerContext
    ) -> pb.DataPlaneResponse:
        def handle() -> pb.DataPlaneResponse:
            reject_unknown_fields(request, "DataPlaneRequest")
            return pb.DataPlaneResponse(port=self.data_plane_port, version=DATAPLANE_VERSION)

        return await self._unary(request, context, handle)


def _run_messages(
    session: ReadSession, chunk_bytes: int, header: bytes
) -> Iterator[list[bytes | memoryview]]:
    """One message per run of whole small layers; the first carries the stream header."""
    sent = False
    for run in session.runs(chunk_bytes):
        prefix = header if not sent else encode_get_header(checksum_kind=run.checksum_kind_value)
        sent = True
        yield [
            prefix,
            *run_parts(GET_RUNS, run.layer, run.first_block, run.layer_checksums, run.views),
        ]
    if not sent:
        yield [header]


def _chunk_messages(
    session: ReadSession, chunk_bytes: int, header: bytes, kind: int
) -> Iterator[list[bytes | memoryview]]:
    """Messages of about `chunk_bytes` of layer chunks; the first carries the stream header."""
    parts: list[bytes | memoryview] = [header]
    message_bytes = 0
    for chunk in session.chunks(chunk_bytes):
        if message_bytes and (
            message_bytes + chunk.nbytes > chunk_bytes or chunk.checksum_kind_value != kind
        ):
            yield parts
            kind = chunk.checksum_kind_value
            parts, message_bytes = [encode_get_header(checksum_kind=kind)], 0
        parts.extend(
            chunk_parts(
                GET_CHUNKS,
                chunk.block_index,
                chunk.layer,
                chunk.offset,
                chunk.layer_checksum,
                list(chunk.views),
            )
        )
        message_bytes += chunk.nbytes
    yield parts


def _parse_namespace(data: bytes) -> pb.Namespace:
    try:
        return pb.Namespace.FromString(data)
    except DecodeError as error:
        raise InvalidRequest(f"malformed namespace: {error}") from None
