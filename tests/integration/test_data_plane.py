"""The TCP data plane (kvstore.wire.frames, kvstore.server.dataplane) against the real server
on 127.0.0.1: transfers through it, the fall back to gRPC, bad input from raw sockets,
reclaiming abandoned transfers, drains, and its configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from raw_data_plane import HELLO, Raw, frame  # tests/raw_data_plane.py

import kvstore.mover
import kvstore.put
import kvstore.server.dataplane
from kvstore.checksum import ChecksumKind, checksum
from kvstore.client import (
    ClientOptions,
    DeadlineExceeded,
    DType,
    KVClient,
    KVForm,
    KVLayout,
    Namespace,
    PutOutcome,
    StoreStats,
    Timeouts,
    Unavailable,
)
from kvstore.client._dataplane import DataPlanePool, DataPlaneUnreachable
from kvstore.errors import InvalidRequest
from kvstore.server import RunningServer
from kvstore.server.config import add_config_arguments, config_from_args, load_config
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire.chunks import (
    PUT_RUNS,
    chunk_parts,
    decode_get_message,
    encode_put_header,
    run_parts,
    tailed_run_message,
)
from kvstore.wire.frames import HEADER, TAIL_PREFIX, FrameKind
from kvstore.wire.namespace import namespace_to_wire

MiB = 1 << 20
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=16)
NS = Namespace(tenant="acme", model_fingerprint="toy", layout=LAYOUT)
# Big blocks (4 MiB: 4 layers of 1 MiB), for gets that outlast the sockets' buffers.
BIG = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, dtype=DType.FLOAT16, block_tokens=256)
BIG_NS = Namespace(tenant="acme", model_fingerprint="big", layout=BIG)
SEED_KEYS = [b"seed-0", b"seed-1", b"seed-2"]
INVALID_ARGUMENT, RESOURCE_EXHAUSTED = 3, 8

ServerFactory = Callable[..., Awaitable[RunningServer]]
MakeKV = Callable[..., torch.Tensor]
SameBytes = Callable[[torch.Tensor, torch.Tensor], bool]
Poll = Callable[..., Awaitable[None]]
_fresh_keys = itertools.count()


def data_client(target: str, namespace: Namespace = NS, **options: Any) -> KVClient:
    return KVClient(target, namespace, options=ClientOptions(data_plane=True, **options))


def grpc_client(target: str, namespace: Namespace = NS, **options: Any) -> KVClient:
    return KVClient(target, namespace, options=ClientOptions(data_plane=False, **options))


def server_target(running: RunningServer) -> str:
    return f"127.0.0.1:{running.port}"


def transfers(running: RunningServer) -> int:
    assert running.data_plane is not None
    return running.data_plane.transfers


async def dram_used(client: KVClient) -> int:
    (tier,) = [tier for tier in (await client.stats()).tiers if tier.tier == pb.DRAM]
    return int(tier.used_bytes)


# -- a raw data-plane connection: frames written by hand -----------------------------------------


async def put_get_and_iterate(client: KVClient, prefix: bytes, kv: torch.Tensor) -> None:
    """Put `kv`'s blocks under fresh keys, then get them back whole and layer by layer."""
    keys = [prefix + b"%d" % i for i in range(len(kv))]
    assert (await client.put_blocks(keys, kv)).num_committed == len(keys)
    dest = torch.zeros_like(kv)
    assert await client.get_into(keys, dest, form=KVForm.BLOCKS) == len(keys)
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))
    layers = [arrival.layer async for arrival in client.iter_layers(keys)]
    assert layers == list(range(LAYOUT.num_layers))


class RawConnection(Raw):
    """A plain TCP socket to the data port; frames are packed here, not by kvstore.wire.frames."""

    @classmethod
    async def open_port(cls, port: int, *, hello: bool = True) -> RawConnection:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        connection = cls(sock)
        await connection.loop.sock_connect(sock, ("127.0.0.1", port))
        if hello:
            await connection.send(frame(FrameKind.HELLO, HELLO))
            assert await connection.read_frame() == (FrameKind.HELLO, HELLO)
        return connection

    async def closed_by_server(self) -> bool:
        """Whether the server hangs up (end of stream, or a reset) within 5 s."""
        try:
            async with asyncio.timeout(5):
                return await self.loop.sock_recv(self.sock, 1) == b""
        except ConnectionResetError:
            return True

    async def read_until_closed(self) -> bytes:
        """All the server sends until it hangs up; TimeoutError if it has not in 5 s."""
        received = bytearray()
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(5):
                while chunk := await self.loop.sock_recv(self.sock, 1 << 20):
                    received += chunk
        return bytes(received)

    def close(self) -> None:
        self.sock.close()


def wire_ns(namespace: Namespace = NS) -> bytes:
    return namespace_to_wire(namespace).SerializeToString()


def put_payload(
    keys: list[bytes],
    kv: torch.Tensor | None,
    *,
    layers: range = range(LAYOUT.num_layers),
    corrupt: bool = False,
) -> bytes:
    """A PutBlocksRequest as the client encodes one (kvstore.wire.chunks): the namespace,
    `keys` declared as a chain, then one LayerChunk per block and layer of `kv` (blocks
    form) with its xxh3 checksum; `corrupt` flips the first checksum."""
    parts: list[bytes | memoryview] = [
        encode_put_header(
            namespace=wire_ns(),
            checksum_kind=ChecksumKind.XXH3_64.value,
            blocks=[(key, keys[index - 1] if index else b"") for index, key in enumerate(keys)],
        )
    ]
    if kv is not None:
        for block in range(len(keys)):
            for layer in layers:
                data = kv[block, layer].contiguous().view(torch.uint8).numpy().tobytes()
                layer_sum = checksum(ChecksumKind.XXH3_64, data)
                if corrupt and not block and layer == layers[0]:
                    layer_sum ^= 1
                parts += chunk_parts(4, block, layer, 0, layer_sum, [data])
    return b"".join(bytes(part) for part in parts)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
async def client(target: str) -> AsyncIterator[KVClient]:
    async with data_client(target) as data_plane_client:
        yield data_plane_client


@dataclass
class Seed:
    """Blocks stored before the bad input, and the means to check the server afterwards."""

    server: RunningServer
    client: KVClient
    kv: torch.Tensor
    used_bytes: int
    make_kv: MakeKV

    @property
    def port(self) -> int:
        return self.server.servicer.data_plane_port

    async def assert_serving(self) -> None:
        """Nothing leaked, the seeded blocks are unchanged, and a new put and get work."""
        assert await dram_used(self.client) == self.used_bytes, "bad input leaked pages"
        assert (await self.client.lookup_keys(SEED_KEYS)).num_matched == len(SEED_KEYS)
        dest = torch.zeros_like(self.kv)
        assert await self.client.get_into(SEED_KEYS, dest, form=KVForm.BLOCKS) == len(SEED_KEYS)
        assert torch.equal(dest.view(torch.uint8), self.kv.view(torch.uint8))

        before = transfers(self.server)
        key = b"fresh-%d" % next(_fresh_keys)
        kv = self.make_kv(LAYOUT, 1, form=KVForm.BLOCKS, seed=5)
        assert (await self.client.put_blocks([key], kv)).num_committed == 1
        got = torch.zeros_like(kv)
        assert await self.client.get_into([key], got, form=KVForm.BLOCKS) == 1
        assert torch.equal(got.view(torch.uint8), kv.view(torch.uint8))
        assert transfers(self.server) == before + 2, "the check itself used the data plane"
        self.used_bytes = await dram_used(self.client)


