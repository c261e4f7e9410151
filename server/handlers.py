"""The gRPC method table for the KVStore service.

It matches the generated `add_KVStoreServicer_to_server`, with two differences:
the block-carrying messages use kvstore.wire.chunks instead of the generated classes
(fewer copies of megabyte payloads), and every request is parsed inside the handler,
so a malformed message is answered INVALID_ARGUMENT rather than INTERNAL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from kvstore.server.decode import MalformedRequest, parse_request
from kvstore.server.servicer import KVStoreServicer
from kvstore.v1 import kvstore_pb2 as pb

SERVICE = "kvstore.v1.KVStore"


def _parser(message_type: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    def parse(data: bytes) -> Message | MalformedRequest:
        return parse_request(message_type, data)

    return parse


def _identity(data: bytes) -> bytes:
    return data


def _join(parts: Sequence[bytes | memoryview]) -> bytes:
    return b"".join(parts)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def method_handlers(servicer: KVStoreServicer) -> dict[str, Any]:
    unary = grpc.unary_unary_rpc_method_handler
    return {
        "LookupPrefix": unary(servicer.LookupPrefix, _parser(pb.LookupPrefixRequest), _serialize),
        "LookupPrefixStream": grpc.stream_stream_rpc_method_handler(
            servicer.LookupPrefixStream, _parser(pb.LookupPrefixRequest), _serialize
        ),
        "PutBlocks": grpc.stream_unary_rpc_method_handler(
            servicer.PutBlocks, _identity, _serialize
        ),
        "GetBlocks": grpc.unary_stream_rpc_method_handler(
            servicer.GetBlocks, _parser(pb.GetBlocksRequest), _join
        ),
        "Pin": unary(servicer.Pin, _parser(pb.PinRequest), _serialize),
        "Unpin": unary(servicer.Unpin, _parser(pb.UnpinRequest), _serialize),
        "Delete": unary(servicer.Delete, _parser(pb.DeleteRequest), _serialize),
        "Stats": unary(servicer.Stats, _parser(pb.StatsRequest), _serialize),
        "GetDataPlane": unary(servicer.GetDataPlane, _parser(pb.DataPlaneRequest), _serialize),
        "WatchBlocks": grpc.unary_stream_rpc_method_handler(
            servicer.WatchBlocks, _parser(pb.WatchBlocksRequest), _serialize
        ),
    }


def add_kvstore_service(servicer: KVStoreServicer, server: grpc.aio.Server) -> None:
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
