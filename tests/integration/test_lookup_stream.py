"""The client's lookup streams: lookups ride open LookupPrefixStream calls, and a lookup
that cannot (streams busy, broken, cancelled or missing on the server) still gets the
right answer or the right error. Real servers on loopback, real clients."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import grpc
import pytest
import torch

from kvstore.client import (
    ClientOptions,
    DeadlineExceeded,
    DType,
    InvalidArgument,
    KVClient,
    KVForm,
    KVLayout,
    Namespace,
    TierKind,
    Timeouts,
    Unavailable,
)
from kvstore.client._auto_transport import AutoTransport
from kvstore.client._grpc_transport import GrpcTransport
from kvstore.client._lookup_stream import LookupStreams
from kvstore.server import RunningServer
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.namespace import namespace_to_wire

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=16)
NS = Namespace(tenant="acme", model_fingerprint="toy", layout=LAYOUT)
KEYS = [b"chain-%d" % index for index in range(8)]

Connect = Callable[..., KVClient]
MakeKV = Callable[..., torch.Tensor]


@pytest.fixture
async def client(connect: Connect, make_kv: MakeKV) -> KVClient:
    client = connect(NS, data_plane=False)  # these tests are of the gRPC lookup streams
    kv = make_kv(LAYOUT, len(KEYS), form=KVForm.BLOCKS)
    assert (await client.put_blocks(KEYS, kv)).num_committed == len(KEYS)
    return client


def streams_of(client: KVClient) -> LookupStreams:
    transport = client.transport
    if isinstance(transport, AutoTransport):
        transport = transport.grpc
    assert isinstance(transport, GrpcTransport)
    return transport.lookup_streams


async def test_sequential_lookups_ride_one_open_stream(client: KVClient) -> None:
    for count in range(len(KEYS) + 1):
        match = await client.lookup_keys(KEYS[:count])
        assert match.num_matched == count
        assert match.tiers == (TierKind.DRAM,) * count
        assert streams_of(client).num_open == 1
    assert (await client.lookup_keys([b"absent", *KEYS])).num_matched == 0


async def test_a_bad_lookup_fails_alone_and_the_stream_stays_open(client: KVClient) -> None:
    assert (await client.lookup_keys(KEYS)).num_matched == len(KEYS)
    with pytest.raises(InvalidArgument, match="at most 64 bytes"):
        await client.lookup_keys([b"k" * 65])
    assert streams_of(client).num_open == 1
    assert (await client.lookup_keys(KEYS[:3])).num_matched == 3


async def test_concurrent_lookups_all_get_their_own_answer(
    connect: Connect, client: KVClient
) -> None:
    """As many ride streams as the client keeps; the rest go out as unary calls."""
    counts = [index % (len(KEYS) + 1) for index in range(40)]
    for max_streams in (1, 3):
        other = connect(NS, lookup_streams=max_streams, data_plane=False)
        for _ in range(2):
            matches = await asyncio.gather(*(other.lookup_keys(KEYS[:count]) for count in counts))
            assert [match.num_matched for match in matches] == counts
            assert streams_of(other).num_open == max_streams


async def test_a_cancelled_lookup_leaves_no_stale_answer_behind(client: KVClient) -> None:
    """Cancelled at every point of its round trip, a lookup must not let the next one
    read its result: each next lookup asks a different question and checks the answer."""
    for yields in range(12):
        task = asyncio.create_task(client.lookup_keys(KEYS))
        for _ in range(yields):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # Only streams that are still open wait for reuse (gRPC ends an interrupted one).
        assert not any(call.done() for call in streams_of(client)._idle)
        count = yields % len(KEYS)
        assert (await client.lookup_keys(KEYS[:count])).num_matched == count


async def test_a_server_without_the_stream_gets_unary_lookups() -> None:
    """An older server answers UNIMPLEMENTED; the client falls back and stops trying."""
    calls: list[int] = []

    async def lookup(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        parsed = pb.LookupPrefixRequest.FromString(request)
        calls.append(len(parsed.keys))
        return pb.LookupPrefixResponse(num_matched=1, block_bytes=7).SerializeToString()

    older = grpc.aio.server()
    older.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "kvstore.v1.KVStore", {"LookupPrefix": grpc.unary_unary_rpc_method_handler(lookup)}
            )
        ]
    )
    port = older.add_insecure_port("127.0.0.1:0")
    await older.start()
    try:
        async with KVClient(f"127.0.0.1:{port}", NS) as client:
            for _ in range(3):
                assert (await client.lookup_keys(KEYS[:2])).num_matched == 1
            assert calls == [2, 2, 2]
            assert not streams_of(client).supported
            assert streams_of(client).num_open == 0
    finally:
        await older.stop(0)


async def test_a_stream_that_never_answers_meets_the_deadline() -> None:
    never = asyncio.Event()

    async def swallow(requests: object, context: grpc.aio.ServicerContext) -> None:
        while await context.read() is not grpc.aio.EOF:
            await never.wait()

    silent = grpc.aio.server()
    silent.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "kvstore.v1.KVStore",
                {"LookupPrefixStream": grpc.stream_stream_rpc_method_handler(swallow)},
            )
        ]
    )
    port = silent.add_insecure_port("127.0.0.1:0")
    await silent.start()
    try:
        options = ClientOptions(timeouts=Timeouts(lookup=0.2))
        async with KVClient(f"127.0.0.1:{port}", NS, options=options) as client:
            for _ in range(2):  # the second on a new stream: the first can no longer pair
                with pytest.raises(DeadlineExceeded):
                    await client.lookup_keys(KEYS)
                assert streams_of(client).supported
                assert streams_of(client).num_open == 0
    finally:
        never.set()
        await silent.stop(0)


def raw_lookup_stream(target: str) -> tuple[grpc.aio.Channel, grpc.aio.StreamStreamCall]:
    channel = grpc.aio.insecure_channel(target)
    open_stream = channel.stream_stream(
        "/kvstore.v1.KVStore/LookupPrefixStream",
        request_serializer=pb.LookupPrefixRequest.SerializeToString,
        response_deserializer=pb.LookupPrefixResult.FromString,
    )
    return channel, open_stream()


async def read_to_the_end(
    stream: grpc.aio.StreamStreamCall,
) -> tuple[list[pb.LookupPrefixResult], grpc.aio.AioRpcError]:
    """Every result until the stream fails, and how it failed."""
    results = []
    while True:
        try:
            result = await stream.read()
        except grpc.aio.AioRpcError as error:
            return results, error
        assert isinstance(result, pb.LookupPrefixResult), "the stream ended without an error"
        results.append(result)


def wire_request(keys: list[bytes]) -> pb.LookupPrefixRequest:
    return pb.LookupPrefixRequest(namespace=namespace_to_wire(NS), keys=keys)


async def test_drain_ends_idle_lookup_streams_at_once_with_unavailable(
    server_factory: Callable[..., Awaitable[RunningServer]], make_kv: MakeKV
) -> None:
    """A long grace period does not wait for streams that have no request in flight."""
    running = await server_factory(limits__drain_grace_s=60.0)
    target = f"127.0.0.1:{running.port}"
    channel, raw = raw_lookup_stream(target)
    async with KVClient(target, NS, options=ClientOptions(data_plane=False)) as client:
        kv = make_kv(LAYOUT, len(KEYS), form=KVForm.BLOCKS)
        await client.put_blocks(KEYS, kv)
        assert (await client.lookup_keys(KEYS)).num_matched == len(KEYS)
        assert streams_of(client).num_open == 1
        await raw.write(wire_request(KEYS[:2]))
        assert (await raw.read()).match.num_matched == 2
        await asyncio.wait_for(running.drain(), timeout=20)  # not the 60 s grace
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await raw.read()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in (ended.value.details() or "")
        with pytest.raises(Unavailable):
            await client.lookup_keys(KEYS)
        assert streams_of(client).num_open == 0
    await channel.close()


async def test_drain_ends_a_busy_lookup_stream_after_the_result_in_hand(
    server_factory: Callable[..., Awaitable[RunningServer]], make_kv: MakeKV
) -> None:
    """Requests written back to back keep the stream busy as the drain begins: it still
    ends soon, every result it sent is right, and it ends with UNAVAILABLE."""
    running = await server_factory(limits__drain_grace_s=60.0)
    target = f"127.0.0.1:{running.port}"
    async with KVClient(target, NS, options=ClientOptions(data_plane=False)) as client:
        await client.put_blocks(KEYS, make_kv(LAYOUT, len(KEYS), form=KVForm.BLOCKS))
    channel, raw = raw_lookup_stream(target)
    requests = [wire_request(KEYS[: index % len(KEYS)]) for index in range(400)]
    for request in requests:
        await raw.write(request)
    assert (await raw.read()).match.num_matched == 0
    drain = asyncio.create_task(running.drain())
    results, ending = await read_to_the_end(raw)
    for index, result in enumerate(results, start=1):
        assert result.match.num_matched == index % len(KEYS)
    assert ending.code() == grpc.StatusCode.UNAVAILABLE
    assert len(results) + 1 < len(requests), "the drain did not end the stream"
    await asyncio.wait_for(drain, timeout=20)  # not the 60 s grace
    await channel.close()


async def test_unary_only_clients_still_look_up(connect: Connect, client: KVClient) -> None:
    unary = connect(NS, lookup_streams=0, data_plane=False)
    assert (await unary.lookup_keys(KEYS)).num_matched == len(KEYS)
    with pytest.raises(InvalidArgument, match="at most 64 bytes"):
        await unary.lookup_keys([b"k" * 65])
    assert streams_of(unary).num_open == 0


def test_a_negative_stream_count_is_refused() -> None:
    with pytest.raises(ValueError, match="lookup_streams must be >= 0"):
        ClientOptions(lookup_streams=-1)


# Clients in one event loop after another, in a process whose server runs on a loop of
# its own: gRPC must have finished with every lookup stream before each loop closes.
_LOOPS_SCRIPT = """
import asyncio
import grpc
from kvstore.client import (
    ClientOptions, DeadlineExceeded, DType, KVClient, KVLayout, Namespace, Timeouts
)
from kvstore.client._loop import LoopThread
from kvstore.server import build_server, load_config

