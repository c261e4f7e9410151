"""Request decoding (kvstore.server.decode): a bad request gets the same status and the
same message over gRPC and over the data plane, because both decode it in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from kvstore.errors import InvalidRequest
from kvstore.layout import Namespace
from kvstore.server import RunningServer
from kvstore.server.decode import MalformedRequest, open_keyed_request, parse_request
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import encode_put_header
from kvstore.wire.frames import FrameKind
from kvstore.wire.namespace import namespace_to_wire

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
# A field number kvstore.v1 does not define, as a varint: tag (99 << 3 | 0) = 0x98 0x06, value 1.
UNKNOWN_FIELD = bytes([0x98, 0x06, 0x01])
GARBAGE = b"\x0a\xff\xff\xff\xff\x0f"  # a namespace field claiming 4 GiB
MAX_KEYS = 1000  # tests/conftest.py's SERVER_DEFAULTS

# tests/server/conftest.py's fixture: connects a DataPlanePeer.
ConnectPeer = Callable[[RunningServer], Awaitable[Any]]
MakeNamespace = Callable[..., Namespace]


def wire_namespace(make_namespace: MakeNamespace) -> pb.Namespace:
    return namespace_to_wire(make_namespace())


def get_cases(namespace: pb.Namespace) -> list[tuple[str, bytes, str]]:
    """(name, serialized GetBlocksRequest, the whole message the server must answer)."""
    good = pb.GetBlocksRequest(namespace=namespace, keys=[b"k"]).SerializeToString()
    namespace_with_unknown = namespace.SerializeToString() + UNKNOWN_FIELD
    return [
        (
            "missing-namespace",
            pb.GetBlocksRequest(keys=[b"k"]).SerializeToString(),
            "namespace is required: tenant, model_fingerprint and layout",
        ),
        (
            "unknown-field",
            good + UNKNOWN_FIELD,
            "GetBlocksRequest has unknown field number(s) [99]; this server speaks kvstore.v1 "
            "as of its proto file; upgrade the server or drop the field(s)",
        ),
        (
            "unknown-field-in-namespace",
            bytes([0x0A, len(namespace_with_unknown)]) + namespace_with_unknown,
            "namespace has unknown field number(s) [99]; this server speaks kvstore.v1 "
            "as of its proto file; upgrade the server or drop the field(s)",
        ),
        (
            "too-many-keys",
            pb.GetBlocksRequest(
                namespace=namespace, keys=[b"%d" % i for i in range(MAX_KEYS + 1)]
            ).SerializeToString(),
            f"{MAX_KEYS + 1} keys in one request; the server's limit is {MAX_KEYS} "
            "(split the request)",
        ),
        (
            "empty-keys",
            pb.GetBlocksRequest(namespace=namespace).SerializeToString(),
            "keys is empty; name at least one block key",
        ),
    ]


async def grpc_get_error(channel: grpc.aio.Channel, raw: bytes) -> tuple[int, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in channel.unary_stream("/kvstore.v1.KVStore/GetBlocks")(raw, timeout=5):
            pass
    return raised.value.code().value[0], raised.value.details() or ""


async def grpc_put_error(channel: grpc.aio.Channel, raw: bytes) -> tuple[int, str]:
    async def one() -> AsyncIterator[bytes]:
        yield raw

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.stream_unary("/kvstore.v1.KVStore/PutBlocks")(one(), timeout=5)
    return raised.value.code().value[0], raised.value.details() or ""


async def test_bad_get_requests_are_answered_alike_on_both_transports(
    server: RunningServer,
    channel: grpc.aio.Channel,
    connect_peer: ConnectPeer,
    make_namespace: MakeNamespace,
) -> None:
    for name, raw, message in get_cases(wire_namespace(make_namespace)):
        over_grpc = await grpc_get_error(channel, raw)
        peer = await connect_peer(server)
        await peer.send(FrameKind.GET, raw)
        over_data_plane = await peer.read_error()
        assert over_grpc == (INVALID_ARGUMENT.value[0], message), name
        assert over_data_plane == over_grpc, name
        assert await peer.closed_by_server(), name
    assert server.store.report().num_namespaces == 0, "no bad request reached the store"


async def test_malformed_get_bytes_are_answered_alike_on_both_transports(
    server: RunningServer, channel: grpc.aio.Channel, connect_peer: ConnectPeer
) -> None:
    over_grpc = await grpc_get_error(channel, GARBAGE)
    peer = await connect_peer(server)
    await peer.send(FrameKind.GET, GARBAGE)
    assert await peer.read_error() == over_grpc
    assert over_grpc[0] == INVALID_ARGUMENT.value[0]
    assert over_grpc[1].startswith("malformed kvstore.v1.GetBlocksRequest: ")


async def test_bad_first_put_messages_are_answered_alike_on_both_transports(
    server: RunningServer,
    channel: grpc.aio.Channel,
    connect_peer: ConnectPeer,
    make_namespace: MakeNamespace,
) -> None:
    namespace = wire_namespace(make_namespace).SerializeToString()
    blocks = [(b"new", b"")]
    cases = [
        (
            encode_put_header(checksum_kind=1, blocks=blocks),
            "namespace is required in the first message of a put",
        ),
        (
            encode_put_header(namespace=GARBAGE, checksum_kind=1, blocks=blocks),
            "malformed namespace: ",
        ),
        (
            encode_put_header(namespace=namespace + UNKNOWN_FIELD, checksum_kind=1, blocks=blocks),
            "namespace has unknown field number(s) [99]",
        ),
        (
            encode_put_header(namespace=namespace, checksum_kind=1, blocks=blocks) + UNKNOWN_FIELD,
            "unknown field number 99",
        ),
    ]
    for raw, fragment in cases:
        over_grpc = await grpc_put_error(channel, raw)
        peer = await connect_peer(server)
        await peer.send(FrameKind.PUT, raw)
        await peer.send(FrameKind.PUT_END)
        assert await peer.read_error() == over_grpc
        assert over_grpc[0] == INVALID_ARGUMENT.value[0]
        assert fragment in over_grpc[1]
    assert server.store.report().tiers[0].num_blocks == 0


def test_open_keyed_request_returns_the_request_namespace_and_keys(
    make_namespace: MakeNamespace,
) -> None:
    wire = wire_namespace(make_namespace)
    request = pb.PinRequest(namespace=wire, keys=[b"a", b"b"], ttl_ms=5)
    opened, namespace, keys = open_keyed_request(request, MAX_KEYS)
    assert opened is request
    assert namespace_to_wire(namespace) == wire
    assert keys == [b"a", b"b"]
    # Only a lookup may name no block.
    lookup = pb.LookupPrefixRequest(namespace=wire)
    assert open_keyed_request(lookup, MAX_KEYS, allow_empty=True)[2] == []


def test_a_request_that_does_not_parse_is_rejected_when_opened() -> None:
    parsed = parse_request(pb.PinRequest, GARBAGE)
    assert isinstance(parsed, MalformedRequest)
    with pytest.raises(InvalidRequest, match=r"^malformed kvstore\.v1\.PinRequest: "):
        open_keyed_request(parsed, MAX_KEYS)
