"""Malformed requests, sent with raw stubs the client library would never build.

Each case checks the status code and that the message says what to fix; then that the
server still serves and the blocks stored before the bad request are intact, byte for byte.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
import xxhash

from kvstore.client import (
    ClientOptions,
    DType,
    InvalidArgument,
    KVClient,
    KVForm,
    KVLayout,
    Namespace,
    ResourceExhausted,
)
from kvstore.server import RunningServer
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire.chunks import varint

MiB = 1 << 20
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=16)
NS = Namespace(tenant="acme", model_fingerprint="toy", layout=LAYOUT)
SEED_KEYS = [b"seed-0", b"seed-1", b"seed-2"]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
# A field number kvstore.v1 does not define, as a varint: tag (99 << 3 | 0) = 0x98 0x06, value 1.
UNKNOWN_FIELD = bytes([0x98, 0x06, 0x01])

Connect = Callable[..., KVClient]
MakeKV = Callable[..., torch.Tensor]


def wire_layout(**overrides: Any) -> pb.KVLayout:
    fields: dict[str, Any] = {
        "num_layers": LAYOUT.num_layers,
        "num_kv_heads": LAYOUT.num_kv_heads,
        "head_dim": LAYOUT.head_dim,
        "dtype": pb.FLOAT16,
        "block_tokens": LAYOUT.block_tokens,
    }
    fields.update(overrides)
    return pb.KVLayout(**fields)


def wire_ns(*, layout: pb.KVLayout | None = None, **overrides: Any) -> pb.Namespace:
    fields: dict[str, Any] = {"tenant": NS.tenant, "model_fingerprint": NS.model_fingerprint}
    fields.update(overrides)
    return pb.Namespace(layout=layout if layout is not None else wire_layout(), **fields)


def checksum(data: bytes) -> int:
    return int(xxhash.xxh3_64_intdigest(data))


@dataclass
class Seed:
    client: KVClient
    kv: torch.Tensor

    async def assert_intact(self) -> None:
        """The server still answers, and the seeded blocks come back unchanged."""
        assert (await self.client.lookup_keys(SEED_KEYS)).num_matched == len(SEED_KEYS)
        dest = torch.zeros_like(self.kv)
        assert await self.client.get_into(SEED_KEYS, dest, form=KVForm.BLOCKS) == len(SEED_KEYS)
        assert torch.equal(dest.view(torch.uint8), self.kv.view(torch.uint8))


@pytest.fixture
async def seed(connect: Connect, make_kv: MakeKV) -> Seed:
    client = connect(NS)
    kv = make_kv(LAYOUT, len(SEED_KEYS), form=KVForm.BLOCKS, seed=11)
    assert (await client.put_blocks(SEED_KEYS, kv)).num_committed == len(SEED_KEYS)
    return Seed(client, kv)


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def drain_stream(stream: AsyncIterator[Any]) -> list[Any]:
    return [reply async for reply in stream]


# -- unary RPCs and GetBlocks --------------------------------------------------------------------

RPCS = ["LookupPrefix", "GetBlocks", "Pin", "Unpin", "Delete"]
REQUEST_TYPES = {
    "LookupPrefix": pb.LookupPrefixRequest,
    "GetBlocks": pb.GetBlocksRequest,
    "Pin": pb.PinRequest,
    "Unpin": pb.UnpinRequest,
    "Delete": pb.DeleteRequest,
}


def request_for(rpc: str, **fields: Any) -> Any:
    """A request for `rpc` that is valid except for what `fields` overrides."""
    values: dict[str, Any] = {"namespace": wire_ns(), "keys": SEED_KEYS[:1]}
    if rpc == "Pin":
        values["ttl_ms"] = 1000
    values.update(fields)
    values = {key: value for key, value in values.items() if value is not None}
    return REQUEST_TYPES[rpc](**values)


async def call_rpc(stub: pb_grpc.KVStoreStub, rpc: str, request: Any) -> Any:
    if rpc == "GetBlocks":
        return await drain_stream(stub.GetBlocks(request, timeout=5))
    return await getattr(stub, rpc)(request, timeout=5)


BAD_NAMESPACES: list[tuple[str, dict[str, Any], str]] = [
    ("missing-namespace", {"namespace": None}, "namespace is required"),
    ("missing-layout", {"namespace": pb.Namespace(tenant="a", model_fingerprint="m")}, "layout"),
    ("missing-tenant", {"namespace": wire_ns(tenant="")}, "namespace.tenant is required"),
    ("missing-model", {"namespace": wire_ns(model_fingerprint="")}, "model_fingerprint"),
    ("long-tenant", {"namespace": wire_ns(tenant="t" * 300)}, "limit is 256"),
    ("tp-rank", {"namespace": wire_ns(tp_rank=2, tp_size=2)}, "tp_rank 2"),
    (
        "dtype-unspecified",
        {"namespace": wire_ns(layout=wire_layout(dtype=pb.DTYPE_UNSPECIFIED))},
        "dtype is required",
    ),
    ("dtype-unknown", {"namespace": wire_ns(layout=wire_layout(dtype=42))}, "dtype 42"),
    ("zero-layers", {"namespace": wire_ns(layout=wire_layout(num_layers=0))}, "num_layers"),
    (
        "huge-layers",
        {"namespace": wire_ns(layout=wire_layout(num_layers=1_000_000))},
        "num_layers must be an integer in [1, 1024]",
    ),
    ("zero-heads", {"namespace": wire_ns(layout=wire_layout(num_kv_heads=0))}, "num_kv_heads"),
    ("zero-block-tokens", {"namespace": wire_ns(layout=wire_layout(block_tokens=0))}, "tokens"),
    ("huge-head-dim", {"namespace": wire_ns(layout=wire_layout(head_dim=2**31))}, "head_dim"),
]
BAD_KEYS: list[tuple[str, dict[str, Any], str]] = [
    ("empty-key", {"keys": [SEED_KEYS[0], b""]}, "keys[1] is empty"),
    ("long-key", {"keys": [b"k" * 65]}, "65 bytes; keys are at most 64"),
    ("too-many-keys", {"keys": [b"%d" % i for i in range(1001)]}, "limit is 1000"),
]


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        pytest.param(fields, fragment, id=name)
        for name, fields, fragment in BAD_NAMESPACES + BAD_KEYS
    ],
)
async def test_bad_request_is_invalid_argument(
    rpc: str, fields: dict[str, Any], fragment: str, stub: pb_grpc.KVStoreStub, seed: Seed
) -> None:
    error = await rpc_error(call_rpc(stub, rpc, request_for(rpc, **fields)))
    assert error.code() == INVALID, error.details()
    assert fragment in (error.details() or "")
    await seed.assert_intact()


@pytest.mark.parametrize("rpc", ["GetBlocks", "Pin", "Unpin", "Delete"])
async def test_empty_key_list_is_rejected(rpc: str, stub: pb_grpc.KVStoreStub, seed: Seed) -> None:
    error = await rpc_error(call_rpc(stub, rpc, request_for(rpc, keys=[])))
    assert error.code() == INVALID
    assert "keys is empty" in (error.details() or "")
    await seed.assert_intact()


async def test_empty_lookup_is_a_miss_not_an_error(stub: pb_grpc.KVStoreStub) -> None:
    reply = await stub.LookupPrefix(pb.LookupPrefixRequest(namespace=wire_ns()), timeout=5)
    assert reply.num_matched == 0
    assert reply.block_bytes == LAYOUT.block_bytes


async def test_pin_needs_a_ttl(stub: pb_grpc.KVStoreStub, seed: Seed) -> None:
    error = await rpc_error(stub.Pin(request_for("Pin", ttl_ms=0), timeout=5))
    assert error.code() == INVALID
    assert "ttl_ms is required" in (error.details() or "")
    assert (await seed.client.stats()).num_pinned == 0
    await seed.assert_intact()


@pytest.mark.parametrize("rpc", [*RPCS, "Stats"])
async def test_unknown_field_is_rejected(rpc: str, channel: grpc.aio.Channel, seed: Seed) -> None:
    request = pb.StatsRequest() if rpc == "Stats" else request_for(rpc)
    raw = request.SerializeToString() + UNKNOWN_FIELD
    path = f"/kvstore.v1.KVStore/{rpc}"
    if rpc == "GetBlocks":
        call = drain_stream(channel.unary_stream(path)(raw, timeout=5))
    else:
        call = channel.unary_unary(path)(raw, timeout=5)
    error = await rpc_error(call)
    assert error.code() == INVALID
    assert "unknown field number" in (error.details() or "")
    assert "99" in (error.details() or "")
    await seed.assert_intact()


async def test_unknown_field_inside_the_namespace_is_rejected(
    channel: grpc.aio.Channel, seed: Seed
) -> None:
    namespace = wire_ns().SerializeToString() + UNKNOWN_FIELD
    # LookupPrefixRequest: field 1 (namespace, length-delimited) then the keys.
    raw = bytes([0x0A, len(namespace)]) + namespace
    raw += pb.LookupPrefixRequest(keys=SEED_KEYS).SerializeToString()
    error = await rpc_error(channel.unary_unary("/kvstore.v1.KVStore/LookupPrefix")(raw))
    assert error.code() == INVALID
    assert "namespace has unknown field" in (error.details() or "")
    await seed.assert_intact()


@pytest.mark.parametrize("rpc", ["LookupPrefix", "GetBlocks", "Stats"])
async def test_garbage_bytes_are_invalid_argument(
    rpc: str, channel: grpc.aio.Channel, seed: Seed
) -> None:
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # a namespace field claiming 4 GiB
    path = f"/kvstore.v1.KVStore/{rpc}"
    if rpc == "GetBlocks":
        call = drain_stream(channel.unary_stream(path)(garbage, timeout=5))
    else:
        call = channel.unary_unary(path)(garbage, timeout=5)
    error = await rpc_error(call)
    assert error.code() == INVALID, error.details()
    assert "malformed" in (error.details() or "")
    await seed.assert_intact()


async def test_oversized_message_is_resource_exhausted(
    server: RunningServer, stub: pb_grpc.KVStoreStub, seed: Seed
) -> None:
    limit = server.config.limits.max_message_bytes
    request = pb.LookupPrefixRequest(namespace=wire_ns(), keys=[b"k" * 64] * (limit // 64 + 10))
    assert request.ByteSize() > limit
    error = await rpc_error(stub.LookupPrefix(request, timeout=5))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(limit) in (error.details() or "")
    await seed.assert_intact()


# -- LookupPrefixStream: each bad request fails its own result; the stream goes on -------------

STREAM_PATH = "/kvstore.v1.KVStore/LookupPrefixStream"
GOOD_LOOKUP = pb.LookupPrefixRequest(namespace=wire_ns(), keys=SEED_KEYS).SerializeToString()
STREAM_CASES: list[tuple[str, bytes, str]] = [
    *(
        (name, request_for("LookupPrefix", **fields).SerializeToString(), fragment)
        for name, fields, fragment in BAD_NAMESPACES + BAD_KEYS
    ),
    ("unknown-field", GOOD_LOOKUP + UNKNOWN_FIELD, "unknown field number"),
    ("garbage", b"\x0a\xff\xff\xff\xff\x0f", "malformed"),
]


def lookup_stream(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    open_stream = channel.stream_stream(
        STREAM_PATH, response_deserializer=pb.LookupPrefixResult.FromString
    )
    return open_stream(timeout=30)


async def ask(stream: grpc.aio.StreamStreamCall, raw: bytes) -> pb.LookupPrefixResult:
    await stream.write(raw)
    result = await stream.read()
    assert isinstance(result, pb.LookupPrefixResult)
    return result


async def test_lookup_stream_answers_each_bad_request_and_keeps_going(
    channel: grpc.aio.Channel, seed: Seed
) -> None:
    stream = lookup_stream(channel)
    for name, raw, fragment in STREAM_CASES:
        result = await ask(stream, raw)
        assert result.code == INVALID.value[0], (name, result.message)
        assert fragment in result.message, name
        assert not result.HasField("match"), name
        good = await ask(stream, GOOD_LOOKUP)  # the same stream, right after
        assert good.code == 0, good.message
        assert good.match.num_matched == len(SEED_KEYS)
        assert good.match.block_bytes == LAYOUT.block_bytes
    await stream.done_writing()
    assert await stream.read() is grpc.aio.EOF
    assert await stream.code() == grpc.StatusCode.OK
    await seed.assert_intact()


async def test_lookup_stream_answers_in_request_order(
    channel: grpc.aio.Channel, seed: Seed
) -> None:
    """Requests written back to back, before any result is read, are answered in order."""
    stream = lookup_stream(channel)
    requests = [
        pb.LookupPrefixRequest(namespace=wire_ns(), keys=SEED_KEYS[:count]).SerializeToString()
        for count in (3, 1, 0, 2)
    ] + [STREAM_CASES[0][1]]
    for raw in requests:
        await stream.write(raw)
    await stream.done_writing()
    results = [result async for result in stream]
    assert [result.match.num_matched for result in results[:4]] == [3, 1, 0, 2]
    assert results[4].code == INVALID.value[0]
    await seed.assert_intact()


async def test_oversized_stream_message_ends_the_stream_and_nothing_else(
    server: RunningServer, channel: grpc.aio.Channel, seed: Seed
) -> None:
    limit = server.config.limits.max_message_bytes
    request = pb.LookupPrefixRequest(namespace=wire_ns(), keys=[b"k" * 64] * (limit // 64 + 10))
    stream = lookup_stream(channel)
    assert (await ask(stream, GOOD_LOOKUP)).match.num_matched == len(SEED_KEYS)
    await stream.write(request.SerializeToString())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stream.read()
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(limit) in (raised.value.details() or "")
    await seed.assert_intact()


async def test_client_raises_the_matching_exception_classes(seed: Seed) -> None:
    with pytest.raises(InvalidArgument, match="keys are at most 64") as raised:
        await seed.client.lookup_keys([b"k" * 65])
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument, match="keys is empty") as raised:
        await seed.client.pin([], ttl_s=5)
    assert isinstance(raised.value.__cause__, grpc.aio.AioRpcError)
    with pytest.raises(InvalidArgument, match="limit is 1000"):
        await seed.client.lookup_keys([b"%d" % i for i in range(1001)])
    with pytest.raises(InvalidArgument, match="empty"):
        await seed.client.get_into([b""], torch.zeros_like(seed.kv), form=KVForm.BLOCKS)
    await seed.assert_intact()


async def test_client_rejects_a_tensor_that_does_not_match_the_layout(seed: Seed) -> None:
    wrong = torch.zeros((1, 2, 2, 16, 2, 4), dtype=torch.float16)
    with pytest.raises(InvalidArgument, match="shape"):
        await seed.client.put_blocks([b"wrong"], wrong)
    with pytest.raises(InvalidArgument, match="dtype"):
        await seed.client.put_blocks([b"wrong"], seed.kv[:1].to(torch.float32))
    await seed.assert_intact()


# -- PutBlocks -----------------------------------------------------------------------------------


def layer_bytes(fill: int) -> bytes:
    return bytes([fill]) * LAYOUT.layer_bytes


def first_message(**fields: Any) -> pb.PutBlocksRequest:
    values: dict[str, Any] = {"namespace": wire_ns(), "blocks": [pb.BlockHeader(key=b"new")]}
    values.update(fields)
    return pb.PutBlocksRequest(**{key: value for key, value in values.items() if value is not None})


def chunk(
    data: bytes, *, block: int = 0, layer: int = 0, offset: int = 0, layer_sum: int | None = None
) -> pb.LayerChunk:
    return pb.LayerChunk(
        block_index=block,
        layer=layer,
        offset=offset,
        data=data,
        layer_checksum=checksum(data) if layer_sum is None else layer_sum,
    )


def whole_block(block: int = 0) -> list[pb.LayerChunk]:
    return [chunk(layer_bytes(layer + 1), block=block, layer=layer) for layer in range(2)]


async def stream_of(messages: list[pb.PutBlocksRequest]) -> AsyncIterator[pb.PutBlocksRequest]:
    for message in messages:
        yield message


PUT_CASES: list[tuple[str, list[pb.PutBlocksRequest], grpc.StatusCode, str]] = [
    ("empty-stream", [], INVALID, "stream was empty"),
    (
        "no-namespace",
        [first_message(namespace=None, chunks=whole_block())],
        INVALID,
        "namespace is required",
    ),
    (
        "bad-namespace",
        [first_message(namespace=wire_ns(layout=wire_layout(dtype=0)))],
        INVALID,
        "dtype is required",
    ),
    (
        "namespace-repeated",
        [first_message(), pb.PutBlocksRequest(namespace=wire_ns(), chunks=whole_block())],
        INVALID,
        "first message",
    ),
    (
        "unknown-checksum-kind",
        [first_message(checksum_kind=9, chunks=whole_block())],
        INVALID,
        "checksum_kind 9",
    ),
    (
        "bad-checksum",
        [first_message(chunks=[chunk(layer_bytes(1), layer_sum=12345)])],
        grpc.StatusCode.DATA_LOSS,
        "checksum",
    ),
    (
        "layer-too-long",
        [first_message(chunks=[chunk(layer_bytes(1) + b"\x00")])],
        INVALID,
        f"a layer is {LAYOUT.layer_bytes} bytes",
    ),
    (
        "layer-out-of-range",
        [first_message(chunks=[chunk(layer_bytes(1), layer=2)])],
        INVALID,
        "has 2 layers",
    ),
    (
        "undeclared-block",
        [first_message(chunks=[chunk(layer_bytes(1), block=1)])],
        INVALID,
        "declare a block",
    ),
    (
        "out-of-order-offset",
        [first_message(chunks=[chunk(layer_bytes(1)[:64], offset=64)])],
        INVALID,
        "offset 64",
    ),
    (
        "overlapping-chunks",
        # Each chunk ends the K half or the layer, as the put floor asks of short ones.
        [
            first_message(
                chunks=[chunk(layer_bytes(1)[:512]), chunk(layer_bytes(1)[256:], offset=256)]
            )
        ],
        INVALID,
        "without gaps or overlap",
    ),
    (
        "empty-chunk",
        [first_message(chunks=[chunk(b"")])],
        INVALID,
        "empty chunk",
    ),
    (
        "incomplete-block",
        [first_message(chunks=whole_block()[:1])],
        INVALID,
        "incomplete",
    ),
    (
        "declared-twice",
        [first_message(blocks=[pb.BlockHeader(key=b"x"), pb.BlockHeader(key=b"x")])],
        INVALID,
        "declared twice",
    ),
    (
        "empty-key",
        [first_message(blocks=[pb.BlockHeader(key=b"")])],
        INVALID,
        "empty",
    ),
    (
        "long-key",
        [first_message(blocks=[pb.BlockHeader(key=b"k" * 65)])],
        INVALID,
        "at most 64",
    ),
    (
        "long-parent-key",
        [first_message(blocks=[pb.BlockHeader(key=b"k", parent_key=b"p" * 65)])],
        INVALID,
        "parent_key",
    ),
]


@pytest.mark.parametrize(
    ("messages", "code", "fragment"),
    [
        pytest.param(messages, code, fragment, id=name)
        for name, messages, code, fragment in PUT_CASES
    ],
)
async def test_bad_put_is_rejected_and_reclaimed(
    messages: list[pb.PutBlocksRequest],
    code: grpc.StatusCode,
    fragment: str,
    stub: pb_grpc.KVStoreStub,
    seed: Seed,
) -> None:
    before = await stub.Stats(pb.StatsRequest(), timeout=5)
    error = await rpc_error(stub.PutBlocks(stream_of(messages), timeout=5))
    assert error.code() == code, error.details()
    assert fragment in (error.details() or "")

    after = await stub.Stats(pb.StatsRequest(), timeout=5)
    assert after.tiers[0].used_bytes == before.tiers[0].used_bytes, "a failed put leaked pages"
    assert after.blocks_put == before.blocks_put
    lookup = await stub.LookupPrefix(
        pb.LookupPrefixRequest(namespace=wire_ns(), keys=[b"new"]), timeout=5
    )
    assert lookup.num_matched == 0
    await seed.assert_intact()


async def test_bad_checksum_is_counted(stub: pb_grpc.KVStoreStub, seed: Seed) -> None:
    before = await stub.Stats(pb.StatsRequest(), timeout=5)
    messages = [first_message(chunks=[chunk(layer_bytes(1), layer_sum=1)])]
    error = await rpc_error(stub.PutBlocks(stream_of(messages), timeout=5))
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert "not stored" in (error.details() or "")
    after = await stub.Stats(pb.StatsRequest(), timeout=5)
    assert after.checksum_failures == before.checksum_failures + 1
    await seed.assert_intact()


async def test_blocks_before_the_bad_chunk_are_kept(stub: pb_grpc.KVStoreStub, seed: Seed) -> None:
    messages = [
        first_message(
            blocks=[pb.BlockHeader(key=b"good"), pb.BlockHeader(key=b"bad", parent_key=b"good")],
            chunks=[*whole_block(0), chunk(layer_bytes(9), block=1, layer_sum=7)],
        )
    ]
    error = await rpc_error(stub.PutBlocks(stream_of(messages), timeout=5))
    assert error.code() == grpc.StatusCode.DATA_LOSS
    lookup = await stub.LookupPrefix(
        pb.LookupPrefixRequest(namespace=wire_ns(), keys=[b"good", b"bad"]), timeout=5
    )
    assert lookup.num_matched == 1
    await seed.assert_intact()


async def test_put_with_an_unknown_field_is_rejected(
    channel: grpc.aio.Channel, stub: pb_grpc.KVStoreStub, seed: Seed
) -> None:
    put = channel.stream_unary("/kvstore.v1.KVStore/PutBlocks")
    nested = pb.LayerChunk(data=layer_bytes(1), layer_checksum=checksum(layer_bytes(1)))
    chunk_with_unknown = nested.SerializeToString() + UNKNOWN_FIELD
    cases = [
        first_message().SerializeToString() + UNKNOWN_FIELD,
        first_message().SerializeToString()
        + bytes([0x22])  # field 4 (chunks), length-delimited
        + varint(len(chunk_with_unknown))
        + chunk_with_unknown,
    ]
    for raw in cases:

        async def one(raw: bytes = raw) -> AsyncIterator[bytes]:
            yield raw

        error = await rpc_error(put(one(), timeout=5))
        assert error.code() == INVALID
        assert "unknown field number 99" in (error.details() or "")
    stats = await stub.Stats(pb.StatsRequest(), timeout=5)
    assert stats.tiers[0].num_blocks == len(SEED_KEYS)
    await seed.assert_intact()


async def test_oversized_put_message_is_resource_exhausted(
    server: RunningServer, stub: pb_grpc.KVStoreStub, seed: Seed
) -> None:
    limit = server.config.limits.max_message_bytes
    message = first_message(chunks=[chunk(b"\x00" * (limit + 1))])
    error = await rpc_error(stub.PutBlocks(stream_of([message]), timeout=5))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await seed.assert_intact()


# -- capacity --------------------------------------------------------------------------------------


async def test_full_store_of_pinned_data_is_resource_exhausted(
    server_factory: Callable[..., Awaitable[RunningServer]], make_kv: MakeKV
) -> None:
    # 32 pages of 2 KiB, one block each.
    small = await server_factory(
        **{
            "store.dram_bytes": 64 * 1024,
            "store.page_bytes": 2048,
            "store.max_put_reserved_bytes": 64 * 1024,  # one put fills DRAM
        }
    )
    async with KVClient(f"127.0.0.1:{small.port}", NS) as client:
        kv = make_kv(LAYOUT, 32, form=KVForm.BLOCKS)
        keys = [b"pinned-%d" % i for i in range(32)]
        assert (await client.put_blocks(keys, kv)).num_committed == 32
        assert await client.pin(keys[-1:], ttl_s=60) == 1  # the tail holds the whole chain
        before = await client.stats()

        with pytest.raises(ResourceExhausted, match="pinned") as raised:
            await client.put_blocks([b"one-more"], kv[:1])
        assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        after = await client.stats()
        assert after.tiers[0].evictions == before.tiers[0].evictions
        assert after.tiers[0].used_bytes == before.tiers[0].used_bytes
        dest = torch.zeros_like(kv)
        assert await client.get_into(keys, dest, form=KVForm.BLOCKS) == 32
        assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))

        assert await client.unpin(keys[-1:]) == 1
        assert (await client.put_blocks([b"one-more"], kv[:1])).num_committed == 1
        assert (await client.lookup_keys(keys)).num_matched == 31, "the tail was evicted"


@pytest.mark.parametrize("data_plane", [False, True], ids=["grpc", "data-plane"])
async def test_a_put_that_cannot_fit_raises_resource_exhausted_on_every_path(
    server_factory: Callable[..., Awaitable[RunningServer]], make_kv: MakeKV, data_plane: bool
) -> None:
    """The server ends a put that cannot fit with RESOURCE_EXHAUSTED while the client is
    still sending. grpc.aio fails the client's next write with INTERNAL ("Internal error
    from Core"); the client must report the server's status instead, on both paths."""
    # 8 pages of 2 KiB, one block each; every put below declares 16 blocks up front.
    small = await server_factory(
        **{
            "store.dram_bytes": 16 * 1024,
            "store.page_bytes": 2048,
            "store.max_put_reserved_bytes": 32 * 1024,  # the limit is DRAM's, not the put's
        }
    )
    options = ClientOptions(data_plane=data_plane)
    kv = make_kv(LAYOUT, 16, form=KVForm.BLOCKS)
    async with KVClient(f"127.0.0.1:{small.port}", NS, options=options) as client:
        pinned = [b"held-%d" % i for i in range(8)]
        assert (await client.put_blocks(pinned, kv[:8])).num_committed == 8
        assert await client.pin(pinned[-1:], ttl_s=60) == 1  # nothing can be evicted

        async def layer_put(keys: list[bytes]) -> None:
            async with client.layer_put(keys) as put:
                for layer in range(LAYOUT.num_layers):
                    await put.send_layer(layer, kv[:, layer].contiguous())

        for attempt in range(10):
            keys = [b"late-%d-%d" % (attempt, i) for i in range(16)]
            with pytest.raises(ResourceExhausted, match="DRAM tier is full"):
                await layer_put(keys)
            with pytest.raises(ResourceExhausted, match="DRAM tier is full"):
                await client.put_blocks(keys, kv)
        assert (await client.lookup_keys(pinned)).num_matched == 8


