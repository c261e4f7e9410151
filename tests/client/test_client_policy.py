"""KVClient's policy over an in-memory fake transport: no sockets, no server.

The fake keeps blocks as the puts' decoded wire messages deliver them
(kvstore.wire.chunks.decode_put_message) and answers gets with messages the real codec
encodes, so what the client sends and accepts is checked byte for byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import torch

from kvstore.client import (
    ChecksumError,
    DType,
    InvalidArgument,
    KVClient,
    KVForm,
    KVLayout,
    Namespace,
    PutOutcome,
    Unavailable,
)
from kvstore.client._auto_transport import DATA_PLANE_RETRY_S, AutoTransport
from kvstore.client._dataplane import DataPlaneUnreachable
from kvstore.client._transport import Parts
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import (
    GET_RUNS,
    GetMessage,
    decode_get_message,
    decode_put_message,
    encode_get_header,
    run_parts,
)

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=4)
NS = Namespace(tenant="acme", model_fingerprint="toy", layout=LAYOUT)
MakeKV = Callable[..., torch.Tensor]
SameBytes = Callable[[torch.Tensor, torch.Tensor], bool]


@dataclass
class StoredBlock:
    layers: dict[int, bytes] = field(default_factory=dict)
    checksums: dict[int, int] = field(default_factory=dict)


class FakePutStream:
    def __init__(self, store: FakeTransport) -> None:
        self._store = store
        self._declared: list[bytes] = []
        self._blocks: dict[bytes, StoredBlock] = {}
        self.sent_keys = self._declared
        store.puts.append(self)
        self.finished = self.cancelled = False

    async def send(self, parts: Parts) -> None:
        message = decode_put_message(b"".join(parts))
        for header in message.blocks:
            self._declared.append(header.key)
            self._blocks[header.key] = StoredBlock()
        for run in message.runs:
            layer_bytes = len(run.data) // run.num_blocks
            for offset in range(run.num_blocks):
                block = self._blocks[self._declared[run.first_block + offset]]
                data = run.data[offset * layer_bytes : (offset + 1) * layer_bytes]
                block.layers[run.layer] = bytes(data)
                block.checksums[run.layer] = run.layer_checksums[offset]
        assert not message.chunks, "this layout's layers travel as runs"

    async def finish(self) -> pb.PutBlocksResponse:
        self.finished = True
        self._store.blocks.update(self._blocks)
        return pb.PutBlocksResponse(outcomes=[pb.COMMITTED] * len(self._declared))

    def cancel(self) -> None:
        self.cancelled = True


class FakeGetStream:
    def __init__(self, messages: list[bytes]) -> None:
        self._messages = messages
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[GetMessage]:
        for message in self._messages:
            yield decode_get_message(message)

    async def aclose(self) -> None:
        self.closed = True


class FakeTransport:
    """Every call in memory; `corrupt_gets` flips a byte in what gets serve."""

    def __init__(self) -> None:
        self.blocks: dict[bytes, StoredBlock] = {}
        self.puts: list[FakePutStream] = []
        self.gets: list[FakeGetStream] = []
        self.corrupt_gets = False

    @property
    def data_plane(self) -> str | None:
        return None

    def stored_prefix(self, keys: list[bytes]) -> list[bytes]:
        prefix = []
        for key in keys:
            if key not in self.blocks:
                break
            prefix.append(key)
        return prefix

    async def lookup(
        self, request: pb.LookupPrefixRequest, deadline: float
    ) -> pb.LookupPrefixResponse:
        num_matched = len(self.stored_prefix(list(request.keys)))
        runs = [pb.TierRun(tier=pb.DRAM, num_blocks=num_matched)] if num_matched else []
        return pb.LookupPrefixResponse(num_matched=num_matched, tier_runs=runs)

    async def put(self, messages: AsyncIterator[Parts], timeout_s: float) -> pb.PutBlocksResponse:
        stream = await self.open_put(timeout_s)
        async for parts in messages:
            await stream.send(parts)
        return await stream.finish()

    async def open_put(self, timeout_s: float) -> FakePutStream:
        return FakePutStream(self)

    async def open_get(self, request: pb.GetBlocksRequest, timeout_s: float) -> FakeGetStream:
        served = [self.blocks[key] for key in self.stored_prefix(list(request.keys))]
        header = encode_get_header(
            block_bytes=LAYOUT.block_bytes, num_blocks=len(served), tiers=[pb.DRAM] * len(served)
        )
        messages = [header]
        if served:
            messages = []
            for layer in range(LAYOUT.num_layers):
                data = b"".join(block.layers[layer] for block in served)
                if self.corrupt_gets and layer == 1:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                checksums = [block.checksums[layer] for block in served]
                parts = run_parts(GET_RUNS, layer, 0, checksums, [data])
                messages.append(b"".join([header if layer == 0 else b"", *parts]))
        stream = FakeGetStream(messages)
        self.gets.append(stream)
        return stream

    async def close(self) -> None:
        pass


@pytest.fixture
def fake() -> FakeTransport:
    return FakeTransport()


@pytest.fixture
async def client(fake: FakeTransport) -> AsyncIterator[KVClient]:
    # The channel is never used: every call here goes through the fake.
    async with KVClient("fake-target:1", NS, transport=fake) as client:
        yield client


def tokens_of(num_blocks: int) -> list[int]:
    return list(range(num_blocks * LAYOUT.block_tokens))


async def test_put_skips_the_stored_prefix_and_sends_only_the_rest(
    client: KVClient, fake: FakeTransport, make_kv: MakeKV, same_bytes: SameBytes
) -> None:
    kv = make_kv(LAYOUT, 4)
    keys = client.keys(tokens_of(4))
    first = await client.put(tokens_of(2), kv[:, :, : 2 * LAYOUT.block_tokens])
    assert (first.num_skipped, first.num_committed) == (0, 2)

    result = await client.put(tokens_of(4), kv)
    assert (result.num_skipped, result.outcomes) == (2, (PutOutcome.COMMITTED,) * 2)
    assert result.bytes_sent == 2 * LAYOUT.block_bytes
    assert fake.puts[-1].sent_keys == keys[2:]

    dest = torch.zeros_like(kv)
    assert await client.get_into(keys, dest) == 4
    assert same_bytes(dest, kv), "the blocks sent after the prefix landed where they belong"


async def test_put_without_skip_cached_sends_every_block(
    client: KVClient, fake: FakeTransport, make_kv: MakeKV
) -> None:
    kv = make_kv(LAYOUT, 3)
    await client.put(tokens_of(3), kv)
    result = await client.put(tokens_of(3), kv, skip_cached=False)
    assert result.num_skipped == 0
    assert fake.puts[-1].sent_keys == client.keys(tokens_of(3))


async def test_put_of_a_stored_sequence_sends_nothing(
    client: KVClient, fake: FakeTransport, make_kv: MakeKV
) -> None:
    kv = make_kv(LAYOUT, 2)
    await client.put(tokens_of(2), kv)
    result = await client.put(tokens_of(2), kv)
    assert (result.num_skipped, result.outcomes, result.bytes_sent) == (2, (), 0)
    assert len(fake.puts) == 1


async def test_layer_put_sends_layers_in_order(
    client: KVClient, fake: FakeTransport, make_kv: MakeKV, same_bytes: SameBytes
) -> None:
    keys = [b"k0", b"k1"]
    kv = make_kv(LAYOUT, 2, form=KVForm.BLOCKS)
    async with client.layer_put(keys) as put:
        for layer in range(LAYOUT.num_layers):
            await put.send_layer(layer, kv[:, layer])
    assert put.result is not None
    assert put.result.num_committed == 2
    dest = torch.zeros_like(kv)
    assert await client.get_into(keys, dest, form=KVForm.BLOCKS) == 2
    assert same_bytes(dest, kv)


async def test_layer_put_refuses_a_layer_out_of_order(
    client: KVClient, fake: FakeTransport, make_kv: MakeKV
) -> None:
    kv = make_kv(LAYOUT, 1, form=KVForm.BLOCKS)
    with pytest.raises(InvalidArgument, match="send layer 0 next, not layer 1"):
        async with client.layer_put([b"k0"]) as put:
            await put.send_layer(1, kv[:, 1])
    (stream,) = fake.puts
    assert stream.cancelled
    assert not stream.finished
    assert put.result is None
    assert not fake.blocks


async def test_layer_put_cancels_when_the_block_raises(
    client: KVClient, fake: FakeTransport, make_kv: MakeKV
) -> None:
    kv = make_kv(LAYOUT, 1, form=KVForm.BLOCKS)
    put = client.layer_put([b"k0"])
    with pytest.raises(RuntimeError, match="prefill failed"):  # noqa: PT012 (the block is the test)
        async with put:
            await put.send_layer(0, kv[:, 0])
            raise RuntimeError("prefill failed")
    (stream,) = fake.puts
    assert stream.cancelled
    assert not stream.finished
    assert put.result is None
    assert not fake.blocks


async def test_layer_put_that_stops_short_is_cancelled(
    client: KVClient, fake: FakeTransport, make_kv: MakeKV
) -> None:
    kv = make_kv(LAYOUT, 1, form=KVForm.BLOCKS)
    with pytest.raises(InvalidArgument, match="ended after 1 of 3 layers"):
        async with client.layer_put([b"k0"]) as put:
            await put.send_layer(0, kv[:, 0])
    assert fake.puts[0].cancelled
    assert not fake.blocks


async def test_get_into_returns_the_shorter_prefix_the_store_served(
    client: KVClient, fake: FakeTransport, make_kv: MakeKV, same_bytes: SameBytes
) -> None:
    kv = make_kv(LAYOUT, 4)
    await client.put(tokens_of(2), kv[:, :, : 2 * LAYOUT.block_tokens])
    dest = torch.zeros_like(kv)
    assert await client.get_into(client.keys(tokens_of(4)), dest) == 2
    served = 2 * LAYOUT.block_tokens
    assert same_bytes(dest[:, :, :served], kv[:, :, :served])
    assert not dest[:, :, served:].any(), "nothing was written past the served prefix"
    assert fake.gets[-1].closed


async def test_get_of_nothing_stored_returns_zero(client: KVClient, fake: FakeTransport) -> None:
    dest = torch.zeros((LAYOUT.num_layers, 2, 8, 2, 8), dtype=torch.float16)
    assert await client.get_into([b"absent-0", b"absent-1"], dest) == 0
    assert fake.gets[-1].closed


async def test_a_checksum_mismatch_raises_and_closes_the_get(
    client: KVClient, fake: FakeTransport, make_kv: MakeKV
) -> None:
    kv = make_kv(LAYOUT, 2)
    await client.put(tokens_of(2), kv)
    fake.corrupt_gets = True
    stream = client.iter_layers(client.keys(tokens_of(2)))
    assert (await anext(stream)).layer == 0, "the good layer arrived"
    with pytest.raises(ChecksumError, match="layer 1: received bytes fail their XXH3_64"):
        await anext(stream)
    assert fake.gets[-1].closed


async def test_an_early_stop_closes_the_get(
    client: KVClient, fake: FakeTransport, make_kv: MakeKV
) -> None:
    await client.put(tokens_of(2), make_kv(LAYOUT, 2))
    stream = client.iter_layers(client.keys(tokens_of(2)))
    assert (await anext(stream)).layer == 0
    await stream.aclose()
    assert fake.gets[-1].closed


# -- the automatic transport -----------------------------------------------------------------


class FakeDataPlane:
    """A fake store as the data plane that discovery found."""

    address = "10.0.0.1:4000"

    def __init__(self) -> None:
        self.store = FakeTransport()

    async def lookup(
        self, request: pb.LookupPrefixRequest, deadline: float
    ) -> pb.LookupPrefixResponse:
        return await self.store.lookup(request, deadline)

    async def put(self, messages: AsyncIterator[Parts], timeout_s: float) -> pb.PutBlocksResponse:
        return await self.store.put(messages, timeout_s)

    async def open_put(self, timeout_s: float) -> FakePutStream:
        return await self.store.open_put(timeout_s)

    async def open_get(self, request: pb.GetBlocksRequest, timeout_s: float) -> FakeGetStream:
        return await self.store.open_get(request, timeout_s)

    def retire(self) -> None:
        raise AssertionError("a data plane that answers is never retired")

    def close(self) -> None:
        pass


class UnreachableDataPlane:
    """A data plane that discovery found but no connection reaches."""

    address = "127.0.0.1:9"

    def __init__(self) -> None:
        self.retired = False

    async def lookup(
        self, request: pb.LookupPrefixRequest, deadline: float
    ) -> pb.LookupPrefixResponse:
        raise DataPlaneUnreachable("cannot reach the data plane at 127.0.0.1:9: refused")

    async def put(self, messages: AsyncIterator[Parts], timeout_s: float) -> pb.PutBlocksResponse:
        raise DataPlaneUnreachable("cannot reach the data plane at 127.0.0.1:9: refused")

    async def open_put(self, timeout_s: float) -> FakePutStream:
        raise DataPlaneUnreachable("cannot reach the data plane at 127.0.0.1:9: refused")

    async def open_get(self, request: pb.GetBlocksRequest, timeout_s: float) -> FakeGetStream:
        raise DataPlaneUnreachable("cannot reach the data plane at 127.0.0.1:9: refused")

    def retire(self) -> None:
        self.retired = True

    def close(self) -> None:
        pass


class Discovery:
    """Counts how often the automatic transport asks for the data plane."""

    def __init__(self, answer: Callable[[], UnreachableDataPlane | FakeDataPlane | None]) -> None:
        self._answer = answer
        self.num_asked = 0

    async def __call__(self) -> UnreachableDataPlane | FakeDataPlane | None:
        self.num_asked += 1
        return self._answer()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_auto_transport_falls_back_and_asks_again_only_after_the_back_off(
    make_kv: MakeKV, caplog: pytest.LogCaptureFixture
) -> None:
    grpc_fake = FakeTransport()
    planes: list[UnreachableDataPlane] = []

    def find_one() -> UnreachableDataPlane:
        planes.append(UnreachableDataPlane())
        return planes[-1]

    discovery = Discovery(find_one)
    clock = Clock()
    transport = AutoTransport(grpc_fake, discovery, clock=clock)
    kv = make_kv(LAYOUT, 1)
    async with KVClient("fake-target:1", NS, transport=transport) as client:
        assert (await client.put(tokens_of(1), kv)).num_committed == 1
        assert (discovery.num_asked, len(grpc_fake.puts)) == (1, 1), "gRPC carried the put"
        assert planes[0].retired
        assert client.data_plane is None
        assert "cannot reach the data plane at 127.0.0.1:9: refused; using gRPC for 30 s" in (
            caplog.text
        )

        clock.now += DATA_PLANE_RETRY_S - 1
        dest = torch.zeros_like(kv)
        assert await client.get_into(client.keys(tokens_of(1)), dest) == 1
        assert discovery.num_asked == 1, "within the back-off: straight to gRPC"

        clock.now += 1
        blocks = make_kv(LAYOUT, 1, form=KVForm.BLOCKS)
        async with client.layer_put([b"k0"]) as put:
            for layer in range(LAYOUT.num_layers):
                await put.send_layer(layer, blocks[:, layer])
        assert discovery.num_asked == 2, "the back-off is over: asked again"
        assert len(planes) == 2
        assert planes[1].retired
        assert len(grpc_fake.puts) == 2
        assert put.result is not None


async def test_auto_transport_uses_the_data_plane_it_found(make_kv: MakeKV) -> None:
    grpc_fake, data_fake = FakeTransport(), FakeDataPlane()
    discovery = Discovery(lambda: data_fake)
    async with KVClient(
        "fake-target:1", NS, transport=AutoTransport(grpc_fake, discovery, clock=Clock())
    ) as client:
        await client.put(tokens_of(2), make_kv(LAYOUT, 2))
        await client.put(tokens_of(2), make_kv(LAYOUT, 2), skip_cached=False)
        assert client.data_plane == "10.0.0.1:4000"
        assert discovery.num_asked == 1, "found once, then kept"
        assert (len(grpc_fake.puts), len(data_fake.store.puts)) == (0, 2)


async def test_auto_transport_without_a_data_plane_asks_again_after_the_back_off(
    make_kv: MakeKV,
) -> None:
    grpc_fake = FakeTransport()
    discovery = Discovery(lambda: None)
    clock = Clock()
    async with KVClient(
        "fake-target:1", NS, transport=AutoTransport(grpc_fake, discovery, clock=clock)
    ) as client:
        await client.put(tokens_of(1), make_kv(LAYOUT, 1))
        clock.now += DATA_PLANE_RETRY_S / 2
        await client.put(tokens_of(1), make_kv(LAYOUT, 1), skip_cached=False)
        assert discovery.num_asked == 1
        clock.now += DATA_PLANE_RETRY_S / 2
        await client.put(tokens_of(1), make_kv(LAYOUT, 1), skip_cached=False)
        assert discovery.num_asked == 2
        assert len(grpc_fake.puts) == 3


async def test_whole_block_calls_refuse_the_one_layer_form(
    client: KVClient, fake: FakeTransport, make_kv: MakeKV
) -> None:
    """A `[blocks, 2, T, H, D]` tensor holds one layer: taken by a whole-block put, every
    layer stored would be that one; by a get, every layer would land in it."""
    one_layer = make_kv(LAYOUT, 2, form=KVForm.LAYER)
    keys = [b"k0", b"k1"]
    tokens = list(range(2 * LAYOUT.block_tokens))
    calls = [
        lambda: client.put(tokens, one_layer, form=KVForm.LAYER),
        lambda: client.put_blocks(keys, one_layer, form=KVForm.LAYER),
        lambda: client.get_into(keys, one_layer, form=KVForm.LAYER),
        lambda: anext(client.iter_layers(keys, one_layer, form=KVForm.LAYER)),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument, match="layer form holds one layer"):
            await call()
    # Refused before anything was sent.
    assert fake.puts == []
    assert fake.gets == []


class ClosableDataPlane(FakeDataPlane):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        self.closed = True


async def test_a_data_plane_found_after_close_is_closed_and_carries_nothing(
    make_kv: MakeKV,
) -> None:
    grpc_fake, found = FakeTransport(), ClosableDataPlane()
    searching = asyncio.Event()
    answer = asyncio.Event()

    async def slow_discovery() -> ClosableDataPlane:
        searching.set()
        await answer.wait()
        return found

    transport = AutoTransport(grpc_fake, slow_discovery, clock=Clock())
    client = KVClient("fake-target:1", NS, transport=transport)
    put = asyncio.create_task(client.put(tokens_of(1), make_kv(LAYOUT, 1), skip_cached=False))
    await searching.wait()
    await client.close()  # while the search is still out
    answer.set()
    with pytest.raises(Unavailable, match="closed"):
        await put
    assert found.closed
    assert found.store.puts == []
    assert grpc_fake.puts == []
