"""The hand-written codec for block-carrying messages against the generated classes."""

from __future__ import annotations

import random

import pytest

from kvstore.layout import DType, KVLayout
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire import chunks
from kvstore.wire.chunks import (
    chunk_parts,
    decode_get_message,
    decode_put_message,
    encode_get_header,
    encode_put_header,
    run_parts,
    tailed_run_message,
    uses_runs,
)
from kvstore.wire.errors import WireError

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
        (b"\x22\x02\x40\x01", "unknown field number 8"),  # field 8 inside a LayerChunk
        (b"\x22\x02\x30\x01", "travel in get replies only"),  # a compressed put chunk
        (b"\x2a\x02\x30\x01", "travel in get replies only"),  # a compressed put run
        (b"\x22\x02\x38\x01", "travel in get replies only"),  # a put chunk's raw_bytes
        (b"\x2a\x02\x38\x01", "travel in get replies only"),  # a put run's raw_bytes
        (b"\x22\x02\x29\x01", "truncated fixed64"),
    ],
)
def test_decoding_is_strict(raw: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode_put_message(raw)


def test_reply_decoding_skips_unknown_fields() -> None:
    """A newer server may add fields to GetBlocksResponse, LayerChunk and LayerRun: an
    older client reads on past them (a rolling upgrade), as protobuf itself does."""
    header = encode_get_header(checksum_kind=1, block_bytes=64, num_blocks=1, tiers=[2])
    unknown = b"\xf8\x07\x05" + b"\x82\x08\x03abc" + b"\x8d\x08\x01\x02\x03\x04"
    known_chunk = b"".join(chunk_parts(chunks.GET_CHUNKS, 0, 1, 0, 7, [b"xyz"]))
    # LayerChunk{layer: 1, layer_checksum: 7, field 8: 1, data: "xyz"}
    body = b"\x10\x01" + b"\x29" + (7).to_bytes(8, "little") + b"\x40\x01" + b"\x22\x03xyz"
    chunk_with_unknown = b"\x0a" + bytes([len(body)]) + body
    reply = header + unknown + known_chunk
    widened = header + unknown + chunk_with_unknown
    for raw in (reply, widened):
        decoded = decode_get_message(raw)
        assert (decoded.checksum_kind, decoded.block_bytes, decoded.num_blocks) == (1, 64, 1)
        assert decoded.tiers == [2]
        (chunk,) = decoded.chunks
        assert (chunk.layer, chunk.layer_checksum, bytes(chunk.data)) == (1, 7, b"xyz")


def test_reply_decoding_still_rejects_malformed_bytes() -> None:
    with pytest.raises(WireError, match="runs past the end"):
        decode_get_message(b"\x0a\x05\x08")
    with pytest.raises(WireError, match="wire type 7"):
        decode_get_message(b"\xff\x07")


def test_field_numbers_match_the_proto() -> None:
    """The named constants are the numbers the proto file declares."""
    expected = {
        "BLOCK_": pb.BlockHeader,
        "CHUNK_": pb.LayerChunk,
        "RUN_": pb.LayerRun,
        "PUT_": pb.PutBlocksRequest,
        "GET_": pb.GetBlocksResponse,
    }
    checked = 0
    for name in dir(chunks):
        for prefix, message in expected.items():
            if name.startswith(prefix) and name.isupper():
                field_name = name[len(prefix) :].lower()
                field = message.DESCRIPTOR.fields_by_name[field_name]
                assert getattr(chunks, name) == field.number, name
                checked += 1
    assert checked == sum(len(message.DESCRIPTOR.fields) for message in expected.values())


@pytest.mark.parametrize(
    ("layer_bytes", "chunk_bytes", "runs"),
    [(32 << 10, 1 << 20, True), (512 << 10, 1 << 20, True), (1 << 20, 1 << 20, False)],
)
def test_uses_runs_when_two_layers_fit_a_message(
    layer_bytes: int, chunk_bytes: int, runs: bool
) -> None:
    # 2 x 64 tokens x 8 heads x 128 dims x 2 B = 256 KiB per layer; scale by block_tokens
    layout = KVLayout(
        num_layers=2,
        num_kv_heads=8,
        head_dim=128,
        dtype=DType.BFLOAT16,
        block_tokens=layer_bytes // (2 * 8 * 128 * 2),
    )
    assert layout.layer_bytes == layer_bytes
    assert uses_runs(layout, chunk_bytes) is runs


@pytest.mark.parametrize("parent_remote", [False, True])
def test_block_headers_carry_parent_remote_both_ways(parent_remote: bool) -> None:
    expected = pb.PutBlocksRequest(
        blocks=[
            pb.BlockHeader(key=b"r0", parent_key=b"prev-run-tail", parent_remote=parent_remote),
            pb.BlockHeader(key=b"r1", parent_key=b"r0"),
        ]
    )
    encoded = encode_put_header(
        blocks=[
            chunks.WireBlockHeader(b"r0", b"prev-run-tail", parent_remote),
            (b"r1", b"r0"),
        ]
    )
    # False is not written, as protobuf leaves a default scalar out.
    assert encoded == expected.SerializeToString()

    decoded = decode_put_message(encoded).blocks
    assert [(h.key, h.parent_key, h.parent_remote) for h in decoded] == [
        (b"r0", b"prev-run-tail", parent_remote),
        (b"r1", b"r0", False),
    ]


@pytest.mark.parametrize("value", [2, 2**32, 2**64 - 1])
def test_parent_remote_reads_any_non_zero_varint_as_protobuf_does(value: int) -> None:
    raw = chunks.len_field(
        chunks.PUT_BLOCKS, chunks.len_field(1, b"k") + b"\x18" + chunks.varint(value)
    )
    assert pb.PutBlocksRequest.FromString(raw).blocks[0].parent_remote
    (header,) = decode_put_message(raw).blocks
    assert header.parent_remote


@pytest.mark.parametrize(
    ("block_header", "message"),
    [
        # parent_remote as a length-delimited field: wrong wire type for a bool.
        (b"\x0a\x01k\x1a\x01\x01", "unknown field number 3 \\(wire type 2\\)"),
        (b"\x0a\x01k\x1d\x01\x00\x00\x00", "unknown field number 3 \\(wire type 5\\)"),
        (b"\x0a\x01k\x20\x01", "unknown field number 4"),  # a field after it
        (b"\x0a\x01k\x18", "truncated"),  # the tag without its value
    ],
)
def test_block_header_decoding_stays_strict(block_header: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode_put_message(chunks.len_field(chunks.PUT_BLOCKS, block_header))


@pytest.mark.parametrize("raw_bytes", [*EDGE_VALUES[1:], 2**40])
def test_compressed_chunks_and_runs_match_the_generated_classes_both_ways(raw_bytes: int) -> None:
    data = b"compressed"
    expected = pb.GetBlocksResponse(
        chunks=[
            pb.LayerChunk(
                block_index=1,
                layer=2,
                offset=64,
                data=data,
                layer_checksum=9,
                compression=pb.LZ4_SHUFFLE,
                raw_bytes=raw_bytes,
            )
        ],
        runs=[
            pb.LayerRun(
                layer=2,
                first_block=3,
                num_blocks=2,
                data=data,
                layer_checksums=[5, 6],
                compression=pb.LZ4_SHUFFLE,
                raw_bytes=raw_bytes,
            )
        ],
    )
    encoded = b"".join(
        [
            *chunk_parts(
                chunks.GET_CHUNKS, 1, 2, 64, 9, [data], compression=1, raw_bytes=raw_bytes
            ),
            *run_parts(chunks.GET_RUNS, 2, 3, [5, 6], [data], compression=1, raw_bytes=raw_bytes),
        ]
    )
    assert pb.GetBlocksResponse.FromString(encoded) == expected
    decoded = decode_get_message(expected.SerializeToString())
    ((chunk,), (run,)) = decoded.chunks, decoded.runs
    assert (chunk.compression, chunk.raw_bytes, bytes(chunk.data)) == (1, raw_bytes, data)
    assert (run.compression, run.raw_bytes, bytes(run.data)) == (1, raw_bytes, data)


def test_raw_chunks_and_runs_carry_no_compression_fields() -> None:
    """Raw data: no bytes spent on the new fields, and an older client reads the same."""
    assert b"".join(chunk_parts(1, 0, 1, 0, 7, [b"xyz"], raw_bytes=3)) == b"".join(
        chunk_parts(1, 0, 1, 0, 7, [b"xyz"])
    )
    (chunk,) = decode_get_message(b"".join(chunk_parts(1, 0, 1, 0, 7, [b"xyz"]))).chunks
    assert (chunk.compression, chunk.raw_bytes) == (0, 0)


def test_a_namespace_sent_in_many_parts_merges_as_protobuf_merges_it() -> None:
    namespace = pb.Namespace(tenant="t", model_fingerprint="m").SerializeToString()
    # Field 1 (namespace) repeated once per byte: the parts join in order, once.
    raw = b"".join(b"\x0a\x01" + bytes([byte]) for byte in namespace)
    assert decode_put_message(raw).namespace == namespace


def test_a_put_message_has_bounded_fields_and_checksums() -> None:
    # An empty chunk costs two bytes and an object: a message of them is refused once
    # there are more than a real message could carry, not decoded to the end.
    empty_chunks = b"\x22\x00" * (chunks.MAX_PUT_FIELDS + 1)
    with pytest.raises(WireError, match="blocks, chunks and runs in one put message"):
        decode_put_message(empty_chunks)
    assert len(decode_put_message(b"\x22\x00" * 1000).chunks) == 1000
    # A run's checksums, one fixed64 field each (field 5, wire type 1).
    one = b"\x29" + bytes(8)
    too_many = one * (chunks.MAX_RUN_CHECKSUMS + 1)
    run = b"\x2a" + chunks.varint(len(too_many)) + too_many
    with pytest.raises(WireError, match="more than 65536 checksums"):
        decode_put_message(run)
    enough = one * chunks.MAX_RUN_CHECKSUMS
    (decoded,) = decode_put_message(b"\x2a" + chunks.varint(len(enough)) + enough).runs
    assert len(decoded.layer_checksums) == chunks.MAX_RUN_CHECKSUMS


# -- PUT_TAIL: a message decoded before its last run's data has arrived --------------------


def tailed_message(rng: random.Random, data_bytes: int, *, first: bool) -> tuple[bytes, int]:
    """A put message as the client sends a run (declarations first where `first`), and
    its tail's length."""
    head = []
    if first:
        namespace = pb.Namespace(tenant="t", model_fingerprint="m").SerializeToString()
        blocks = [(b"k%d" % index, b"k%d" % (index - 1) if index else b"") for index in range(3)]
        head.append(encode_put_header(namespace=namespace, checksum_kind=1, blocks=blocks))
    data = random_bytes(rng, data_bytes)
    checksums = [rng.randrange(2**64) for _ in range(3)]
    message = tailed_run_message(head, run_parts(5, 2, 0, checksums, [data]))
    assert message.tail_bytes == data_bytes
    return b"".join(bytes(part) for part in message), data_bytes


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("data_bytes", [1, 127, 128, 3 * 4096])
def test_a_message_decodes_the_same_without_its_tail(first: bool, data_bytes: int) -> None:
    message, tail = tailed_message(random.Random(data_bytes), data_bytes, first=first)
    whole = decode_put_message(message)
    cut = decode_put_message(message[:-tail], tail)
    assert (cut.namespace, cut.checksum_kind, cut.blocks) == (
        whole.namespace,
        whole.checksum_kind,
        whole.blocks,
    )
    ((run,), (whole_run,)) = cut.runs, whole.runs
    assert (run.layer, run.first_block, run.num_blocks, run.layer_checksums) == (
        whole_run.layer,
        whole_run.first_block,
        whole_run.num_blocks,
        whole_run.layer_checksums,
    )
    assert len(run.data) == 0  # not received yet
    assert cut.data_bytes(run) == tail == len(whole_run.data)
    assert whole.data_bytes(whole_run) == tail


@pytest.mark.parametrize("first", [True, False])
def test_a_tail_that_is_not_exactly_the_last_runs_data_is_refused_at_every_cut(
    first: bool,
) -> None:
    """Cut anywhere but where the last run's data begins, the message is a WireError
    that says so: never an IndexError, and never a field read short."""
    message, tail = tailed_message(random.Random(7), 300, first=first)
    for before_tail in range(len(message)):
        if before_tail == len(message) - tail:
            continue
        with pytest.raises(WireError, match=r"PUT_TAIL|malformed"):
            decode_put_message(message[:before_tail], len(message) - before_tail)


def test_a_tail_after_a_message_that_does_not_end_with_a_run_is_refused() -> None:
    ends_with_chunk = b"".join(bytes(part) for part in chunk_parts(4, 0, 0, 0, 9, [b"x" * 64]))
    with pytest.raises(WireError, match="PUT_TAIL"):
        decode_put_message(ends_with_chunk[:-64], 64)
    ends_with_blocks = encode_put_header(blocks=[(b"k" * 40, b"")])
    with pytest.raises(WireError, match="PUT_TAIL"):
        decode_put_message(ends_with_blocks[:-30], 30)
    run_then_more, tail = tailed_message(random.Random(8), 64, first=False)
    with pytest.raises(WireError, match="PUT_TAIL"):  # the run's data is not the last field
        decode_put_message(run_then_more[:-tail], tail + 3)
