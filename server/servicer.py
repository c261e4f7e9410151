"""The KVStore servicer: a thin adapter that decodes requests, calls the core, encodes replies."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc

from kvstore.checksum import checksum_kind_from_wire
from kvstore.errors import InvalidRequest
from kvstore.put import PutSession
from kvstore.read import ReadSession
from kvstore.server.config import Limits
from kvstore.server.status import status_for
from kvstore.server.wire import (
    keys_from_wire,
    namespace_from_wire,
    prefix_match_to_wire,
    reject_unknown_fields,
    report_to_wire,
)
from kvstore.store import BlockStore
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

logger = logging.getLogger("kvstore.server")
Reply = TypeVar("Reply")


class KVStoreServicer(pb_grpc.KVStoreServicer):
    def __init__(self, store: BlockStore, limits: Limits) -> None:
        self._store = store
        self._limits = limits
        self.draining = False

    async def _unary(self, context: grpc.aio.ServicerContext, handle: Callable[[], Reply]) -> Reply:
        await self._refuse_if_draining(context)
        try:
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
        def handle() -> pb.LookupPrefixResponse:
            reject_unknown_fields(request, "LookupPrefixRequest")
            namespace = namespace_from_wire(request.namespace, request.HasField("namespace"))
            keys = keys_from_wire(request.keys, self._limits.max_keys, allow_empty=True)
            return prefix_match_to_wire(self._store.lookup(namespace, keys))

        return await self._unary(context, handle)

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

        return await self._unary(context, handle)

    async def Unpin(
        self, request: pb.UnpinRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnpinResponse:
        def handle() -> pb.UnpinResponse:
            reject_unknown_fields(request, "UnpinRequest")
            namespace = namespace_from_wire(request.namespace, request.HasField("namespace"))
            keys = keys_from_wire(request.keys, self._limits.max_keys, allow_empty=False)
            return pb.UnpinResponse(num_unpinned=self._store.unpin(namespace, keys))

        return await self._unary(context, handle)

    async def Delete(
        self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteResponse:
        def handle() -> pb.DeleteResponse:
            reject_unknown_fields(request, "DeleteRequest")
            namespace = namespace_from_wire(request.namespace, request.HasField("namespace"))
            keys = keys_from_wire(request.keys, self._limits.max_keys, allow_empty=False)
            result = self._store.delete(namespace, keys)
            return pb.DeleteResponse(num_deleted=result.num_deleted, num_busy=result.num_busy)

        return await self._unary(context, handle)

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        def handle() -> pb.StatsResponse:
            reject_unknown_fields(request, "StatsRequest")
            return report_to_wire(self._store.report())

        return await self._unary(context, handle)

    async def PutBlocks(
        self,
        request_iterator: AsyncIterator[pb.PutBlocksRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.PutBlocksResponse:
        await self._refuse_if_draining(context)
        session: PutSession | None = None
        try:
            async for request in request_iterator:
                if session is None:
                    session = self._open_put(request)
                elif request.HasField("namespace"):
                    raise InvalidRequest("namespace belongs in the first message of a put only")
                _apply_put_message(session, request)
            if session is None:
                raise InvalidRequest("the put stream was empty; send a namespace and blocks")
            outcomes = session.finish()
            return pb.PutBlocksResponse(
                outcomes=[outcome.value for outcome in outcomes],  # type: ignore[misc]
                num_committed=sum(1 for outcome in outcomes if outcome.value == pb.COMMITTED),
            )
        except Exception as error:
            code, message = status_for(error)
            await context.abort(code, message)
            raise AssertionError("unreachable") from error
        finally:
            # A cancelled or failed stream frees whatever it had reserved.
            if session is not None:
                session.abort()

    def _open_put(self, request: pb.PutBlocksRequest) -> PutSession:
        namespace = namespace_from_wire(request.namespace, request.HasField("namespace"))
        kind = checksum_kind_from_wire(request.checksum_kind)
        return PutSession(self._store, namespace, kind)

    async def GetBlocks(
        self, request: pb.GetBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GetBlocksResponse]:
        await self._refuse_if_draining(context)
        session: ReadSession | None = None
        try:
            reject_unknown_fields(request, "GetBlocksRequest")
            namespace = namespace_from_wire(request.namespace, request.HasField("namespace"))
            keys = keys_from_wire(request.keys, self._limits.max_keys, allow_empty=False)
            chunk_bytes = min(
                request.max_chunk_bytes or self._limits.default_chunk_bytes,
                self._limits.max_chunk_bytes,
            )
            session = ReadSession(self._store, namespace, keys)
            first = pb.GetBlocksResponse(
                num_blocks=len(session.entries),
                tiers=[kind.value for kind in session.tiers],  # type: ignore[misc]
                block_bytes=namespace.layout.block_bytes,
            )
            message, message_bytes, kind = first, 0, 0
            for chunk in session.chunks(chunk_bytes):
                if message_bytes and (
                    message_bytes + chunk.nbytes > chunk_bytes or chunk.checksum_kind_value != kind
                ):
                    yield message
                    message, message_bytes = pb.GetBlocksResponse(), 0
                kind = chunk.checksum_kind_value
                message.checksum_kind = kind  # type: ignore[assignment]
                message.chunks.append(
                    pb.LayerChunk(
                        block_index=chunk.block_index,
                        layer=chunk.layer,
                        offset=chunk.offset,
                        data=chunk.views[0].tobytes()
                        if len(chunk.views) == 1
                        else b"".join(chunk.views),
                        layer_checksum=chunk.layer_checksum,
                    )
                )
                message_bytes += chunk.nbytes
            yield message
        except Exception as error:
            code, message_text = status_for(error)
            await context.abort(code, message_text)
        finally:
            if session is not None:
                session.close()


def _apply_put_message(session: PutSession, request: pb.PutBlocksRequest) -> None:
    reject_unknown_fields(request, "PutBlocksRequest")
    for header in request.blocks:
        reject_unknown_fields(header, "BlockHeader")
        session.declare(header.key, header.parent_key)
    for chunk in request.chunks:
        reject_unknown_fields(chunk, "LayerChunk")
        session.write(
            chunk.block_index, chunk.layer, chunk.offset, chunk.data, chunk.layer_checksum
        )