server_loop = LoopThread("server")
config = load_config(None, {"listen": "127.0.0.1:0", "log_level": "warning",
                            "store.dram_bytes": 16 << 20})
running = server_loop.run(build_server(config))
layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16,
                  block_tokens=16)
namespace = Namespace(tenant="t", model_fingerprint="m", layout=layout)

async def start_silent() -> tuple[grpc.aio.Server, int]:
    never = asyncio.Event()
    async def swallow(requests, context):
        while await context.read() is not grpc.aio.EOF:
            await never.wait()
    async def hang(request, context):
        await never.wait()
    silent = grpc.aio.server()
    silent.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "kvstore.v1.KVStore",
        {"LookupPrefixStream": grpc.stream_stream_rpc_method_handler(swallow),
         "LookupPrefix": grpc.unary_unary_rpc_method_handler(hang)})])
    port = silent.add_insecure_port("127.0.0.1:0")
    await silent.start()
    return silent, port

silent, silent_port = server_loop.run(start_silent())

async def lookups() -> None:
    async with KVClient(f"127.0.0.1:{running.port}", namespace) as client:
        await asyncio.gather(*(client.lookup_keys([b"k"]) for _ in range(3)))
        for _ in range(10):
            assert (await client.lookup_keys([b"k"])).num_matched == 0
        cancelled = asyncio.create_task(client.lookup_keys([b"k"]))
        await asyncio.sleep(0)
        cancelled.cancel()  # its stream is dropped, not reused
        asyncio.create_task(client.lookup_keys([b"k"]))  # still in flight at close
        await asyncio.sleep(0)

async def timed_out_lookup() -> None:
    options = ClientOptions(timeouts=Timeouts(lookup=0.05))
    async with KVClient(f"127.0.0.1:{silent_port}", namespace, options=options) as client:
        try:
            await client.lookup_keys([b"k"])
        except DeadlineExceeded:
            pass  # closed right after: its stream was cancelled a moment ago

for _ in range(12):
    asyncio.run(lookups())
    asyncio.run(timed_out_lookup())
server_loop.run(running.drain())
server_loop.run(silent.stop(0))
server_loop.stop()
print("ok")
"""


def test_closing_a_client_leaves_nothing_for_a_closed_event_loop(
    run_clean_child: Callable[[str], None],
) -> None:
    run_clean_child(_LOOPS_SCRIPT)