async def test_block_larger_than_the_tier_evicts_nothing(
    stub: pb_grpc.KVStoreStub, seed: Seed
) -> None:
    huge = wire_ns(layout=wire_layout(num_layers=1024, num_kv_heads=64, head_dim=256))
    messages = [first_message(namespace=huge)]
    error = await rpc_error(stub.PutBlocks(stream_of(messages), timeout=5))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than the whole DRAM tier" in (error.details() or "")
    stats = await stub.Stats(pb.StatsRequest(), timeout=5)
    assert stats.tiers[0].evictions == 0
    await seed.assert_intact()


async def test_server_keeps_serving_after_a_burst_of_bad_requests(
    stub: pb_grpc.KVStoreStub, seed: Seed
) -> None:
    before = await stub.Stats(pb.StatsRequest(), timeout=5)
    for rpc in RPCS:
        for _, fields, _ in BAD_NAMESPACES + BAD_KEYS:
            with pytest.raises(grpc.aio.AioRpcError):
                await call_rpc(stub, rpc, request_for(rpc, **fields))
    for _, messages, _, _ in PUT_CASES:
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.PutBlocks(stream_of(messages), timeout=5)
    stats = await stub.Stats(pb.StatsRequest(), timeout=5)
    assert stats.tiers[0].num_blocks == len(SEED_KEYS)
    assert stats.tiers[0].used_bytes == before.tiers[0].used_bytes
    assert stats.puts_abandoned > before.puts_abandoned
    await seed.assert_intact()