@pytest.fixture
async def seed(server: RunningServer, client: KVClient, make_kv: MakeKV) -> Seed:
    kv = make_kv(LAYOUT, len(SEED_KEYS), form=KVForm.BLOCKS, seed=11)
    assert (await client.put_blocks(SEED_KEYS, kv)).num_committed == len(SEED_KEYS)
    return Seed(server, client, kv, await dram_used(client), make_kv)


# -- transfers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="layer-runs"),
        # Layers larger than a chunk: LayerChunks, several PUT and GET_DATA frames.
        pytest.param({"chunk_bytes": 4096}, id="chunks"),
    ],
)
async def test_put_and_get_go_over_the_data_plane(
    options: dict[str, Any],
    server: RunningServer,
    target: str,
    make_kv: MakeKV,
    same_bytes: SameBytes,
) -> None:
    lay = KVLayout(num_layers=3, num_kv_heads=2, head_dim=64, dtype=DType.BFLOAT16, block_tokens=32)
    namespace = Namespace(tenant="acme", model_fingerprint="dp", layout=lay)
    async with data_client(target, namespace, **options) as client:
        assert client.data_plane is None, "not asked for before the first transfer"
        before = transfers(server)
        tokens = list(range(4 * lay.block_tokens + 3))
        kv = make_kv(lay, 4, extra_tokens=3, seed=1)
        result = await client.put(tokens, kv)
        assert result.outcomes == (PutOutcome.COMMITTED,) * 4
        assert transfers(server) == before + 1
        assert client.data_plane == f"127.0.0.1:{server.servicer.data_plane_port}"

        match = await client.lookup(tokens)
        assert match.num_matched == 4
        dest = torch.zeros_like(kv)
        assert await client.get_into(match, dest) == 4
        full = 4 * lay.block_tokens
        assert same_bytes(dest[:, :, :full], kv[:, :, :full])
        assert not dest[:, :, full:].view(torch.uint8).any()
        assert transfers(server) == before + 2

        # put_blocks and a second get, on the pooled connection.
        keys = [b"blk-%d" % i for i in range(3)]
        blocks = make_kv(lay, 3, form=KVForm.BLOCKS, seed=2)
        assert (await client.put_blocks(keys, blocks)).num_committed == 3
        got = torch.zeros_like(blocks)
        assert await client.get_into(keys, got, form=KVForm.BLOCKS) == 3
        assert same_bytes(got, blocks)
        assert transfers(server) == before + 4


async def test_grpc_only_client_leaves_the_data_plane_alone(
    server: RunningServer, target: str, make_kv: MakeKV
) -> None:
    before = transfers(server)
    async with grpc_client(target) as client:
        await put_get_and_iterate(client, b"g-", make_kv(LAYOUT, 3, form=KVForm.BLOCKS, seed=3))
        assert client.data_plane is None
    assert transfers(server) == before


async def test_layer_put_and_iter_layers_over_the_data_plane(
    server: RunningServer, client: KVClient, make_kv: MakeKV, same_bytes: SameBytes
) -> None:
    keys = [b"layered-%d" % i for i in range(3)]
    blocks = make_kv(LAYOUT, 3, form=KVForm.BLOCKS, seed=4)
    before = transfers(server)
    async with client.layer_put(keys) as put:
        for layer in range(LAYOUT.num_layers):
            await put.send_layer(layer, blocks[:, layer])
    assert put.result is not None
    assert put.result.num_committed == 3
    assert transfers(server) == before + 1

    arrivals = [arrival async for arrival in client.iter_layers(keys)]
    assert [arrival.layer for arrival in arrivals] == [0, 1]
    for arrival in arrivals:
        assert arrival.num_blocks == 3
        assert same_bytes(arrival.kv, blocks[:, arrival.layer])
    assert transfers(server) == before + 2


async def test_get_data_plane_reports_the_bound_port(
    server: RunningServer, stub: pb_grpc.KVStoreStub
) -> None:
    reply = await stub.GetDataPlane(pb.DataPlaneRequest(), timeout=5)
    assert reply.version == 4
    assert reply.port == server.servicer.data_plane_port != 0
    assert server.data_plane is not None
    raw = await RawConnection.open_port(reply.port)  # something speaks HELLO there
    raw.close()


