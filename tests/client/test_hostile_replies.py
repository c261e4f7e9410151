"""A server's replies are its word, checked before the client sizes anything from them
or writes a byte: a transport (KVClient's `transport=`) that answers what a buggy or
hostile server might."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import torch

from kvstore.checksum import ChecksumKind, checksum, checksums_of_slices
from kvstore.client import ChecksumError, DType, KVClient, KVLayout, Namespace, ProtocolError
from kvstore.client._receive import LayerReceiver
from kvstore.codec import KVForm
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import (
    GET_CHUNKS,
    GET_RUNS,
    GetMessage,
    chunk_parts,
    decode_get_message,
    encode_get_header,
    run_parts,
)

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=4)
NAMESPACE = Namespace(tenant="a", model_fingerprint="m", layout=LAYOUT)


class Replies:
    def __init__(self, messages: list[bytes]) -> None:
        self._messages = messages

    async def __aiter__(self) -> AsyncIterator[GetMessage]:
        for message in self._messages:
            yield decode_get_message(message)

    async def aclose(self) -> None:
        pass


class HostileTransport:
    """Answers every get with `num_blocks` blocks over `layers` layers (a count, or the
    layers to send, in order), each verified by its checksum, and every lookup with
    `lookup`."""

    data_plane = None

    def __init__(
        self,
        num_blocks: int,
        layers: int | list[int],
        lookup: pb.LookupPrefixResponse | None = None,
        layout: KVLayout = LAYOUT,
    ) -> None:
        self._num_blocks, self._lookup, self._layout = num_blocks, lookup, layout
        self._layers = list(range(layers)) if isinstance(layers, int) else layers

    async def open_get(self, request: pb.GetBlocksRequest, timeout_s: float) -> Replies:
        header = encode_get_header(
            block_bytes=self._layout.block_bytes, num_blocks=self._num_blocks, checksum_kind=1
        )
        messages = []
        for layer in self._layers:
            data = b"".join(
                bytes([block + 1 + 10 * layer]) * self._layout.layer_bytes
                for block in range(self._num_blocks)
            )
            checksums = checksums_of_slices(
                ChecksumKind.XXH3_64, memoryview(data), self._layout.layer_bytes
            )
            parts = run_parts(GET_RUNS, layer, 0, checksums, [data])
            messages.append((b"" if messages else header) + b"".join(bytes(p) for p in parts))
        return Replies(messages)

    async def lookup(
        self, request: pb.LookupPrefixRequest, deadline: float
    ) -> pb.LookupPrefixResponse:
        assert self._lookup is not None
        return self._lookup

    async def close(self) -> None:
        pass


async def test_more_blocks_than_asked_are_refused_before_any_is_written() -> None:
    client = KVClient("hostile:1", NAMESPACE, transport=HostileTransport(3, 2))
    keys = client.keys(list(range(8)))  # two blocks asked
    room_for_four = torch.zeros((2, 2, 16, 2, 8), dtype=torch.float16)
    with pytest.raises(ChecksumError, match="announced 3 blocks for a get of 2"):
        await client.get_into(keys, room_for_four)
    assert not room_for_four.any()


async def test_a_layer_past_the_last_is_refused_before_it_lands_anywhere() -> None:
    client = KVClient("hostile:1", NAMESPACE, transport=HostileTransport(2, 3))
    keys = client.keys(list(range(8)))
    dest = torch.zeros((2, 2, 8, 2, 8), dtype=torch.float16)  # layers, K/V, tokens, ...
    arrivals: list[int] = []

    async def read_all() -> None:
        async for arrival in client.iter_layers(keys, dest):
            arrivals.append(arrival.layer)

    with pytest.raises(ChecksumError, match="to layer 2"):
        await read_all()
    assert arrivals == [0, 1]  # both whole and verified before the stray layer came
    # Layer 0, handed out as verified, still holds exactly what was verified: block b's
    # bytes are all b + 1. A stray layer 2 of block 0 would have landed on block 1's.
    layer_zero = dest[0].view(torch.uint8)
    assert layer_zero[:, :4].eq(1).all()
    assert layer_zero[:, 4:].eq(2).all()


async def test_a_missing_layer_is_refused_after_the_layers_before_it_are_handed_out() -> None:
    layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=4)
    namespace = Namespace(tenant="a", model_fingerprint="m", layout=layout)
    client = KVClient(
        "hostile:1", namespace, transport=HostileTransport(2, [0, 1, 3], layout=layout)
    )
    keys = client.keys(list(range(8)))
    arrivals: list[int] = []

    async def read_all() -> None:
        async for arrival in client.iter_layers(keys):
            arrivals.append(arrival.layer)

    with pytest.raises(ChecksumError, match="from layer 1 to layer 3"):
        await read_all()
    assert arrivals == [0, 1]  # layer 1 was whole and verified: it is not held back


@pytest.mark.parametrize(
    "reply",
    [
        pb.LookupPrefixResponse(num_matched=5, block_bytes=LAYOUT.block_bytes),
        pb.LookupPrefixResponse(
            num_matched=1,
            block_bytes=LAYOUT.block_bytes,
            tier_runs=[pb.TierRun(tier=pb.DRAM, num_blocks=10**9)],
        ),
    ],
    ids=["more-matched-than-asked", "tier-runs-past-the-match"],
)
async def test_a_lookup_reply_claiming_more_than_was_asked_is_a_protocol_error(
    reply: pb.LookupPrefixResponse,
) -> None:
    client = KVClient("hostile:1", NAMESPACE, transport=HostileTransport(0, 0, reply))
    with pytest.raises(ProtocolError):
        await client.lookup(list(range(8)))


class OddTransport(HostileTransport):
    """Answers with a reply of its own making."""

    def __init__(self, reply: bytes) -> None:
        super().__init__(0, 0)
        self._reply = reply

    async def open_get(self, request: pb.GetBlocksRequest, timeout_s: float) -> Replies:
        return Replies([self._reply])


@pytest.mark.parametrize(
    "reply",
    [
        encode_get_header(block_bytes=LAYOUT.block_bytes, num_blocks=1, checksum_kind=99),
        encode_get_header(block_bytes=LAYOUT.block_bytes, num_blocks=1, checksum_kind=1)
        + b"".join(
            bytes(part)
            for part in chunk_parts(
                GET_CHUNKS,
                0,
                0,
                0,
                0,
                [bytes(LAYOUT.layer_bytes + 2)],  # past its layer
            )
        ),
    ],
    ids=["unknown-checksum-kind", "chunk-past-its-layer"],
)
async def test_a_reply_that_does_not_fit_is_a_client_error(reply: bytes) -> None:
    client = KVClient("hostile:1", NAMESPACE, transport=OddTransport(reply))
    keys = client.keys(list(range(4)))
    with pytest.raises(ChecksumError, match="does not fit"):
        await client.get_into(keys, torch.zeros((2, 2, 4, 2, 8), dtype=torch.float16))


class OutcomesTransport(HostileTransport):
    """Answers every put with `outcomes`, whatever it carried."""

    def __init__(self, outcomes: list[int]) -> None:
        super().__init__(0, 0)
        self._outcomes = outcomes

    async def put(self, messages: AsyncIterator[object], timeout_s: float) -> pb.PutBlocksResponse:
        async for _ in messages:
            pass
        return pb.PutBlocksResponse(outcomes=self._outcomes)


@pytest.mark.parametrize("num_outcomes", [0, 1, 7])
async def test_a_put_answered_with_another_number_of_outcomes_is_a_protocol_error(
    num_outcomes: int,
) -> None:
    transport = OutcomesTransport([pb.COMMITTED] * num_outcomes)
    client = KVClient("hostile:1", NAMESPACE, transport=transport)
    kv = torch.zeros(2, LAYOUT.num_layers, *LAYOUT.layer_shape, dtype=torch.float16)
    with pytest.raises(ProtocolError, match=f"put of 2 blocks with {num_outcomes} outcomes"):
        await client.put_blocks([b"k0", b"k1"], kv)
    await client.close()


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_layer_data_after_serving_no_block_is_a_checksum_error(layer: int) -> None:
    """A reply that says no block is served and still carries a run is refused as the
    server's fault (a ChecksumError), not an assertion of the client's."""
    first = decode_get_message(
        encode_get_header(checksum_kind=1, block_bytes=LAYOUT.block_bytes, num_blocks=2)
    )
    data = bytes(LAYOUT.layer_bytes)
    parts = run_parts(GET_RUNS, layer, 0, [checksum(ChecksumKind.XXH3_64, data)], [data])
    reply = encode_get_header(served_none=True) + b"".join(bytes(part) for part in parts)
    receiver = LayerReceiver(LAYOUT, first, None, KVForm.BLOCKS, verify=True, max_blocks=2)
    with pytest.raises(ChecksumError, match="served no block"):
        list(receiver.accept(decode_get_message(reply)))
