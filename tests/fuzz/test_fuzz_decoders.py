"""The server's hand-written put decoder against protobuf, on the fuzzer's messages.

kvstore.wire.chunks decodes PutBlocksRequest by hand. Wherever protobuf reads a
mutated message without unknown fields, the hand decoder must read the same values
(after protobuf's own truncation of oversized varints: the server then rejects the
value, which is the safe side), or the server would act on another request than the
one a client in another language meant. Where protobuf finds unknown fields, or cannot
read the message at all, the hand decoder must raise WireError, never anything else.
"""

from __future__ import annotations

import pytest
from fuzz_cases import case_rng
from fuzz_puts import put_stream
from fuzz_wire import mutate
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError, Message

from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import PutMessage, decode_put_message
from kvstore.wire.errors import WireError

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


def _int32(value: int) -> int:
    """An enum as protobuf reads it: the varint's low 32 bits, signed."""
    return ((value & _U32) ^ (1 << 31)) - (1 << 31)


def as_protobuf(message: PutMessage) -> pb.PutBlocksRequest:
    """The hand decoder's reading, as a generated message, truncated as protobuf would."""
    out = pb.PutBlocksRequest(checksum_kind=_int32(message.checksum_kind))  # type: ignore[arg-type]
    if message.namespace is not None:
        out.namespace.SetInParent()
        out.namespace.MergeFromString(message.namespace)
    for header in message.blocks:
        out.blocks.add(
            key=header.key, parent_key=header.parent_key, parent_remote=header.parent_remote
        )
    for chunk in message.chunks:
        out.chunks.add(
            block_index=chunk.block_index & _U32,
            layer=chunk.layer & _U32,
            offset=chunk.offset & _U64,
            data=bytes(chunk.data),
            layer_checksum=chunk.layer_checksum,
        )
    for run in message.runs:
        out.runs.add(
            layer=run.layer & _U32,
            first_block=run.first_block & _U32,
            num_blocks=run.num_blocks & _U32,
            data=bytes(run.data),
            layer_checksums=run.layer_checksums,
        )
    return out


def _has_unknown_fields(message: pb.PutBlocksRequest) -> bool:
    """Unknown fields where the hand decoder looks (it keeps the namespace as bytes)."""
    parts: list[Message] = [message, *message.blocks, *message.chunks, *message.runs]
    return any(len(unknown_fields.UnknownFieldSet(part)) for part in parts)


def _sets_compression(message: pb.PutBlocksRequest) -> bool:
    """Compressed bytes travel in get replies only: the hand decoder refuses a put whose
    chunks or runs say otherwise, which protobuf reads."""
    parts = [*message.chunks, *message.runs]
    return any(part.compression or part.raw_bytes for part in parts)


def _parses(message_type: type[Message], raw: bytes) -> bool:
    try:
        message_type.FromString(raw)
    except DecodeError:
        return False
    return True


def _judge(raw: bytes) -> str | None:
    try:
        expected: pb.PutBlocksRequest | None = pb.PutBlocksRequest.FromString(raw)
    except DecodeError:
        expected = None
    try:
        ours = decode_put_message(raw)
    except WireError:
        if (
            expected is not None
            and not _has_unknown_fields(expected)
            and not _sets_compression(expected)
        ):
            return "the hand decoder rejects a message protobuf reads"
        return None
    except Exception as error:  # the server would answer INTERNAL
        return f"the hand decoder raised {type(error).__name__}: {error}"
    if expected is None:
        if ours.namespace is not None and not _parses(pb.Namespace, ours.namespace):
            return None  # the server parses the namespace with protobuf, and rejects it then
        return "the hand decoder reads a message protobuf rejects"
    if _has_unknown_fields(expected):
        return None  # kvstore's rule is stricter than protobuf's: not judged here
    if as_protobuf(ours) != expected:
        return f"the hand decoder reads {as_protobuf(ours)} where protobuf reads {expected}"
    return None


@pytest.mark.parametrize("seed", [1, 2])
def test_the_put_decoder_reads_what_protobuf_reads(seed: int) -> None:
    problems = []
    for index in range(1000):
        rng = case_rng(seed, index)
        for number, message in enumerate(put_stream(rng)[:3]):
            raw = message if rng.random() < 0.2 else mutate(rng, message)[0]
            problem = _judge(raw)
            if problem is not None:
                problems.append(
                    f"seed {seed} case {index} message {number}: {problem}: {raw.hex()}"
                )
    assert not problems, f"{len(problems)} disagreements, the first:\n" + "\n".join(problems[:3])


# What the fuzz found in kvstore.wire.chunks, as the smallest messages that show it.
_NAMESPACE = bytes.fromhex("0a0466757a7a1203746f791a0a08021001180220012802")  # fuzz/toy
FOUND = [
    # The namespace sent as two fields: protobuf merges them (tenant and model from the
    # first, the layout from the second); the decoder kept only the second.
    pytest.param(
        b"\x0a\x0b" + _NAMESPACE[:11] + b"\x0a\x0c" + _NAMESPACE[11:], id="namespace-in-two"
    ),
    # LayerChunk.block_index = 5 with its tag written in two bytes (0x88 0x00): the
    # decoder called field 1 unknown.
    pytest.param(b"\x22\x03\x88\x00\x05", id="overlong-chunk-tag"),
    # A BlockHeader's key length (2) written in 6 bytes: protobuf refuses a length (or a
    # tag) in more than 5 bytes; the decoder read it.
    pytest.param(b"\x1a\x09\x0a\x82\x80\x80\x80\x80\x00ab", id="length-in-6-bytes"),
]


@pytest.mark.parametrize("raw", FOUND)
def test_what_the_fuzz_found_is_read_as_protobuf_reads_it(raw: bytes) -> None:
    assert _judge(raw) is None
    if _parses(pb.PutBlocksRequest, raw):
        assert as_protobuf(decode_put_message(raw)) == pb.PutBlocksRequest.FromString(raw)
    else:
        with pytest.raises(WireError, match="more than 5 bytes"):
            decode_put_message(raw)