async def test_a_configured_data_port_is_used(
    server_factory: ServerFactory, make_kv: MakeKV, same_bytes: SameBytes
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = await server_factory(data_port=port)
    assert running.servicer.data_plane_port == port
    async with data_client(f"127.0.0.1:{running.port}") as client:
        kv = make_kv(LAYOUT, 1, form=KVForm.BLOCKS)
        assert (await client.put_blocks([b"p"], kv)).num_committed == 1
        assert client.data_plane == f"127.0.0.1:{port}"
    assert transfers(running) == 1


async def test_server_without_a_data_plane_serves_over_grpc(
    server_factory: ServerFactory, make_kv: MakeKV
) -> None:
    running = await server_factory(data_port=-1)
    assert running.data_plane is None
    target = f"127.0.0.1:{running.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await pb_grpc.KVStoreStub(channel).GetDataPlane(pb.DataPlaneRequest(), timeout=5)
    assert reply.port == 0

    async with data_client(target) as client:
        await put_get_and_iterate(client, b"n-", make_kv(LAYOUT, 3, form=KVForm.BLOCKS, seed=6))
        assert client.data_plane is None


async def test_clients_fall_back_to_grpc_when_the_data_plane_stops_listening(
    server_factory: ServerFactory, make_kv: MakeKV, same_bytes: SameBytes
) -> None:
    running = await server_factory()
    target = f"127.0.0.1:{running.port}"
    kv = make_kv(LAYOUT, 2, form=KVForm.BLOCKS, seed=7)
    async with data_client(target) as pooled:
        assert (await pooled.put_blocks([b"a0", b"a1"], kv)).num_committed == 2
        assert pooled.data_plane is not None
        assert transfers(running) == 1

        assert running.data_plane is not None
        await running.data_plane.drain(0)  # the data plane only; gRPC keeps serving

        # A client that never reached the data plane, and one whose pooled connection
        # the server has just closed: both put and get over gRPC.
        async with data_client(target) as fresh:
            assert (await fresh.put_blocks([b"b0", b"b1"], kv)).num_committed == 2
            dest = torch.zeros_like(kv)
            assert await fresh.get_into([b"a0", b"a1"], dest, form=KVForm.BLOCKS) == 2
            assert same_bytes(dest, kv)
            assert fresh.data_plane is None
        assert (await pooled.put_blocks([b"c0", b"c1"], kv)).num_committed == 2
        dest = torch.zeros_like(kv)
        assert await pooled.get_into([b"b0", b"b1"], dest, form=KVForm.BLOCKS) == 2
        assert same_bytes(dest, kv)
        assert pooled.data_plane is None
    assert transfers(running) == 1


# -- bad input from raw sockets -------------------------------------------------------------------

GARBAGE = b"\x0a\xff\xff\xff\xff\x0f"  # a namespace field claiming 4 GiB
DECLARE_NEW = encode_put_header(namespace=wire_ns(), checksum_kind=1, blocks=[(b"new", b"")])

BAD_FRAMES: list[tuple[str, bool, bytes, int, str]] = [
    # (name, HELLO first, what is sent next, status code, fragment of the message)
    ("put-before-hello", False, frame(FrameKind.PUT, DECLARE_NEW), INVALID_ARGUMENT, "HELLO"),
    ("wrong-magic", False, frame(FrameKind.HELLO, b"KVDQ\x01\x00"), INVALID_ARGUMENT, "HELLO"),
    ("wrong-version", False, frame(FrameKind.HELLO, b"KVDP\x09\x00"), INVALID_ARGUMENT, "HELLO"),
    # Version 1 knew no DEADLINE frame: its clients must not be served by this one.
    ("version-1", False, frame(FrameKind.HELLO, b"KVDP\x01\x00"), INVALID_ARGUMENT, "version"),
    ("short-deadline", True, frame(FrameKind.DEADLINE, b"\x01\x02"), INVALID_ARGUMENT, "DEADLINE"),
    ("empty-hello", False, frame(FrameKind.HELLO), INVALID_ARGUMENT, "HELLO"),
    ("unknown-kind", True, frame(99), INVALID_ARGUMENT, "not kind 99"),
    ("put-end-first", True, frame(FrameKind.PUT_END), INVALID_ARGUMENT, "PUT or GET"),
    ("hello-twice", True, frame(FrameKind.HELLO, HELLO), INVALID_ARGUMENT, "PUT or GET"),
    ("server-kind", True, frame(FrameKind.GET_DATA, b""), INVALID_ARGUMENT, "PUT or GET"),
    ("malformed-put", True, frame(FrameKind.PUT, GARBAGE), INVALID_ARGUMENT, "malformed"),
    (
        "empty-put",
        True,
        frame(FrameKind.PUT) + frame(FrameKind.PUT_END),
        INVALID_ARGUMENT,
        "namespace",
    ),
    (
        "put-interrupted-by-get",
        True,
        frame(FrameKind.PUT, DECLARE_NEW) + frame(FrameKind.GET, b""),
        INVALID_ARGUMENT,
        "PUT_END",
    ),
    (
        "incomplete-put",
        True,
        frame(FrameKind.PUT, DECLARE_NEW) + frame(FrameKind.PUT_END),
        INVALID_ARGUMENT,
        "incomplete",
    ),
    ("malformed-get", True, frame(FrameKind.GET, GARBAGE), INVALID_ARGUMENT, "malformed"),
    ("tail-frame-too-short", True, frame(FrameKind.PUT_TAIL, b"\x01"), INVALID_ARGUMENT, "short"),
    (
        "tail-past-the-frame",
        True,
        frame(FrameKind.PUT_TAIL, TAIL_PREFIX.pack(100) + DECLARE_NEW),
        INVALID_ARGUMENT,
        "before its tail",
    ),
    (
        "tail-inside-the-declarations",  # the tail is not a run's data
        True,
        frame(FrameKind.PUT_TAIL, TAIL_PREFIX.pack(len(DECLARE_NEW) - 3) + DECLARE_NEW),
        INVALID_ARGUMENT,
        "PUT_TAIL",
    ),
    (
        "tail-empty",  # a message with no tail is a PUT, and nothing of it is applied
        True,
        frame(FrameKind.PUT_TAIL, TAIL_PREFIX.pack(len(DECLARE_NEW)) + DECLARE_NEW),
        INVALID_ARGUMENT,
        "no tail",
    ),
    (
        "get-without-keys",
        True,
        frame(
            FrameKind.GET,
            pb.GetBlocksRequest(namespace=pb.Namespace.FromString(wire_ns())).SerializeToString(),
        ),
        INVALID_ARGUMENT,
        "keys is empty",
    ),
]


@pytest.mark.parametrize(
    ("hello", "data", "code", "fragment"),
    [
        pytest.param(hello, data, code, fragment, id=name)
        for name, hello, data, code, fragment in BAD_FRAMES
    ],
)
async def test_bad_frames_get_an_error_and_nothing_else_changes(
    hello: bool, data: bytes, code: int, fragment: str, seed: Seed
) -> None:
    raw = await RawConnection.open_port(seed.port, hello=hello)
    try:
        await raw.send(data)
        received_code, message = await raw.read_error()
        assert received_code == code, message
        assert fragment in message
        assert await raw.closed_by_server()
    finally:
        raw.close()
    assert (await seed.client.lookup_keys([b"new"])).num_matched == 0
    await seed.assert_serving()


async def test_a_frame_over_the_message_limit_is_resource_exhausted(seed: Seed) -> None:
    limit = seed.server.config.limits.max_message_bytes
    raw = await RawConnection.open_port(seed.port)
    try:
        # Only the header: the server must answer without waiting for the payload.
        await raw.send(struct.pack("<BI", FrameKind.PUT, limit + 1))
        code, message = await raw.read_error()
        assert code == RESOURCE_EXHAUSTED, message
        assert str(limit) in message
        assert await raw.closed_by_server()
    finally:
        raw.close()
    await seed.assert_serving()


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x00" * 64, id="zeros"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http1"),
        # A gRPC client pointed at the data port: bytes 1-4 read as a 700 MB length.
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="http2-preface"),
    ],
)
async def test_garbage_instead_of_hello_is_told_to_send_hello(garbage: bytes, seed: Seed) -> None:
    raw = await RawConnection.open_port(seed.port, hello=False)
    try:
        await raw.send(garbage)
        code, message = await raw.read_error()
        assert code == INVALID_ARGUMENT, message
        assert "HELLO" in message
        assert await raw.closed_by_server()
    finally:
        raw.close()
    await seed.assert_serving()


async def test_bad_checksum_gets_the_status_grpc_gives(
    seed: Seed, channel: grpc.aio.Channel, make_kv: MakeKV
) -> None:
    kv = make_kv(LAYOUT, 1, form=KVForm.BLOCKS, seed=8)
    bad = put_payload([b"new"], kv, corrupt=True)
    good = put_payload([b"new"], kv)
    failures = (await seed.client.stats()).checksum_failures

    async def once() -> AsyncIterator[bytes]:
        yield bad

    with pytest.raises(grpc.aio.AioRpcError) as over_grpc:
        await channel.stream_unary("/kvstore.v1.KVStore/PutBlocks")(once(), timeout=5)
    assert over_grpc.value.code() == grpc.StatusCode.DATA_LOSS

    raw = await RawConnection.open_port(seed.port)
    try:
        await raw.send(frame(FrameKind.PUT, bad) + frame(FrameKind.PUT_END))
        code, message = await raw.read_error()
        assert code == over_grpc.value.code().value[0], message
        assert "checksum" in message
        assert await raw.closed_by_server()
    finally:
        raw.close()
    assert (await seed.client.stats()).checksum_failures == failures + 2
    assert (await seed.client.lookup_keys([b"new"])).num_matched == 0
    await seed.assert_serving()

    # The same put with the right checksums is stored: the bad one failed for its checksum.
    raw = await RawConnection.open_port(seed.port)
    try:
        await raw.send(frame(FrameKind.PUT, good) + frame(FrameKind.PUT_END))
        kind, payload = await raw.read_frame()
        assert kind == FrameKind.PUT_DONE
        assert pb.PutBlocksResponse.FromString(payload).num_committed == 1
    finally:
        raw.close()


