"""The hand-written codec for block-carrying messages against the generated classes."""

from __future__ import annotations

import random

import pytest

from kvstore.chunkwire import (
    chunk_parts,
    decode_get_message,
    decode_put_message,
    encode_get_header,
    encode_put_header,
    run_parts,
)
from kvstore.errors import InvalidRequest
from kvstore.v1 import kvstore_pb2 as pb

EDGE_VALUES = [0, 1, 127, 128, 300, 2**21, 2**32 - 1]
CHECKSUMS = [0, 1, 2**63, 2**64 - 1]


def random_bytes(rng: random.Random, size: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(size))


@pytest.mark.parametrize("seed", range(20))
def test_get_chunks_match_the_generated_classes_both_ways(seed: int) -> None:
    rng = random.Random(seed)
    block, layer, offset = (rng.choice(EDGE_VALUES) for _ in range(3))
    checksum = rng.choice(CHECKSUMS)
    data = random_bytes(rng, rng.choice([0, 1, 200]))
    expected = pb.GetBlocksResponse(
        chunks=[
            pb.LayerChunk(
                block_index=block, layer=layer, offset=offset, data=data, layer_checksum=checksum
            )
        ],
        checksum_kind=pb.CRC32C,
        block_bytes=4096,
        num_blocks=3,
        tiers=[pb.DRAM, pb.SSD],
    )
    encoded = b"".join(
        [
            encode_get_header(checksum_kind=2, block_bytes=4096, num_blocks=3, tiers=[2, 3]),
            *chunk_parts(1, block, layer, offset, checksum, [data[:7], data[7:]]),
        ]
    )
    assert pb.GetBlocksResponse.FromString(encoded) == expected

    decoded = decode_get_message(expected.SerializeToString())
    assert (decoded.checksum_kind, decoded.block_bytes, decoded.num_blocks) == (2, 4096, 3)
    assert decoded.tiers == [2, 3]
    (chunk,) = decoded.chunks
    assert (chunk.block_index, chunk.layer, chunk.offset, chunk.layer_checksum) == (
        block,
        layer,
        offset,
        checksum,
    )
    assert bytes(chunk.data) == data


@pytest.mark.parametrize("seed", range(10))
def test_get_runs_match_the_generated_classes_both_ways(seed: int) -> None:
    rng = random.Random(seed)
    num_blocks = rng.randrange(1, 6)
    checksums = [rng.choice(CHECKSUMS) for _ in range(num_blocks)]
    data = random_bytes(rng, 16 * num_blocks)
    expected = pb.GetBlocksResponse(
        runs=[
            pb.LayerRun(
                layer=rng.choice(EDGE_VALUES),
                first_block=300,
                num_blocks=num_blocks,
                data=data,
                layer_checksums=checksums,
            )
        ]
    )
    run = expected.runs[0]
    encoded = b"".join(
        [encode_get_header(), *run_parts(6, run.layer, 300, checksums, [data[:16], data[16:]])]
    )
    assert pb.GetBlocksResponse.FromString(encoded) == expected

    (decoded,) = decode_get_message(expected.SerializeToString()).runs
    assert (decoded.layer, decoded.first_block, decoded.num_blocks) == (run.layer, 300, num_blocks)
    assert list(decoded.layer_checksums) == checksums
    assert bytes(decoded.data) == data


def test_put_messages_match_the_generated_classes_both_ways() -> None:
    namespace = pb.Namespace(tenant="t", model_fingerprint="m", tp_rank=1, tp_size=2)
    expected = pb.PutBlocksRequest(
        namespace=namespace,
        checksum_kind=pb.XXH3_64,
        blocks=[pb.BlockHeader(key=b"k1"), pb.BlockHeader(key=b"k2", parent_key=b"k1")],
        chunks=[pb.LayerChunk(block_index=1, layer=2, offset=128, data=b"xyz", layer_checksum=9)],
    )
    encoded = b"".join(
        [
            encode_put_header(
                namespace=namespace.SerializeToString(),
                checksum_kind=1,
                blocks=[(b"k1", b""), (b"k2", b"k1")],
            ),
            *chunk_parts(4, 1, 2, 128, 9, [b"xyz"]),
        ]
    )
    assert pb.PutBlocksRequest.FromString(encoded) == expected

    decoded = decode_put_message(expected.SerializeToString())
    assert decoded.namespace == namespace.SerializeToString()
    assert decoded.checksum_kind == 1
    assert [(h.key, h.parent_key) for h in decoded.blocks] == [(b"k1", b""), (b"k2", b"k1")]
    (chunk,) = decoded.chunks
    assert (chunk.block_index, chunk.layer, chunk.offset, bytes(chunk.data)) == (1, 2, 128, b"xyz")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xf8\x07\x01", "unknown field number 127"),  # field 127, varint
        (b"\x22\x05\x08", "runs past the end"),  # a chunk longer than the message
        (b"\x10\x80", "truncated"),  # a varint cut short
        (b"\x22\x02\x30\x01", "unknown field number 6"),  # field 6 inside a LayerChunk
        (b"\x22\x02\x29\x01", "truncated fixed64"),
    ],
)
def test_decoding_is_strict(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        decode_put_message(raw)
