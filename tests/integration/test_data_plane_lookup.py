"""Lookups over the data plane (LOOKUP / LOOKUP_RESULT frames), against a real server."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch
from raw_data_plane import Raw, frame  # tests/raw_data_plane.py

from kvstore.client import (
    ClientOptions,
    DeadlineExceeded,
    DType,
    InvalidArgument,
    KVClient,
    KVForm,
    KVLayout,
    Namespace,
    Timeouts,
)
from kvstore.server import RunningServer
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.frames import HELLO_PAYLOAD, FrameKind
from kvstore.wire.namespace import namespace_to_wire

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=16)
NS = Namespace(tenant="acme", model_fingerprint="toy", layout=LAYOUT)
INVALID_ARGUMENT, RESOURCE_EXHAUSTED = 3, 8
MakeKV = Callable[..., torch.Tensor]
ServerFactory = Callable[..., Awaitable[RunningServer]]


def lookups(running: RunningServer) -> int:
    assert running.data_plane is not None
    return running.data_plane.lookups


def client_for(running: RunningServer, **options: Any) -> KVClient:
    return KVClient(f"127.0.0.1:{running.port}", NS, options=ClientOptions(**options))


async def test_lookups_go_over_the_data_plane_and_match_grpc(
    server: RunningServer, make_kv: MakeKV
) -> None:
    keys = [b"k-%d" % i for i in range(5)]
    async with (
        client_for(server) as client,
        client_for(server, data_plane=False) as grpc_client,
        client_for(server, data_plane=False, lookup_streams=0) as unary_client,
    ):
        kv = make_kv(LAYOUT, 3, form=KVForm.BLOCKS, seed=1)
        assert (await client.put_blocks(keys[:3], kv)).num_committed == 3
        before = lookups(server)
        for asked in (keys, keys[:2], [b"absent", *keys], []):
            over_data_plane = await client.lookup_keys(asked)
            assert over_data_plane == await grpc_client.lookup_keys(asked)
            assert over_data_plane == await unary_client.lookup_keys(asked)
        assert (await client.lookup_keys(keys)).num_matched == 3
        assert lookups(server) == before + 5
        stats = await client.stats()
        assert stats.lookup_keys >= 3 * (5 + 2 + 6)


async def test_malformed_and_oversized_lookups_are_refused_and_the_server_serves_on(
    server: RunningServer, make_kv: MakeKV
) -> None:
    async with client_for(server) as client:
        kv = make_kv(LAYOUT, 2, form=KVForm.BLOCKS, seed=2)
        assert (await client.put_blocks([b"a", b"b"], kv)).num_committed == 2
        raw = await Raw.open(server)
        try:
            await raw.send(frame(FrameKind.LOOKUP, b"\xff\xff\xff"))
            code, message = await raw.read_error()
            assert code == INVALID_ARGUMENT, message
            assert "LookupPrefixRequest" in message
        finally:
            raw.close()
        raw = await Raw.open(server)
        try:
            await raw.send(struct.pack("<BI", FrameKind.LOOKUP, 1 << 30))
            code, message = await raw.read_error()
            assert code == RESOURCE_EXHAUSTED, message
        finally:
            raw.close()
        raw = await Raw.open(server)
        try:  # a well-formed lookup on a raw connection, and the connection stays open
            request = pb.LookupPrefixRequest(namespace=namespace_to_wire(NS), keys=[b"a", b"b"])
            for _ in range(2):
                await raw.send(frame(FrameKind.LOOKUP, request.SerializeToString()))
                kind, payload = await raw.read_frame()
                assert kind == FrameKind.LOOKUP_RESULT
                assert pb.LookupPrefixResponse.FromString(payload).num_matched == 2
        finally:
            raw.close()
        assert (await client.lookup_keys([b"a", b"b"])).num_matched == 2
        got = torch.zeros_like(kv)
        assert await client.get_into([b"a", b"b"], got, form=KVForm.BLOCKS) == 2
        assert torch.equal(got.view(torch.uint8), kv.view(torch.uint8))


async def test_too_many_keys_is_invalid_argument_like_grpc(
    server_factory: ServerFactory,
) -> None:
    running = await server_factory(limits__max_keys=4)
    async with client_for(running) as client:
        with pytest.raises(InvalidArgument, match="limit is 4"):
            await client.lookup_keys([b"k%d" % i for i in range(5)])
        assert (await client.lookup_keys([b"k"])).num_matched == 0


async def test_without_a_data_plane_lookups_use_grpc(server_factory: ServerFactory) -> None:
    running = await server_factory(data_port=-1)
    async with client_for(running) as client:
        assert (await client.lookup_keys([b"x"])).num_matched == 0
        assert client.data_plane is None


async def test_a_server_without_lookup_frames_is_detected_once_and_grpc_answers(
    server_factory: ServerFactory, make_kv: MakeKV
) -> None:
    """A data plane that refuses LOOKUP as an unknown kind (a server from before it):
    the lookup is answered over gRPC, and the data plane is not asked again."""
    running = await server_factory()
    assert running.data_plane is not None
    running.data_plane._lookups = None  # serves as an older server does
    async with client_for(running) as client:
        kv = make_kv(LAYOUT, 2, form=KVForm.BLOCKS, seed=3)
        assert (await client.put_blocks([b"o-0", b"o-1"], kv)).num_committed == 2
        transfers_before = running.data_plane.transfers
        for _ in range(3):
            assert (await client.lookup_keys([b"o-0", b"o-1"])).num_matched == 2
        assert running.data_plane.lookups == 0
        # The pooled connection carried the refused LOOKUP; no other was made for lookups.
        assert running.data_plane.accepted == 1
        assert running.data_plane.transfers == transfers_before


async def test_a_lookup_past_its_deadline_is_deadline_exceeded(server: RunningServer) -> None:
    """A data plane that takes the LOOKUP and never answers: the client's deadline ends it."""
    silent: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, length = struct.unpack("<BI", await reader.readexactly(5))
        await reader.readexactly(length)
        writer.write(frame(FrameKind.HELLO, HELLO_PAYLOAD))
        silent.append(writer)  # reads nothing more, answers nothing

    listener = await asyncio.start_server(accept, "127.0.0.1", 0)
    server.servicer.data_plane_port = listener.sockets[0].getsockname()[1]
    try:
        timeouts = Timeouts(lookup=0.2)
        async with client_for(server, timeouts=timeouts) as client:
            with pytest.raises(DeadlineExceeded):
                await client.lookup_keys([b"x"])
    finally:
        for writer in silent:
            writer.close()
        listener.close()


async def test_pipelined_lookups_on_one_connection_let_other_work_run_between_them(
    server_factory: ServerFactory,
) -> None:
    # A client that sends each lookup as soon as it has the last answer finds its next
    # one already read: the server still lets the loop run other work after each one,
    # so one busy connection cannot hold the loop for many requests in one step.
    server = await server_factory()
    raw = await Raw.open(server)
    request = pb.LookupPrefixRequest(
        namespace=namespace_to_wire(NS), keys=[b"k%d" % index for index in range(200)]
    )
    seen: list[int] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            seen.append(lookups(server))
            await asyncio.sleep(0)

    first = lookups(server)
    probing = asyncio.create_task(probe())
    try:
        await raw.send(frame(FrameKind.LOOKUP, request.SerializeToString()) * 20)
        for _ in range(20):
            kind, _ = await raw.read_frame()
            assert kind == FrameKind.LOOKUP_RESULT
    finally:
        done.set()
        await probing
        raw.close()
    assert lookups(server) - first == 20
    between = {count - first for count in seen} & set(range(1, 20))
    assert len(between) >= 15, sorted(between)  # the probe ran between the answers