async def test_raw_put_and_get_follow_the_documented_frames(
    seed: Seed, make_kv: MakeKV, same_bytes: SameBytes
) -> None:
    """The protocol as kvstore.wire.frames's docstring draws it, spoken by hand."""
    kv = make_kv(LAYOUT, 2, form=KVForm.BLOCKS, seed=9)
    keys = [b"raw-0", b"raw-1"]
    raw = await RawConnection.open_port(seed.port)
    try:
        first = put_payload(keys, kv, layers=range(1))  # declarations and layer 0
        rest = b""  # layer 1 in a second message: LayerChunks, no namespace
        for block in range(2):
            data = kv[block, 1].contiguous().view(torch.uint8).numpy().tobytes()
            layer_sum = checksum(ChecksumKind.XXH3_64, data)
            rest += b"".join(bytes(part) for part in chunk_parts(4, block, 1, 0, layer_sum, [data]))
        await raw.send(frame(FrameKind.PUT, first) + frame(FrameKind.PUT, rest))
        await raw.send(frame(FrameKind.PUT_END))
        kind, payload = await raw.read_frame()
        assert kind == FrameKind.PUT_DONE
        assert pb.PutBlocksResponse.FromString(payload).num_committed == 2

        # A second transfer on the same connection: a get.
        request = pb.GetBlocksRequest(namespace=pb.Namespace.FromString(wire_ns()), keys=keys)
        await raw.send(frame(FrameKind.GET, request.SerializeToString()))
        got = torch.zeros_like(kv)
        flat = got.view(torch.uint8).reshape(-1)

        def place(block: int, layer: int, offset: int, data: memoryview) -> None:
            start = (block * LAYOUT.num_layers + layer) * LAYOUT.layer_bytes + offset
            flat[start : start + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)

        while True:
            kind, payload = await raw.read_frame()
            if kind == FrameKind.GET_END:
                break
            assert kind == FrameKind.GET_DATA
            message = decode_get_message(payload)
            for run in message.runs:
                size = LAYOUT.layer_bytes
                for index in range(run.num_blocks):
                    data = run.data[index * size : (index + 1) * size]
                    place(run.first_block + index, run.layer, 0, data)
            for chunk in message.chunks:
                place(chunk.block_index, chunk.layer, chunk.offset, chunk.data)
        assert same_bytes(got, kv)
    finally:
        raw.close()
    used = await dram_used(seed.client)
    assert used >= seed.used_bytes + 2 * LAYOUT.block_bytes
    seed.used_bytes = used
    await seed.assert_serving()


async def test_a_get_of_blocks_in_memory_is_one_message_with_a_run_per_layer(seed: Seed) -> None:
    """The data plane's GET_DATA frames carry as many runs as fit, as gRPC's messages do
    (tests/integration/test_ssd_streaming.py): three small blocks of two layers are one
    frame, layer 0's run then layer 1's."""
    raw = await RawConnection.open_port(seed.port)
    try:
        request = pb.GetBlocksRequest(namespace=pb.Namespace.FromString(wire_ns()), keys=SEED_KEYS)
        await raw.send(frame(FrameKind.GET, request.SerializeToString()))
        kind, payload = await raw.read_frame()
        assert kind == FrameKind.GET_DATA
        message = decode_get_message(payload)
        assert [(run.layer, run.num_blocks) for run in message.runs] == [
            (layer, len(SEED_KEYS)) for layer in range(LAYOUT.num_layers)
        ]
        assert await raw.read_frame() == (FrameKind.GET_END, b"")
    finally:
        raw.close()


# -- reclaiming ----------------------------------------------------------------------------------


async def abandon_put(seed: Seed, sent: bytes, keys: list[bytes], poll: Poll) -> None:
    """Start a put of two blocks `keys` with `sent`, wait until the server has reserved
    their room, hang up mid-put, and check that it is all reclaimed."""
    before = await seed.client.stats()
    raw = await RawConnection.open_port(seed.port)
    try:
        await raw.send(sent)

        async def reserved() -> bool:
            return await dram_used(seed.client) >= seed.used_bytes + 2 * LAYOUT.block_bytes

        await poll(reserved)
    finally:
        raw.close()  # the writer goes away mid-put
    await assert_reclaimed(seed, before, keys, poll)


async def assert_reclaimed(seed: Seed, before: StoreStats, keys: list[bytes], poll: Poll) -> None:
    """The put of `keys` that was abandoned after `before` is counted and freed, none of
    its blocks is stored, and the server serves as before."""

    async def reclaimed() -> bool:
        stats = await seed.client.stats()
        return stats.puts_abandoned == before.puts_abandoned + 1 and (
            await dram_used(seed.client) == seed.used_bytes
        )

    await poll(reclaimed)
    assert (await seed.client.lookup_keys(keys)).num_matched == 0
    await seed.assert_serving()


async def test_an_abandoned_raw_put_is_reclaimed(seed: Seed, make_kv: MakeKV, poll: Poll) -> None:
    keys = [b"doomed-0", b"doomed-1"]
    kv = make_kv(LAYOUT, 2, form=KVForm.BLOCKS, seed=10)
    await abandon_put(
        seed, frame(FrameKind.PUT, put_payload(keys, kv, layers=range(1))), keys, poll
    )


# -- PUT_TAIL: a run's data received where it is stored ------------------------------------------


def tail_frames(keys: list[bytes], kv: torch.Tensor, *, corrupt_layer: int | None = None) -> bytes:
    """A put of `keys` (a chain) as kvstore's client sends it over TCP: one PUT_TAIL frame
    per layer, the first with the namespace and declarations, each carrying a run of
    that layer of every block, whose data is the frame's tail. `corrupt_layer`: that
    layer's first checksum is wrong."""
    head: list[bytes | memoryview] = [
        encode_put_header(
            namespace=wire_ns(),
            checksum_kind=ChecksumKind.XXH3_64.value,
            blocks=[(key, keys[index - 1] if index else b"") for index, key in enumerate(keys)],
        )
    ]
    frames = b""
    for layer in range(LAYOUT.num_layers):
        layers = [
            kv[block, layer].contiguous().view(torch.uint8).numpy().tobytes()
            for block in range(len(keys))
        ]
        checksums = [checksum(ChecksumKind.XXH3_64, data) for data in layers]
        if layer == corrupt_layer:
            checksums[0] ^= 1
        message = tailed_run_message(
            head if layer == 0 else [], run_parts(PUT_RUNS, layer, 0, checksums, [b"".join(layers)])
        )
        encoded = b"".join(bytes(part) for part in message)
        before_tail = len(encoded) - message.tail_bytes
        frames += frame(FrameKind.PUT_TAIL, TAIL_PREFIX.pack(before_tail) + encoded)
    return frames


