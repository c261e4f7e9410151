"""The real client against the real server on 127.0.0.1, port 0: round trips and lifecycles."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvstore.client import (
    ChecksumError,
    ClientOptions,
    DataLoss,
    DeadlineExceeded,
    DType,
    InvalidArgument,
    KVClient,
    KVForm,
    KVLayout,
    KVStoreClientError,
    Namespace,
    PutOutcome,
    ResourceExhausted,
    SyncKVClient,
    TierKind,
    Timeouts,
    Unavailable,
)
from kvstore.server import RunningServer
from kvstore.server.servicer import REFUSED_PUT_READ_ON_S
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire.namespace import namespace_to_wire as wire_namespace

MiB = 1 << 20
Connect = Callable[..., KVClient]
MakeKV = Callable[..., torch.Tensor]
SameBytes = Callable[[torch.Tensor, torch.Tensor], bool]
Poll = Callable[..., Awaitable[None]]


def layout(**overrides: object) -> KVLayout:
    fields: dict[str, object] = {
        "num_layers": 3,
        "num_kv_heads": 2,
        "head_dim": 8,
        "dtype": DType.FLOAT16,
        "block_tokens": 16,
    }
    fields.update(overrides)
    return KVLayout(**fields)  # type: ignore[arg-type]


def namespace(lay: KVLayout | None = None, **overrides: object) -> Namespace:
    fields: dict[str, object] = {"tenant": "acme", "model_fingerprint": "toy-7b@sha:1234"}
    fields.update(overrides)
    return Namespace(layout=lay or layout(), **fields)  # type: ignore[arg-type]


def tokens(num_blocks: int, lay: KVLayout, *, start: int = 0, extra: int = 0) -> list[int]:
    return list(range(start, start + num_blocks * lay.block_tokens + extra))


def dram(stats: pb.StatsResponse) -> pb.TierStats:
    (tier,) = [tier for tier in stats.tiers if tier.tier == pb.DRAM]
    return tier


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("block_tokens", [16, 64, 256, 512])
@pytest.mark.parametrize("dtype", list(DType), ids=lambda d: d.name.lower())
async def test_put_lookup_get_round_trip(
    block_tokens: int, dtype: DType, connect: Connect, make_kv: MakeKV, same_bytes: SameBytes
) -> None:
    lay = layout(block_tokens=block_tokens, dtype=dtype)
    client = connect(namespace(lay))
    toks = tokens(3, lay, extra=5)  # a trailing partial block is not stored
    kv = make_kv(lay, 3, extra_tokens=5, seed=block_tokens)
    assert (await client.lookup(toks)).num_matched == 0

    result = await client.put(toks, kv)
    assert result.outcomes == (PutOutcome.COMMITTED,) * 3
    assert result.bytes_sent == 3 * lay.block_bytes

    match = await client.lookup(toks)
    assert match.num_matched == 3
    assert match.tiers == (TierKind.DRAM,) * 3
    assert match.num_matched_tokens == 3 * block_tokens

    dest = torch.zeros_like(kv)
    assert await client.get_into(match, dest) == 3
    full = 3 * block_tokens
    assert same_bytes(dest[:, :, :full], kv[:, :, :full])
    assert not dest[:, :, full:].view(torch.uint8).any(), "the partial block must stay untouched"


@pytest.mark.parametrize("dtype", [DType.BFLOAT16, DType.FLOAT8_E5M2, DType.INT8])
async def test_blocks_form_with_caller_keys(
    dtype: DType, connect: Connect, make_kv: MakeKV, same_bytes: SameBytes
) -> None:
    lay = layout(dtype=dtype)
    client = connect(namespace(lay))
    keys = [b"vllm-block-%d" % i for i in range(4)]
    kv = make_kv(lay, 4, form=KVForm.BLOCKS)
    assert (await client.put_blocks(keys[:2], kv[:2])).num_committed == 2
    assert (await client.put_blocks(keys[2:], kv[2:], parent_key=keys[1])).num_committed == 2
    dest = torch.zeros_like(kv)
    assert await client.get_into(keys, dest, form=KVForm.BLOCKS) == 4
    assert same_bytes(dest, kv)


async def test_get_serves_the_stored_prefix_only(
    connect: Connect, make_kv: MakeKV, same_bytes: SameBytes
) -> None:
    lay = layout()
    client = connect(namespace(lay))
    keys = [b"k0", b"k1", b"k2"]
    kv = make_kv(lay, 3, form=KVForm.BLOCKS)
    await client.put_blocks(keys[:2], kv[:2])
    dest = torch.zeros((4, *kv.shape[1:]), dtype=kv.dtype)
    assert await client.get_into([*keys[:2], b"absent", keys[2]], dest, form=KVForm.BLOCKS) == 2
    assert same_bytes(dest[:2], kv[:2])
    assert not dest[2:].view(torch.uint8).any()
    assert await client.get_into([b"absent", *keys], dest, form=KVForm.BLOCKS) == 0


async def test_iter_layers_yields_layers_in_order(
    connect: Connect, make_kv: MakeKV, same_bytes: SameBytes
) -> None:
    lay = layout(num_layers=5, dtype=DType.BFLOAT16)
    client = connect(namespace(lay), chunk_bytes=100)  # many small messages per layer
    kv = make_kv(lay, 4, form=KVForm.BLOCKS)
    keys = [b"block-%d" % i for i in range(4)]
    await client.put_blocks(keys, kv)

    seen = []
    async for arrival in client.iter_layers(keys):
        seen.append(arrival.layer)
        assert arrival.num_blocks == 4
        assert arrival.kv.shape == (4, *lay.layer_shape)
        assert same_bytes(arrival.kv, kv[:, arrival.layer])
    assert seen == [0, 1, 2, 3, 4]

    dest = torch.zeros_like(kv)
    layers = []
    async for arrival in client.iter_layers(keys, dest, form=KVForm.BLOCKS):
        layers.append(arrival.layer)
        assert same_bytes(dest[:, arrival.layer], kv[:, arrival.layer])
        assert arrival.kv.data_ptr() == dest[:, arrival.layer].data_ptr()
    assert layers == [0, 1, 2, 3, 4]


async def test_get_streams_layer_major_within_the_message_limit(
    server: RunningServer, connect: Connect, stub: pb_grpc.KVStoreStub, make_kv: MakeKV
) -> None:
    # 1 MiB per layer, 2 MiB per block: bigger than the server's 2 MiB message limit.
    lay = layout(num_layers=2, num_kv_heads=8, head_dim=64, block_tokens=512)
    ns = namespace(lay)
    client = connect(ns)
    keys = [b"big-0", b"big-1"]
    kv = make_kv(lay, 2, form=KVForm.BLOCKS)
    assert (await client.put_blocks(keys, kv)).num_committed == 2
    limit = server.config.limits.max_message_bytes

    ns_wire = pb.Namespace(
        tenant=ns.tenant,
        model_fingerprint=ns.model_fingerprint,
        layout=pb.KVLayout(
            num_layers=2, num_kv_heads=8, head_dim=64, dtype=pb.FLOAT16, block_tokens=512
        ),
    )
    for asked, payload_cap in ((2**32 - 1, limit - 4096), (0, 256 << 10)):
        order: list[tuple[int, int, int]] = []
        received: dict[tuple[int, int], bytearray] = {}
        replies = stub.GetBlocks(
            pb.GetBlocksRequest(namespace=ns_wire, keys=keys, max_chunk_bytes=asked), timeout=10
        )
        first = True
        async for reply in replies:
            assert reply.ByteSize() <= limit
            assert sum(len(chunk.data) for chunk in reply.chunks) <= payload_cap
            if first:
                assert (reply.num_blocks, reply.block_bytes) == (2, lay.block_bytes)
                assert list(reply.tiers) == [pb.DRAM, pb.DRAM]
                assert reply.checksum_kind == pb.XXH3_64
                first = False
            for chunk in reply.chunks:
                order.append((chunk.layer, chunk.block_index, chunk.offset))
                received.setdefault((chunk.block_index, chunk.layer), bytearray()).extend(
                    chunk.data
                )
        assert order == sorted(order), "chunks must come layer by layer, blocks in order"
        assert {layer for layer, _, _ in order} == {0, 1}
        for (block, layer_index), data in received.items():
            assert (
                bytes(data)
                == kv[block, layer_index].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            )


async def test_layer_put_then_get(
    connect: Connect, make_kv: MakeKV, same_bytes: SameBytes, stub: pb_grpc.KVStoreStub, poll: Poll
) -> None:
    lay = layout(num_layers=4)
    client = connect(namespace(lay), chunk_bytes=256)
    keys = client.keys(tokens(3, lay))
    blocks = make_kv(lay, 3, form=KVForm.BLOCKS, seed=3)
    written_before = dram(await stub.Stats(pb.StatsRequest())).bytes_written

    async with client.layer_put(keys) as put:
        for layer in range(lay.num_layers):
            await put.send_layer(layer, blocks[:, layer])
            if layer == 0:

                async def layer_zero_arrived() -> bool:
                    stats = await stub.Stats(pb.StatsRequest())
                    return dram(stats).bytes_written >= written_before + 3 * lay.layer_bytes

                await poll(layer_zero_arrived)
                assert (await client.lookup_keys(keys)).num_matched == 0, (
                    "a block must not be visible before all its layers arrived"
                )
    assert put.result is not None
    assert put.result.outcomes == (PutOutcome.COMMITTED,) * 3
    assert (await client.lookup_keys(keys)).num_matched == 3

    dest = torch.zeros_like(blocks)
    assert await client.get_into(keys, dest, form=KVForm.BLOCKS) == 3
    assert same_bytes(dest, blocks)


async def test_layer_put_checks_its_inputs(connect: Connect, make_kv: MakeKV) -> None:
    lay = layout()
    client = connect(namespace(lay))
    blocks = make_kv(lay, 2, form=KVForm.BLOCKS)
    with pytest.raises(InvalidArgument, match="at least one key"):
        client.layer_put([])
    with pytest.raises(InvalidArgument, match="layer 0 next"):
        async with client.layer_put([b"a", b"b"]) as put:
            await put.send_layer(1, blocks[:, 1])
    with pytest.raises(InvalidArgument, match="after 1 of 3 layers"):
        async with client.layer_put([b"a", b"b"]) as put:
            await put.send_layer(0, blocks[:, 0])
    assert (await client.lookup_keys([b"a"])).num_matched == 0


async def test_a_layer_put_whose_send_failed_raises_that_failure_from_then_on(
    connect: Connect,
    server_factory: Callable[..., Awaitable[RunningServer]],
    make_kv: MakeKV,
    same_bytes: SameBytes,
) -> None:
    """A layer put that cannot fit a 4 MiB store is refused at its first layer (the
    blocks it has started but not finished exceed what the store lets one put hold). Once a
    send has raised that, a caller that goes on (a later layer, the same layer again,
    the block's end) gets the same refusal, not a complaint about layer order or about
    a put that stopped short, nothing is sent on the ended stream, and the stream is
    closed once. The second layer goes after the server's brief read-on of a refused
    gRPC put (REFUSED_PUT_READ_ON_S), so on both transports it is the send that raises."""
    small = await server_factory(store__dram_bytes=4 * MiB)
    lay = layout(num_layers=4, num_kv_heads=8, head_dim=128)  # 64 KiB layers
    client = connect(namespace(lay), at=f"127.0.0.1:{small.port}")
    num_blocks = 64  # 16 MiB
    kv_layer = torch.ones(num_blocks, 2, lay.block_tokens, lay.num_kv_heads, lay.head_dim).half()
    raised: list[tuple[int, KVStoreClientError]] = []
    with pytest.raises(ResourceExhausted) as at_the_end:  # noqa: PT012 (the put is the test)
        async with client.layer_put([b"big-%d" % i for i in range(num_blocks)]) as put:
            for layer in range(lay.num_layers):
                try:
                    await put.send_layer(layer, kv_layer)
                except KVStoreClientError as error:
                    raised.append((layer, error))
                if layer == 0:
                    await asyncio.sleep(4 * REFUSED_PUT_READ_ON_S)
            assert raised, "no send saw the refusal"
            with pytest.raises(ResourceExhausted, match="already failed"):
                await put.send_layer(raised[0][0], kv_layer)  # the failed layer again
    (failed_at, first), *later = raised
    assert isinstance(first, ResourceExhausted)
    assert "already failed" not in str(first)
    assert later, "the layers after the failure were not refused again"
    for layer, error in later:
        assert isinstance(error, ResourceExhausted), layer
        assert f"already failed at layer {failed_at}" in str(error), layer
    assert "already failed" in str(at_the_end.value)
    # As most callers write it: the failed send's error leaves the block.
    with pytest.raises(ResourceExhausted) as left:  # noqa: PT012 (the put is the test)
        async with client.layer_put([b"big-again-%d" % i for i in range(num_blocks)]) as put:
            for layer in range(lay.num_layers):
                await put.send_layer(layer, kv_layer)
                await asyncio.sleep(4 * REFUSED_PUT_READ_ON_S)
    assert "already failed" not in str(left.value)
    assert client._settle.in_flight == 0  # each stream was closed once, not twice
    stored = make_kv(lay, 2, form=KVForm.BLOCKS)
    assert (await client.put_blocks([b"after-0", b"after-1"], stored)).num_committed == 2
    dest = torch.zeros_like(stored)
    assert await client.get_into([b"after-0", b"after-1"], dest, form=KVForm.BLOCKS) == 2
    assert same_bytes(dest, stored)


async def test_concurrent_puts_of_one_block_commit_it_once(
    connect: Connect, make_kv: MakeKV, same_bytes: SameBytes
) -> None:
    lay = layout(num_layers=2)
    first, second = connect(namespace(lay)), connect(namespace(lay))
    a_kv = make_kv(lay, 1, form=KVForm.BLOCKS, seed=1)
    b_kv = make_kv(lay, 1, form=KVForm.BLOCKS, seed=2)
    async with first.layer_put([b"shared"]) as put_a:
        async with second.layer_put([b"shared"]) as put_b:
            for layer in range(2):
                await put_a.send_layer(layer, a_kv[:, layer])
                await put_b.send_layer(layer, b_kv[:, layer])
        assert put_b.result is not None
    assert put_a.result is not None
    outcomes = {put_a.result.outcomes[0], put_b.result.outcomes[0]}
    assert outcomes == {PutOutcome.COMMITTED, PutOutcome.ALREADY_PRESENT}
    winner = b_kv if put_b.result.outcomes[0] is PutOutcome.COMMITTED else a_kv
    dest = torch.zeros_like(a_kv)
    assert await first.get_into([b"shared"], dest, form=KVForm.BLOCKS) == 1
    assert same_bytes(dest, winner)


async def test_skip_cached_sends_only_missing_blocks(
    connect: Connect, make_kv: MakeKV, same_bytes: SameBytes
) -> None:
    lay = layout()
    client = connect(namespace(lay))
    toks = tokens(4, lay)
    kv = make_kv(lay, 4)
    first = await client.put(toks[: 2 * lay.block_tokens], kv[:, :, : 2 * lay.block_tokens])
    assert first.num_committed == 2
    before = await client.stats()

    result = await client.put(toks, kv)
    assert result.num_skipped == 2
    assert result.outcomes == (PutOutcome.COMMITTED,) * 2
    assert result.bytes_sent == 2 * lay.block_bytes
    after = await client.stats()
    assert after.blocks_put - before.blocks_put == 2
    # A smoke check: this server shares the test's process, so the client's CPU counts
    # too (tests/server/test_cli.py reads a daemon's own).
    assert after.process_cpu_us > before.process_cpu_us
    assert dram(after).bytes_written - dram(before).bytes_written == 2 * lay.block_bytes

    again = await client.put(toks, kv, skip_cached=False)
    assert again.outcomes == (PutOutcome.ALREADY_PRESENT,) * 4
    assert (await client.stats()).blocks_put == after.blocks_put

    dest = torch.zeros_like(kv)
    assert await client.get_into(await client.lookup(toks), dest) == 4
    assert same_bytes(dest, kv)


@pytest.mark.parametrize(
    "other",
    [
        namespace(tenant="other-tenant"),
        namespace(model_fingerprint="toy-7b@sha:5678"),
        namespace(layout(num_kv_heads=4)),
        namespace(layout(dtype=DType.BFLOAT16)),
        namespace(tp_rank=1, tp_size=2),
    ],
    ids=["tenant", "model", "layout", "dtype", "tp_rank"],
)
async def test_namespaces_isolate(other: Namespace, connect: Connect, make_kv: MakeKV) -> None:
    base = connect(namespace())
    toks = tokens(2, base.namespace.layout)
    await base.put(toks, make_kv(base.namespace.layout, 2))
    keys = base.keys(toks)
    assert (await base.lookup_keys(keys)).num_matched == 2
    stranger = connect(other)
    assert (await stranger.lookup_keys(keys)).num_matched == 0
    dest = make_kv(other.layout, 2)
    assert await stranger.get_into(keys, dest) == 0
    assert await stranger.pin(keys, ttl_s=10) == 0
    assert await stranger.delete(keys) == (0, 0)
    assert (await base.lookup_keys(keys)).num_matched == 2


async def test_key_extra_isolates_chains(connect: Connect, make_kv: MakeKV) -> None:
    plain = connect(namespace())
    salted = connect(namespace(), key_extra=b"lora-42")
    toks = tokens(2, plain.namespace.layout)
    await plain.put(toks, make_kv(plain.namespace.layout, 2))
    assert (await plain.lookup(toks)).num_matched == 2
    assert (await salted.lookup(toks)).num_matched == 0


async def test_pin_unpin_delete(connect: Connect, make_kv: MakeKV) -> None:
    client = connect(namespace())
    lay = client.namespace.layout
    toks = tokens(3, lay)
    await client.put(toks, make_kv(lay, 3))
    keys = client.keys(toks)

    assert await client.pin([*keys, b"absent"], ttl_s=30) == 3
    assert (await client.stats()).num_pinned == 3
    assert await client.delete(keys[1:2]) == (0, 2), "pinned blocks stay"
    assert await client.unpin(keys) == 3
    assert (await client.stats()).num_pinned == 0
    assert await client.unpin(keys) == 0

    assert await client.delete(keys[1:2]) == (2, 0)  # block 1 and its descendant
    assert (await client.lookup_keys(keys)).num_matched == 1
    assert await client.delete(keys[:1]) == (1, 0)
    assert (await client.lookup_keys(keys)).num_matched == 0
    assert dram(await client.stats()).used_bytes == 0


async def test_stats_counters_move(connect: Connect, make_kv: MakeKV) -> None:
    client = connect(namespace())
    lay = client.namespace.layout
    start = await client.stats()
    toks = tokens(2, lay)
    await client.put(toks, make_kv(lay, 2))  # one lookup (skip_cached), one put
    await client.get_into(await client.lookup(toks), make_kv(lay, 2))
    stats = await client.stats()
    assert stats.lookups - start.lookups == 2
    assert stats.lookup_keys - start.lookup_keys == 4
    assert stats.lookup_hits - start.lookup_hits == 2
    assert stats.blocks_put - start.blocks_put == 2
    assert stats.bytes_put - start.bytes_put == 2 * lay.block_bytes
    assert stats.blocks_got - start.blocks_got == 2
    assert stats.bytes_got - start.bytes_got == 2 * lay.block_bytes
    assert stats.num_namespaces == 1
    tier = dram(stats)
    assert tier.name == "dram"
    assert tier.capacity_bytes == 32 * MiB
    assert tier.used_bytes >= 2 * lay.block_bytes
    assert tier.num_blocks == 2
    # A tier counts a hit for every block it serves, to a lookup or a get: the second
    # lookup and the get each found both blocks; the first lookup (before the put) missed.
    assert tier.hits - dram(start).hits == 4
    assert tier.misses - dram(start).misses == 1
    assert tier.bytes_read - dram(start).bytes_read == 2 * lay.block_bytes
    assert tier.bytes_written - dram(start).bytes_written == 2 * lay.block_bytes


async def test_client_verifies_checksums(
    server: RunningServer, target: str, connect: Connect, make_kv: MakeKV
) -> None:
    ns = namespace()
    client = connect(ns)
    kv = make_kv(ns.layout, 1, form=KVForm.BLOCKS)
    await client.put_blocks([b"victim"], kv)
    # Flip one stored byte behind the server's back, as a memory fault would.
    (entry,) = server.store.find_prefix(ns, [b"victim"])
    handle = entry.copies[TierKind.DRAM]
    (view,) = server.store.dram.read(handle, 5, 1)
    server.store.dram.write(handle, 5, bytes([view[0] ^ 0x01]))

    dest = torch.zeros_like(kv)
    with pytest.raises(ChecksumError, match="checksum") as raised:
        await client.get_into([b"victim"], dest, form=KVForm.BLOCKS)
    assert isinstance(raised.value, DataLoss)
    unverified = connect(ns, verify_checksums=False)
    assert await unverified.get_into([b"victim"], dest, form=KVForm.BLOCKS) == 1
    assert not torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 512])  # layers travel in runs; in chunks
async def test_client_names_the_block_and_layer_that_fail_their_checksum(
    server: RunningServer, connect: Connect, make_kv: MakeKV, chunk_bytes: int
) -> None:
    ns = namespace()
    lay = ns.layout
    client = connect(ns, chunk_bytes=chunk_bytes)
    keys = [f"blk{i}".encode() for i in range(5)]
    kv = make_kv(lay, 5, form=KVForm.BLOCKS)
    await client.put_blocks(keys, kv)
    (entry,) = server.store.find_prefix(ns, [keys[2]])
    handle = entry.copies[TierKind.DRAM]
    at = lay.layer_bytes + 7  # inside layer 1 of block 2
    (view,) = server.store.dram.read(handle, at, 1)
    server.store.dram.write(handle, at, bytes([view[0] ^ 0x80]))

    arrived: list[int] = []

    async def receive() -> None:
        async for arrival in client.iter_layers(keys, form=KVForm.BLOCKS):
            arrived.append(arrival.layer)

    with pytest.raises(ChecksumError, match="block 2 layer 1"):
        await receive()
    assert arrived == [0]  # layer 0 was whole and verified; layer 1 was never handed over


async def test_sync_facade(target: str, make_kv: MakeKV, same_bytes: SameBytes) -> None:
    lay = layout()
    kv = make_kv(lay, 2)
    toks = tokens(2, lay)

    def scenario() -> None:
        with SyncKVClient(target, namespace(lay)) as client:
            assert client.lookup(toks).num_matched == 0
            assert client.put(toks, kv).num_committed == 2
            match = client.lookup(toks)
            assert match.num_matched == 2
            dest = torch.zeros_like(kv)
            assert client.get_into(match, dest) == 2
            assert same_bytes(dest, kv)
            assert [arrival.layer for arrival in client.iter_layers(match)] == [0, 1, 2]
            assert client.pin(match.matched_keys, 5) == 2
            assert client.unpin(match.matched_keys) == 2
            assert client.stats().blocks_put == 2
            assert client.delete(match.matched_keys[:1]) == (2, 0)
            assert client.lookup_keys(match.matched_keys).num_matched == 0

    # The server runs on this loop; the blocking client runs on its own thread and loop.
    await asyncio.to_thread(scenario)


async def test_health_reports_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kvstore.v1.KVStore"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service(channel: grpc.aio.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(file_containing_symbol="kvstore.v1.KVStore")

    replies = [reply async for reply in reflection.ServerReflectionInfo(requests(), timeout=5)]
    names = {service.name for service in replies[0].list_services_response.service}
    assert "kvstore.v1.KVStore" in names
    assert "grpc.health.v1.Health" in names
    assert replies[1].file_descriptor_response.file_descriptor_proto


# -- reclamation, deadlines, draining ------------------------------------------------------------


async def test_cancelled_layer_put_is_reclaimed(
    connect: Connect, make_kv: MakeKV, stub: pb_grpc.KVStoreStub, poll: Poll
) -> None:
    lay = layout(num_layers=4)
    client = connect(namespace(lay))
    keys = [b"doomed-%d" % i for i in range(4)]
    blocks = make_kv(lay, 4, form=KVForm.BLOCKS)
    before = await stub.Stats(pb.StatsRequest())

    async def layer_zero_stored() -> bool:
        stats = await stub.Stats(pb.StatsRequest())
        return dram(stats).bytes_written >= dram(before).bytes_written + 4 * lay.layer_bytes

    async def crash_after_layer_zero() -> None:
        async with client.layer_put(keys) as put:
            await put.send_layer(0, blocks[:, 0])
            await poll(layer_zero_stored)
            during = await stub.Stats(pb.StatsRequest())
            assert dram(during).used_bytes >= dram(before).used_bytes + 4 * lay.block_bytes
            raise RuntimeError("prefill crashed")

    with pytest.raises(RuntimeError, match="prefill crashed"):
        await crash_after_layer_zero()

    async def reclaimed() -> bool:
        stats = await stub.Stats(pb.StatsRequest())
        return (
            stats.puts_abandoned == before.puts_abandoned + 1
            and dram(stats).used_bytes == dram(before).used_bytes
        )

    await poll(reclaimed)
    assert (await client.lookup_keys(keys)).num_matched == 0
    async with client.layer_put(keys) as put:
        for layer in range(lay.num_layers):
            await put.send_layer(layer, blocks[:, layer])
    assert put.result is not None
    assert put.result.num_committed == 4


async def test_put_cut_off_by_a_closed_channel_is_reclaimed(
    target: str, stub: pb_grpc.KVStoreStub, make_kv: MakeKV, poll: Poll
) -> None:
    lay = layout(num_layers=2)
    ns = namespace(lay)
    blocks = make_kv(lay, 2, form=KVForm.BLOCKS)
    before = await stub.Stats(pb.StatsRequest())
    client = KVClient(target, ns)
    put = client.layer_put([b"cut-0", b"cut-1"])
    await put.__aenter__()
    await put.send_layer(0, blocks[:, 0])

    async def reserved() -> bool:
        stats = await stub.Stats(pb.StatsRequest())
        return dram(stats).bytes_written >= dram(before).bytes_written + 2 * lay.layer_bytes

    await poll(reserved)
    await client.close()  # the worker goes away mid-put

    async def reclaimed() -> bool:
        stats = await stub.Stats(pb.StatsRequest())
        return (
            stats.puts_abandoned == before.puts_abandoned + 1
            and dram(stats).used_bytes == dram(before).used_bytes
        )

    await poll(reclaimed)
    lookup = await stub.LookupPrefix(
        pb.LookupPrefixRequest(
            namespace=pb.Namespace(
                tenant=ns.tenant,
                model_fingerprint=ns.model_fingerprint,
                layout=pb.KVLayout(
                    num_layers=2, num_kv_heads=2, head_dim=8, dtype=pb.FLOAT16, block_tokens=16
                ),
            ),
            keys=[b"cut-0"],
        )
    )
    assert lookup.num_matched == 0


@pytest.mark.parametrize("data_plane", [False, True], ids=["grpc", "data-plane"])
async def test_a_closed_client_says_so_on_every_call(
    server_factory: Callable[..., Awaitable[RunningServer]], make_kv: MakeKV, data_plane: bool
) -> None:
    running = await server_factory()
    ns = namespace()
    client = KVClient(f"127.0.0.1:{running.port}", ns, options=ClientOptions(data_plane=data_plane))
    kv = make_kv(ns.layout, 1, form=KVForm.BLOCKS)
    assert (await client.put_blocks([b"closed-0"], kv)).num_committed == 1
    await client.close()
    calls = {
        "lookup": lambda: client.lookup_keys([b"closed-0"]),
        "get": lambda: client.get_into([b"closed-0"], torch.zeros_like(kv), form=KVForm.BLOCKS),
        "put": lambda: client.put_blocks([b"closed-1"], kv),
        "pin": lambda: client.pin([b"closed-0"], ttl_s=1),
        "stats": lambda: client.stats(),
    }
    for call in calls.values():  # each a client error that says what happened
        with pytest.raises(Unavailable, match="client is closed"):
            await call()
    assert data_plane == (running.data_plane.transfers > 0)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_second_daemon_on_a_served_port_fails_to_start(
    server_factory: Callable[..., Awaitable[RunningServer]], host: str
) -> None:
    # gRPC would share the port (SO_REUSEPORT) and split the connections between two
    # daemons that know nothing of each other's blocks; given a name, it would bind what
    # it could of the addresses it resolves (::1 beside a taken 127.0.0.1) and carry on.
    first = await server_factory()
    with pytest.raises(OSError, match=f"cannot listen on {host}:{first.port}"):
        await server_factory(listen=f"{host}:{first.port}")


async def test_every_call_has_a_deadline(make_kv: MakeKV) -> None:
    """A server that accepts calls and never answers: the client gives up on time."""
    never = asyncio.Event()

    async def hang(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await never.wait()
        return b""

    silent = grpc.aio.server()
    silent.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "kvstore.v1.KVStore",
                {
                    "LookupPrefix": grpc.unary_unary_rpc_method_handler(hang),
                    "Stats": grpc.unary_unary_rpc_method_handler(hang),
                },
            )
        ]
    )
    port = silent.add_insecure_port("127.0.0.1:0")
    await silent.start()
    try:
        options = ClientOptions(timeouts=Timeouts(lookup=0.2, control=0.2, transfer=0.2))
        async with KVClient(f"127.0.0.1:{port}", namespace(), options=options) as client:
            with pytest.raises(DeadlineExceeded):
                await client.lookup_keys([b"k"])
            with pytest.raises(DeadlineExceeded):
                await client.stats()
    finally:
        never.set()
        await silent.stop(0)


async def test_a_lookup_keeps_its_deadline_while_the_data_plane_is_being_found() -> None:
    """The first lookup also asks where the data plane is: a server that never answers
    that costs the lookup its own timeout, not the (much longer) control timeout."""
    never = asyncio.Event()

    async def hang(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await never.wait()
        return b""

    silent = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(hang)
    silent.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "kvstore.v1.KVStore", {"LookupPrefix": handler, "GetDataPlane": handler}
            )
        ]
    )
    port = silent.add_insecure_port("127.0.0.1:0")
    await silent.start()
    try:
        options = ClientOptions(timeouts=Timeouts(lookup=0.2, control=60.0))
        async with KVClient(f"127.0.0.1:{port}", namespace(), options=options) as client:
            for _ in range(2):  # the search goes on behind the first; the second waits too
                with pytest.raises(DeadlineExceeded, match="data plane"):
                    # Far below the control timeout: the lookup gave up at its own.
                    await asyncio.wait_for(client.lookup_keys([b"k"]), timeout=10)
    finally:
        never.set()
        await silent.stop(0)


async def test_drain_finishes_streams_in_flight_and_refuses_new_calls(
    server_factory: Callable[..., Awaitable[RunningServer]], make_kv: MakeKV
) -> None:
    running = await server_factory()
    target = f"127.0.0.1:{running.port}"
    lay = layout(num_layers=2, num_kv_heads=8, head_dim=64, block_tokens=256)  # 1 MiB blocks
    ns = namespace(lay)
    kv = make_kv(lay, 4, form=KVForm.BLOCKS)
    keys = [b"long-%d" % i for i in range(4)]
    async with KVClient(target, ns) as client:
        await client.put_blocks(keys, kv)

    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        async with KVClient(target, ns, options=ClientOptions(chunk_bytes=4096)) as client:
            stream = client.iter_layers(keys)
            first = await anext(stream)
            assert first.layer == 0
            drain = asyncio.create_task(running.drain())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            with pytest.raises(Unavailable):
                await client.lookup_keys(keys)
            rest = [arrival async for arrival in stream]
            assert [arrival.layer for arrival in rest] == [1]
            assert torch.equal(rest[0].kv.view(torch.uint8), kv[:, 1].view(torch.uint8))
        await asyncio.wait_for(drain, timeout=10)


async def test_a_client_that_goes_away_mid_stream_is_no_internal_error(
    server: RunningServer,
    channel: grpc.aio.Channel,
    connect: Connect,
    make_kv: MakeKV,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A GetBlocks or lookup stream whose client cancels while the server writes ends
    quietly: the failed write is not logged as an internal error, and the server goes
    on serving."""
    lay = layout(num_layers=8, block_tokens=256)  # 16 KiB layers: 32 get messages of 64 KiB
    client = connect(namespace(lay))
    keys = [b"streamed-%d" % i for i in range(16)]
    blocks = make_kv(lay, 16, form=KVForm.BLOCKS)
    assert (await client.put_blocks(keys, blocks)).num_committed == 16
    stub = pb_grpc.KVStoreStub(channel)
    request = pb.GetBlocksRequest(
        namespace=wire_namespace(namespace(lay)), keys=keys, max_chunk_bytes=64 * 1024
    )
    # Present keys, then misses: each lookup costs the server a little while.
    lookup_keys = keys + [b"absent-%d" % i for i in range(984)]
    lookup = pb.LookupPrefixRequest(namespace=wire_namespace(namespace(lay)), keys=lookup_keys)
    for attempt in range(200):
        if attempt % 10 == 0:
            get = stub.GetBlocks(request, timeout=10)
            await get.read()  # the server is now writing the other 31 messages
            get.cancel()
        stream = stub.LookupPrefixStream(timeout=10)
        await stream.write(lookup)
        await asyncio.sleep(0.0001 * (attempt % 5))
        stream.cancel()  # while its result is being written, sooner or later
    await asyncio.sleep(0.2)  # let the server's handlers see the cancellations
    internal = [record for record in caplog.records if "internal error" in record.getMessage()]
    assert internal == []
    dest = torch.zeros_like(blocks)
    assert await client.get_into(keys, dest, form=KVForm.BLOCKS) == 16
    assert torch.equal(dest.view(torch.uint8), blocks.view(torch.uint8))
