"""Replies from a newer (or broken) server, over real sockets on both paths.

A raw grpc.aio server (generic handlers, bytes in and out) and a raw data-plane server
answer a get with hand-made GetBlocksResponse bytes: one with fields this client does
not know (read fine, as protobuf would), and one that is not a message at all
(ProtocolError, not gRPC's vague INTERNAL).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
import torch

from kvstore.checksum import ChecksumKind, checksums_of_slices
from kvstore.client import (
    ClientOptions,
    DType,
    Internal,
    KVClient,
    KVForm,
    KVLayout,
    Namespace,
    ProtocolError,
    Unknown,
)
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import GET_RUNS, encode_get_header, run_parts
from kvstore.wire.frames import HEADER, VERSION, FrameKind

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=4)
NS = Namespace(tenant="acme", model_fingerprint="toy", layout=LAYOUT)
BLOCK = bytes(range(LAYOUT.block_bytes))
# Field 99 (varint 7) and field 100 (8 bytes): nothing this client knows.
UNKNOWN_FIELDS = b"\x98\x06\x07" + b"\xa2\x06\x08" + b"newer-fi"
MALFORMED = b"\x32\xff"  # GET_RUNS, then a length varint cut short


def reply_with_unknown_fields() -> bytes:
    checksums = checksums_of_slices(ChecksumKind.XXH3_64, memoryview(BLOCK), LAYOUT.layer_bytes)
    header = encode_get_header(
        checksum_kind=ChecksumKind.XXH3_64.value,
        block_bytes=LAYOUT.block_bytes,
        num_blocks=1,
        tiers=[pb.DRAM],
    )
    return UNKNOWN_FIELDS + header + b"".join(run_parts(GET_RUNS, 0, 0, checksums, [BLOCK]))


class RawServers:
    """A gRPC server and a data plane that answer every get with `replies`."""

    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.put_done = b""  # what a data-plane put is answered with
        self.num_data_plane_gets = 0
        self.grpc_port = 0
        self.data_port = 0

    async def _get_blocks(self, request: bytes, context: object) -> AsyncIterator[bytes]:
        for reply in self.replies:
            yield reply

    async def _get_data_plane(self, request: bytes, context: object) -> bytes:
        return pb.DataPlaneResponse(port=self.data_port, version=VERSION).SerializeToString()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "kvstore.v1.KVStore",
            {
                "GetBlocks": grpc.unary_stream_rpc_method_handler(self._get_blocks),
                "GetDataPlane": grpc.unary_unary_rpc_method_handler(self._get_data_plane),
            },
        )

    async def serve_data_plane(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
                payload = await reader.readexactly(length)
                if kind == FrameKind.HELLO:
                    writer.write(HEADER.pack(FrameKind.HELLO, len(payload)) + payload)
                elif kind == FrameKind.GET:
                    self.num_data_plane_gets += 1
                    for reply in self.replies:
                        writer.write(HEADER.pack(FrameKind.GET_DATA, len(reply)) + reply)
                    writer.write(HEADER.pack(FrameKind.GET_END, 0))
                elif kind == FrameKind.PUT_END:
                    done = self.put_done
                    writer.write(HEADER.pack(FrameKind.PUT_DONE, len(done)) + done)
                await writer.drain()
        writer.close()


@pytest.fixture
async def servers() -> AsyncIterator[RawServers]:
    raw = RawServers()
    data_plane = await asyncio.start_server(raw.serve_data_plane, "127.0.0.1", 0)
    raw.data_port = data_plane.sockets[0].getsockname()[1]
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((raw.handler(),))
    raw.grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield raw
    await server.stop(None)
    data_plane.close()
    await data_plane.wait_closed()


@pytest.fixture(params=["grpc", "data-plane"])
async def client(servers: RawServers, request: pytest.FixtureRequest) -> AsyncIterator[KVClient]:
    options = ClientOptions(data_plane=request.param == "data-plane")
    async with KVClient(f"127.0.0.1:{servers.grpc_port}", NS, options=options) as client:
        yield client
    expected_gets = 1 if options.data_plane else 0
    assert servers.num_data_plane_gets == expected_gets, "the get took the path under test"


async def test_a_reply_with_unknown_fields_is_read(servers: RawServers, client: KVClient) -> None:
    servers.replies = [reply_with_unknown_fields()]
    dest = torch.zeros((1, 1, *LAYOUT.layer_shape), dtype=torch.float16)
    assert await client.get_into([b"key-0"], dest, form=KVForm.BLOCKS) == 1
    assert bytes(dest.view(torch.uint8).flatten().tolist()) == BLOCK


async def test_a_malformed_reply_raises_protocol_error(
    servers: RawServers, client: KVClient
) -> None:
    servers.replies = [MALFORMED]
    dest = torch.zeros((1, 1, *LAYOUT.layer_shape), dtype=torch.float16)
    with pytest.raises(ProtocolError, match=r"the server's reply is malformed: .*varint") as caught:
        await client.get_into([b"key-0"], dest, form=KVForm.BLOCKS)
    assert isinstance(caught.value, Internal)
    assert caught.value.code is grpc.StatusCode.INTERNAL


async def test_a_malformed_put_answer_on_the_data_plane_is_a_client_error(
    servers: RawServers,
) -> None:
    servers.put_done = MALFORMED
    options = ClientOptions(data_plane=True)
    async with KVClient(f"127.0.0.1:{servers.grpc_port}", NS, options=options) as client:
        kv = torch.zeros((1, 1, *LAYOUT.layer_shape), dtype=torch.float16)
        with pytest.raises(Unknown, match="PutBlocksResponse that does not parse"):
            await client.put_blocks([b"key-0"], kv)