def first_frame_of(frames: bytes) -> bytes:
    """The first of `frames` (whole frames back to back), header and payload."""
    _, length = HEADER.unpack_from(frames)
    return frames[: HEADER.size + length]


async def put_by_tails(seed: Seed, keys: list[bytes], kv: torch.Tensor) -> pb.PutBlocksResponse:
    """`tail_frames` of `keys` and PUT_END on a raw connection; the PUT_DONE reply."""
    raw = await RawConnection.open_port(seed.port)
    try:
        await raw.send(tail_frames(keys, kv) + frame(FrameKind.PUT_END))
        kind, payload = await raw.read_frame()
        assert kind == FrameKind.PUT_DONE, payload
        return pb.PutBlocksResponse.FromString(payload)
    finally:
        raw.close()


async def assert_stored(seed: Seed, keys: list[bytes], kv: torch.Tensor) -> None:
    got = torch.zeros_like(kv)
    assert await seed.client.get_into(keys, got, form=KVForm.BLOCKS) == len(keys)
    assert torch.equal(got.view(torch.uint8), kv.view(torch.uint8))


@pytest.fixture
def landed_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The runs the in-process server received in place (PutSession.land_run), by size."""
    landed: list[int] = []
    land_run = kvstore.put.PutSession.land_run

    def counted(session: kvstore.put.PutSession, *args: Any) -> None:
        landed.append(args[1])  # num_blocks
        land_run(session, *args)

    monkeypatch.setattr(kvstore.put.PutSession, "land_run", counted)
    return landed


async def test_put_tail_frames_land_in_place_and_read_back(
    seed: Seed, make_kv: MakeKV, landed_runs: list[int]
) -> None:
    keys = [b"tail-0", b"tail-1", b"tail-2"]
    kv = make_kv(LAYOUT, len(keys), form=KVForm.BLOCKS, seed=21)
    assert (await put_by_tails(seed, keys, kv)).num_committed == len(keys)
    assert landed_runs == [len(keys)] * LAYOUT.num_layers  # no run went through a buffer
    await assert_stored(seed, keys, kv)

    # Sent again, the blocks are already stored: each tail is read into a buffer and
    # checked, not written over the stored bytes.
    reply = await put_by_tails(seed, keys, kv)
    assert list(reply.outcomes) == [pb.ALREADY_PRESENT] * len(keys)
    assert len(landed_runs) == LAYOUT.num_layers
    await assert_stored(seed, keys, kv)


async def test_a_long_run_lands_in_place_and_is_checked_a_step_at_a_time(
    seed: Seed, make_kv: MakeKV, landed_runs: list[int]
) -> None:
    keys = [b"long-tail-%d" % index for index in range(70)]
    kv = make_kv(LAYOUT, len(keys), form=KVForm.BLOCKS, seed=26)
    assert (await put_by_tails(seed, keys, kv)).num_committed == len(keys)
    assert landed_runs == [64, 6] * LAYOUT.num_layers
    await assert_stored(seed, keys, kv)


# 32 KiB layers: the smallest the client sends as PUT_TAIL (client/_send.py).
WIDE = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=DType.FLOAT16, block_tokens=64)
WIDE_NS = Namespace(tenant="acme", model_fingerprint="wide", layout=WIDE)


@pytest.mark.parametrize(
    ("layout", "in_place"), [(WIDE, True), (LAYOUT, False)], ids=["32KiB", "1KiB"]
)
async def test_the_client_sends_runs_of_large_layers_to_be_received_in_place(
    server_factory: ServerFactory,
    make_kv: MakeKV,
    landed_runs: list[int],
    layout: KVLayout,
    in_place: bool,
) -> None:
    """Puts and layer puts over TCP: runs of layers of 32 KiB and more land in place; runs
    of smaller layers travel as PUT frames (cheaper to copy than to scatter into). The
    bytes come back either way."""
    # 64 KiB pages (the default): a 32 KiB layer lands in one; the tests' 4 KiB would not.
    server = await server_factory(**{"store.page_bytes": 65536})
    namespace = WIDE_NS if layout is WIDE else NS
    kv = make_kv(layout, 5, form=KVForm.BLOCKS, seed=22)
    keys = [b"client-tail-%d" % index for index in range(5)]
    layered = [b"client-layer-tail-%d" % index for index in range(5)]
    async with data_client(server_target(server), namespace, shared_memory=False) as client:
        assert (await client.put_blocks(keys, kv)).num_committed == 5
        got = torch.zeros_like(kv)
        assert await client.get_into(keys, got, form=KVForm.BLOCKS) == 5
        assert torch.equal(got.view(torch.uint8), kv.view(torch.uint8))
        assert sum(landed_runs) == (5 * layout.num_layers if in_place else 0)

        async with client.layer_put(layered) as put:  # a layer put's messages as well
            for layer in range(layout.num_layers):
                await put.send_layer(layer, kv[:, layer])
        assert put.result is not None
        assert put.result.num_committed == 5
        assert await client.get_into(layered, got, form=KVForm.BLOCKS) == 5
    assert torch.equal(got.view(torch.uint8), kv.view(torch.uint8))
    assert sum(landed_runs) == (10 * layout.num_layers if in_place else 0)


@pytest.mark.parametrize("corrupt_layer", [0, 1])
async def test_a_tail_whose_checksum_fails_commits_nothing_and_leaks_nothing(
    seed: Seed, make_kv: MakeKV, landed_runs: list[int], corrupt_layer: int
) -> None:
    keys = [b"bad-tail-0", b"bad-tail-1"]
    kv = make_kv(LAYOUT, len(keys), form=KVForm.BLOCKS, seed=23)
    failures = (await seed.client.stats()).checksum_failures
    raw = await RawConnection.open_port(seed.port)
    try:
        await raw.send(
            tail_frames(keys, kv, corrupt_layer=corrupt_layer) + frame(FrameKind.PUT_END)
        )
        code, message = await raw.read_error()
        assert code == grpc.StatusCode.DATA_LOSS.value[0], message
        assert "checksum" in message
        assert await raw.closed_by_server()
    finally:
        raw.close()
    assert len(landed_runs) == corrupt_layer + 1  # it failed where its bytes landed
    assert (await seed.client.stats()).checksum_failures == failures + 1
    assert (await seed.client.lookup_keys(keys)).num_matched == 0
    await seed.assert_serving()


async def test_a_put_cut_off_in_its_tail_is_reclaimed(
    seed: Seed, make_kv: MakeKV, poll: Poll
) -> None:
    keys = [b"cut-tail-0", b"cut-tail-1"]
    kv = make_kv(LAYOUT, len(keys), form=KVForm.BLOCKS, seed=24)
    first_frame = first_frame_of(tail_frames(keys, kv))  # layer 0's
    await abandon_put(seed, first_frame[: len(first_frame) - LAYOUT.layer_bytes], keys, poll)


async def assert_all_freed(client: KVClient, keys: list[bytes], poll: Poll) -> None:
    """Once a cut put is reclaimed, the server holds no page and none of its blocks."""

    async def freed() -> bool:
        return await dram_used(client) == 0

    await poll(freed)
    assert (await client.lookup_keys(keys)).num_matched == 0


async def test_a_stalled_tail_is_cut_at_the_frame_timeout_and_frees_its_room(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll
) -> None:
    running = await server_factory(**{"limits.frame_timeout_s": 1.0})
    keys = [b"stalled-tail-0", b"stalled-tail-1"]
    kv = make_kv(LAYOUT, len(keys), form=KVForm.BLOCKS, seed=25)
    first_frame = first_frame_of(tail_frames(keys, kv))
    async with data_client(server_target(running)) as client:
        raw = await RawConnection.open_port(running.servicer.data_plane_port)
        try:
            await raw.send(first_frame[:-7])  # all but the tail's last 7 bytes, then silence
            code, message = await raw.read_error()
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], message
            assert await raw.closed_by_server()
        finally:
            raw.close()

        await assert_all_freed(client, keys, poll)


async def test_a_tails_room_is_made_as_its_bytes_come_one_step_at_most_ahead(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll
) -> None:
    """A PUT_TAIL's message alone (its tail not sent) holds no room and evicts nothing;
    once the tail begins, room is made a step (64 blocks) at a time, so a client that
    stops there has cost other blocks one step at most, and that until the frame times
    out."""
    pages = 256  # a block per 4 KiB page
    running = await server_factory(
        **{"store.dram_bytes": pages * 4096, "limits.frame_timeout_s": 1.0}
    )
    victims = [[b"victim-%d-%d" % (chain, index) for index in range(64)] for chain in range(4)]
    attack = [b"attack-%d" % index for index in range(150)]
    kv = make_kv(LAYOUT, 150, form=KVForm.BLOCKS, seed=27)
    async with data_client(server_target(running)) as client:
        for chain in victims:
            assert (await client.put_blocks(chain, kv[:64])).num_committed == 64
        full = await dram_used(client)
        assert full == pages * 4096

        async def victims_held() -> int:
            return sum([(await client.lookup_keys(chain)).num_matched for chain in victims])

        layer_0 = first_frame_of(tail_frames(attack, kv))
        message = layer_0[: len(layer_0) - len(attack) * LAYOUT.layer_bytes]
        raw = await RawConnection.open_port(running.servicer.data_plane_port)
        try:
            await raw.send(message)
            await asyncio.sleep(0.3)
            assert await victims_held() == 256, "a message without its tail evicted blocks"
            await raw.send(layer_0[len(message) : len(message) + 1])  # one byte of the tail
            code, error = await raw.read_error()
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], error
        finally:
            raw.close()
        held = await victims_held()
        assert 256 - 64 <= held < 256, "one step's room was made once its bytes began"

        async def freed() -> bool:
            return await dram_used(client) == held * 4096

        await poll(freed)
        assert (await client.lookup_keys(attack)).num_matched == 0


async def test_a_tail_has_the_time_of_its_frame_not_a_window_of_its_own(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll
) -> None:
    """frame_timeout_s counts from a PUT_TAIL frame's first byte to its last: a message
    sent slowly and a tail sent slowly after it, each within the limit, are cut."""
    running = await server_factory(**{"limits.frame_timeout_s": 1.0})
    keys = [b"slow-tail-0", b"slow-tail-1"]
    kv = make_kv(LAYOUT, len(keys), form=KVForm.BLOCKS, seed=28)
    layer_0 = first_frame_of(tail_frames(keys, kv))
    tail_starts = len(layer_0) - len(keys) * LAYOUT.layer_bytes
    async with data_client(server_target(running)) as client:
        raw = await RawConnection.open_port(running.servicer.data_plane_port)
        try:
            await raw.send(layer_0[: tail_starts // 2])
            await asyncio.sleep(0.7)
            await raw.send(layer_0[tail_starts // 2 : tail_starts])  # the message, 0.7 s
            await asyncio.sleep(0.6)
            with contextlib.suppress(ConnectionError):  # the server may have hung up
                await raw.send(layer_0[tail_starts:] + frame(FrameKind.PUT_END))
            code, message = await raw.read_error()
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], message
            assert "frame_timeout_s" in message
        finally:
            raw.close()

        await assert_all_freed(client, keys, poll)


async def test_a_tails_time_is_its_receiving_not_the_servers_work_in_between(
    server_factory: ServerFactory,
    make_kv: MakeKV,
    landed_runs: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that sends a long tail promptly is not cut while the server takes its
    time making room between the tail's steps (as it does while demotions to SSD run):
    frame_timeout_s counts the frame's arrival, not the server's work. The steps are
    larger than the sockets' buffers, so the second one waits for the client."""
    make_room = kvstore.mover.TierMover.ensure_room

    async def slow_room(self: kvstore.mover.TierMover, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.015)  # 96 blocks: 1.4 s of room-making in one frame
        await make_room(self, *args, **kwargs)

    monkeypatch.setattr(kvstore.mover.TierMover, "ensure_room", slow_room)
    running = await server_factory(
        **{
            "limits.frame_timeout_s": 1.0,
            "limits.max_message_bytes": 64 * MiB,
            "store.page_bytes": 1 * MiB,
            "store.dram_bytes": 128 * MiB,
        }
    )
    layout = KVLayout(
        num_layers=2, num_kv_heads=8, head_dim=128, dtype=DType.FLOAT16, block_tokens=64
    )
    namespace = Namespace(tenant="acme", model_fingerprint="long-tail", layout=layout)
    keys = [b"long-tail-%d" % index for index in range(96)]
    kv = make_kv(layout, len(keys), form=KVForm.BLOCKS, seed=29)  # 24 MiB a layer
    options = {"shared_memory": False, "max_message_bytes": 64 * MiB, "chunk_bytes": 32 * MiB}
    async with data_client(server_target(running), namespace, **options) as client:
        assert (await client.put_blocks(keys, kv)).num_committed == len(keys)
        got = torch.zeros_like(kv)
        assert await client.get_into(keys, got, form=KVForm.BLOCKS) == len(keys)
    assert torch.equal(got.view(torch.uint8), kv.view(torch.uint8))
    assert landed_runs == [64, 32] * layout.num_layers  # each layer's tail, in two steps


async def delete_all(client: KVClient, keys: list[bytes], poll: Poll) -> None:
    """Delete `keys` (a chain), polling while the server still holds them for a read."""
    deleted = 0

    async def gone() -> bool:
        nonlocal deleted
        num_deleted, num_busy = await client.delete(keys[:1])  # the root takes them all
        deleted += num_deleted
        return deleted == len(keys) and num_busy == 0

    await poll(gone, timeout_s=5.0)


async def test_stopping_iter_layers_early_unpins_the_blocks(
    server_factory: ServerFactory, make_kv: MakeKV, same_bytes: SameBytes, poll: Poll
) -> None:
    running = await server_factory(store__dram_bytes=96 * MiB)
    keys = [b"early-%d" % i for i in range(10)]  # 40 MiB: more than the sockets buffer
    kv = make_kv(BIG, len(keys), form=KVForm.BLOCKS, seed=12)
    async with data_client(f"127.0.0.1:{running.port}", BIG_NS) as client:
        assert (await client.put_blocks(keys, kv)).num_committed == len(keys)
        async with contextlib.aclosing(client.iter_layers(keys)) as stream:
            async for arrival in stream:
                assert arrival.layer == 0
                assert same_bytes(arrival.kv, kv[:, 0])
                # Mid-get the server holds every block for the read.
                assert await client.delete(keys[:1]) == (0, len(keys))
                break
        await delete_all(client, keys, poll)
        assert (await client.lookup_keys(keys)).num_matched == 0
        assert await dram_used(client) == 0
        # The connection was closed, not pooled mid-stream: the next transfer works.
        assert (await client.put_blocks(keys[:1], kv[:1])).num_committed == 1


async def test_closing_the_client_ends_a_get_in_flight(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll
) -> None:
    running = await server_factory(store__dram_bytes=96 * MiB)
    target = f"127.0.0.1:{running.port}"
    keys = [b"cut-%d" % i for i in range(10)]
    kv = make_kv(BIG, len(keys), form=KVForm.BLOCKS, seed=13)
    client = data_client(target, BIG_NS)
    try:
        assert (await client.put_blocks(keys, kv)).num_committed == len(keys)
        stream = client.iter_layers(keys)
        first = await anext(stream)
        assert first.layer == 0
        await asyncio.wait_for(client.close(), timeout=10)

        async def rest() -> list[int]:
            return [arrival.layer async for arrival in stream]

        with pytest.raises(Unavailable):
            await asyncio.wait_for(rest(), timeout=10)
    finally:
        await client.close()
    async with data_client(target, BIG_NS) as other:
        await delete_all(other, keys, poll)


# -- draining -------------------------------------------------------------------------------------


async def test_drain_closes_idle_data_plane_connections_at_once(
    server_factory: ServerFactory, make_kv: MakeKV
) -> None:
    running = await server_factory(limits__drain_grace_s=60.0)
    target = f"127.0.0.1:{running.port}"
    async with data_client(target) as client:
        kv = make_kv(LAYOUT, 1, form=KVForm.BLOCKS)
        assert (await client.put_blocks([b"k"], kv)).num_committed == 1  # one pooled connection
        idle = await RawConnection.open_port(running.servicer.data_plane_port)
        try:
            # Not the 60 s grace: idle connections do not hold the drain.
            await asyncio.wait_for(running.drain(), timeout=10)
            assert await idle.closed_by_server()
        finally:
            idle.close()
        with pytest.raises(Unavailable):
            await client.put_blocks([b"k2"], kv)


async def test_a_transfer_started_on_a_draining_server_is_unavailable(
    server: RunningServer, seed: Seed, make_kv: MakeKV
) -> None:
    """The server starts draining while connections sit idle between transfers (a
    client's pooled one, and a raw one): the next transfer on each gets UNAVAILABLE."""
    kv = make_kv(LAYOUT, 1, form=KVForm.BLOCKS)
    raw = await RawConnection.open_port(seed.port)
    try:
        before = transfers(server)
        server.servicer.start_draining()
        with pytest.raises(Unavailable, match="draining"):
            await seed.client.put_blocks([b"late"], kv)
        await raw.send(frame(FrameKind.PUT, put_payload([b"late"], kv)) + frame(FrameKind.PUT_END))
        code, message = await raw.read_error()
        assert code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "draining" in message
        assert await raw.closed_by_server()
    finally:
        raw.close()
    assert transfers(server) == before
    assert server.store.report().tiers[0].num_blocks == len(SEED_KEYS)


async def test_a_drain_lets_a_transfer_in_flight_finish_and_refuses_new_ones(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll
) -> None:
    running = await server_factory(limits__drain_grace_s=30.0)
    target = f"127.0.0.1:{running.port}"
    kv = make_kv(LAYOUT, 2, form=KVForm.BLOCKS, seed=14)
    async with data_client(target) as client:
        assert (await client.put_blocks([b"pooled"], kv[:1])).num_committed == 1
        used = await dram_used(client)
        # A put in flight: its blocks sent, PUT_END not yet.
        raw = await RawConnection.open_port(running.servicer.data_plane_port)
        try:
            await raw.send(frame(FrameKind.PUT, put_payload([b"f0", b"f1"], kv)))

            async def received() -> bool:
                return await dram_used(client) >= used + 2 * LAYOUT.block_bytes

            await poll(received)
            drain = asyncio.create_task(running.drain())
            await asyncio.sleep(0.2)
            assert not drain.done(), "the drain waits for the put in flight"
            # Whichever path it takes (the pooled connection, a new one, gRPC): refused.
            with pytest.raises(Unavailable):
                await client.put_blocks([b"refused"], kv[:1])

            await raw.send(frame(FrameKind.PUT_END))
            kind, payload = await raw.read_frame()
            assert kind == FrameKind.PUT_DONE
            assert pb.PutBlocksResponse.FromString(payload).num_committed == 2
            assert await raw.closed_by_server(), "a drain closes the connection after it"
        finally:
            raw.close()
        await asyncio.wait_for(drain, timeout=10)  # not the 30 s grace
    assert transfers(running) == 2
    assert running.store.report().tiers[0].num_blocks == 3


# -- configuration --------------------------------------------------------------------------------


def parse_flags(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(argv))).data_port


def test_data_port_setting() -> None:
    assert load_config(None, {}).data_port == 0
    assert load_config(None, {"data_port": -1}).data_port == -1
    assert load_config(None, {"data_port": 65535}).data_port == 65535
    assert parse_flags() == 0
    assert parse_flags("--data-port", "7001") == 7001
    assert parse_flags("--data-port=-1") == -1


@pytest.mark.parametrize("value", [70000, 65536, -2, "7001", 1.5, True])
def test_bad_data_ports_are_rejected(value: object) -> None:
    with pytest.raises(InvalidRequest, match="data_port"):
        load_config(None, {"data_port": value})


async def test_a_silent_connection_is_closed_and_does_not_hold_a_drain(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kvstore.server.dataplane, "_HELLO_TIMEOUT_S", 0.3)
    running = await server_factory(limits__drain_grace_s=60.0)
    port = running.servicer.data_plane_port
    silent = await RawConnection.open_port(port, hello=False)
    try:
        code, message = await silent.read_error()
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert "HELLO" in message
        assert await silent.closed_by_server()
    finally:
        silent.close()
    # One that connects and says nothing while the server drains is closed at once,
    # not after the 60 s grace.
    monkeypatch.setattr(kvstore.server.dataplane, "_HELLO_TIMEOUT_S", 60.0)
    waiting = await RawConnection.open_port(port, hello=False)
    try:
        await asyncio.sleep(0.05)  # accepted, and waiting for HELLO
        await asyncio.wait_for(running.drain(), timeout=10)
        assert await waiting.closed_by_server()
    finally:
        waiting.close()


# -- deadlines, the connection cap, back-off ------------------------------------------------------


async def test_a_layer_put_that_outlives_its_deadline_is_dropped_by_the_server(
    server: RunningServer, make_kv: MakeKV, poll: Poll
) -> None:
    """The server holds a put's reservation only until the client's deadline, as gRPC
    does, even when the client just pauses between layers."""
    keys = [b"slow-%d" % i for i in range(2)]
    kv = make_kv(LAYOUT, len(keys), form=KVForm.BLOCKS, seed=20)
    async with data_client(server_target(server), timeouts=Timeouts(transfer=0.5)) as client:
        used = await dram_used(client)
        abandoned = (await client.stats()).puts_abandoned

        async def dropped() -> bool:
            return (await client.stats()).puts_abandoned == abandoned + 1

        async def pause_between_layers() -> None:
            async with client.layer_put(keys) as put:
                await put.send_layer(0, kv[:, 0])

                async def reserved() -> bool:  # the put's first frame has arrived
                    return await dram_used(client) > used

                await poll(reserved, timeout_s=5.0)
                await poll(dropped, timeout_s=5.0)
                assert await dram_used(client) == used
                await put.send_layer(1, kv[:, 1])

        with pytest.raises(DeadlineExceeded):
            await pause_between_layers()
        assert transfers(server) == 0
        assert (await client.lookup_keys(keys)).num_matched == 0
        # The client goes on, on a new connection.
        assert (await client.put_blocks(keys, kv)).num_committed == len(keys)


async def test_a_get_nobody_reads_unpins_its_blocks_at_the_deadline(
    server_factory: ServerFactory, make_kv: MakeKV, poll: Poll
) -> None:
    running = await server_factory(store__dram_bytes=96 * MiB)
    keys = [b"unread-%d" % i for i in range(10)]  # 40 MiB: the server blocks on a full socket
    kv = make_kv(BIG, len(keys), form=KVForm.BLOCKS, seed=21)
    async with data_client(server_target(running), BIG_NS) as client:
        assert (await client.put_blocks(keys, kv)).num_committed == len(keys)
        raw = await RawConnection.open_port(running.servicer.data_plane_port)
        try:
            request = pb.GetBlocksRequest(namespace=namespace_to_wire(BIG_NS), keys=keys)
            await raw.send(
                frame(FrameKind.DEADLINE, struct.pack("<I", 300))
                + frame(FrameKind.GET, request.SerializeToString())
            )
            await asyncio.sleep(0.1)
            assert await client.delete(keys[:1]) == (0, len(keys))  # pinned by the read
            await delete_all(client, keys, poll)  # after 300 ms the server lets go
            sent = await raw.read_until_closed()
            assert 0 < len(sent) < len(keys) * BIG.block_bytes
            # Whole GET_DATA frames, then at most one cut short: no ERROR frame written
            # into the middle of one, and no GET_END.
            offset = 0
            while offset + 5 <= len(sent):
                kind, length = struct.unpack_from("<BI", sent, offset)
                assert kind == FrameKind.GET_DATA
                offset += 5 + length
            assert offset >= len(sent) - 5
            assert b"within its deadline" not in sent  # an ERROR's text, inside a frame
        finally:
            raw.close()


async def test_past_the_connection_cap_transfers_use_grpc_and_nothing_is_cut(
    server_factory: ServerFactory, make_kv: MakeKV
) -> None:
    running = await server_factory(limits__max_data_connections=1)
    keys = [b"capped-%d" % i for i in range(2)]
    kv = make_kv(LAYOUT, len(keys), form=KVForm.BLOCKS, seed=22)
    async with data_client(server_target(running)) as client:
        async with client.layer_put(keys) as put:  # holds the one connection
            await put.send_layer(0, kv[:, 0])
            # A second transfer meanwhile needs a connection the cap refuses: it goes
            # over gRPC, and the layer put in flight is left alone.
            assert (await client.put_blocks([b"other"], kv[:1])).num_committed == 1
            assert client.data_plane is None
            await put.send_layer(1, kv[:, 1])
        assert put.result is not None
        assert put.result.num_committed == len(keys)
        assert transfers(running) == 1  # the layer put
        assert running.data_plane is not None
        assert running.data_plane.accepted == 1
        # The back-off: for 30 s the client does not try the data plane again.
        dest = torch.zeros_like(kv)
        assert await client.get_into(keys, dest, form=KVForm.BLOCKS) == len(keys)
        assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))
        assert transfers(running) == 1
        assert running.data_plane.accepted == 1


async def test_a_miss_leaves_the_connection_pooled(server: RunningServer, make_kv: MakeKV) -> None:
    async with data_client(server_target(server)) as client:
        dest = make_kv(LAYOUT, 2)
        for _ in range(3):
            assert await client.get_into([b"nothing-0", b"nothing-1"], dest) == 0
        assert server.data_plane is not None
        assert server.data_plane.accepted == 1
        assert transfers(server) == 3


async def test_a_data_plane_that_never_says_hello_costs_the_connect_time_only() -> None:
    """A port that accepts but never answers (a proxy, a wrong service) is given up on
    by the connect deadline, not the transfer's, so the transfer still has its time
    for gRPC."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # the kernel accepts; nobody ever reads or answers
    try:
        pool = DataPlanePool("127.0.0.1", listener.getsockname()[1], 1 * MiB)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(DataPlaneUnreachable, match="HELLO"):
            await pool.acquire(start + 60.0, connect_by=start + 0.3)
        assert loop.time() - start < 5.0
        pool.close()
    finally:
        listener.close()


async def test_an_idle_connection_is_closed_quietly_after_the_idle_timeout(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kvstore.server.dataplane, "_IDLE_TIMEOUT_S", 0.2)
    raw = await RawConnection.open_port(server.servicer.data_plane_port)
    try:
        assert await raw.read_until_closed() == b""  # closed, with no ERROR frame
    finally:
        raw.close()


async def test_stats_report_the_data_plane(
    server: RunningServer, server_factory: ServerFactory, make_kv: MakeKV
) -> None:
    kv = make_kv(LAYOUT, 2, form=KVForm.BLOCKS, seed=23)
    async with data_client(server_target(server)) as client:
        before = await client.stats()
        assert before.data_plane_port == server.servicer.data_plane_port
        await put_get_and_iterate(client, b"stats-", kv)
        after = await client.stats()
        assert after.data_plane_transfers == before.data_plane_transfers + 3
        assert after.data_plane_connections == 1  # the client's pooled connection
    running = await server_factory(data_port=-1)
    async with data_client(server_target(running)) as client:
        await put_get_and_iterate(client, b"off-", kv)
        stats = await client.stats()
        assert (stats.data_plane_port, stats.data_plane_transfers) == (0, 0)
