"""A hand-written codec for the two messages that carry block bytes.

`PutBlocksRequest` and `GetBlocksResponse` carry megabytes per message. Through the
generated protobuf classes every message costs three or four copies of its payload
(into the message, out of each attribute access, into the serialized string). This
module writes and reads exactly the same wire format (proto/kvstore/v1/kvstore.proto)
with one copy on the way out (joining header bytes and payload views) and none on the
way in (payloads are memoryview slices of the received buffer). The tests check it
against the generated classes in both directions.

Requests are decoded strictly: an unknown field number, a wrong wire type or a
truncated message raises WireError, which the server answers INVALID_ARGUMENT, so a
field this server would ignore is never silently dropped. Replies are decoded
leniently: unknown fields are skipped, as protobuf does, so a newer server can add
fields without breaking older clients (a rolling upgrade).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvstore.layout import KVLayout
from kvstore.wire.errors import WireError

# Protobuf wire types.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_FIXED64 = struct.Struct("<Q")

# Field numbers of kvstore.v1, as proto/kvstore/v1/kvstore.proto declares them.
# BlockHeader
BLOCK_KEY = 1
BLOCK_PARENT_KEY = 2
BLOCK_PARENT_REMOTE = 3
# LayerChunk
CHUNK_BLOCK_INDEX = 1
CHUNK_LAYER = 2
CHUNK_OFFSET = 3
CHUNK_DATA = 4
CHUNK_LAYER_CHECKSUM = 5
CHUNK_COMPRESSION = 6
CHUNK_RAW_BYTES = 7
# LayerRun
RUN_LAYER = 1
RUN_FIRST_BLOCK = 2
RUN_NUM_BLOCKS = 3
RUN_DATA = 4
RUN_LAYER_CHECKSUMS = 5
RUN_COMPRESSION = 6
RUN_RAW_BYTES = 7
# PutBlocksRequest
PUT_NAMESPACE = 1
PUT_CHECKSUM_KIND = 2
PUT_BLOCKS = 3
PUT_CHUNKS = 4
PUT_RUNS = 5
# GetBlocksResponse
GET_CHUNKS = 1
GET_CHECKSUM_KIND = 2
GET_BLOCK_BYTES = 3
GET_NUM_BLOCKS = 4
GET_TIERS = 5
GET_RUNS = 6
GET_SERVED_NONE = 7

# The least layer data a get message carries (unless the stream has less left): the
# server raises a GetBlocksRequest's max_chunk_bytes to this, so a tiny value cannot
# make it send one message per byte. Clients must accept messages this large.
MIN_CHUNK_BYTES = 64 << 10
# A put's floor (docs/protocol.md, "The put floor"): a chunk or run of fewer bytes must
# end what it writes, and a put's messages carry at least this much on average, beyond
# one short message per layer. Senders cut a put's layers into pieces of at least
# MIN_PUT_CHUNK_BYTES (twice the floor), which always satisfies it.
MIN_PUT_PIECE_BYTES = MIN_CHUNK_BYTES // 4
# Blocks declared, chunks and runs in one put message, at most: a put declares at most
# 65,536 blocks, and a real message carries fewer pieces than that (each is a layer's
# worth, or ends one).
MAX_PUT_FIELDS = 3 << 16
# A run's checksums, at most: one per block, and a put declares at most 65,536 blocks.
MAX_RUN_CHECKSUMS = 1 << 16
MIN_PUT_CHUNK_BYTES = 2 * MIN_PUT_PIECE_BYTES


def uses_runs(layout: KVLayout, chunk_bytes: int) -> bool:
    """Whether a stream of this layout carries LayerRuns rather than LayerChunks.

    Runs are used when at least two whole layers fit in one message of `chunk_bytes`:
    then one header serves many blocks. Both the put sender and the get server decide
    this way; `chunk_bytes` also caps a run's bytes.
    """
    return 2 * layout.layer_bytes <= chunk_bytes


@dataclass(slots=True)
class WireChunk:
    """A LayerChunk whose `data` is a view into the received (or source) buffer."""

    block_index: int
    layer: int
    offset: int
    data: memoryview
    layer_checksum: int
    # WireCompression of `data` (0: raw) and the bytes it decodes to; gets only.
    compression: int = 0
    raw_bytes: int = 0


@dataclass(slots=True)
class WireRun:
    """A LayerRun: one whole layer of consecutive blocks; `data` is a view."""

    layer: int
    first_block: int
    num_blocks: int
    data: memoryview
    layer_checksums: tuple[int, ...]
    compression: int = 0  # as in WireChunk
    raw_bytes: int = 0


@dataclass(slots=True)
class WireBlockHeader:
    """A BlockHeader: `parent_remote` says the parent may be stored on another node."""

    key: bytes
    parent_key: bytes
    parent_remote: bool = False


@dataclass(slots=True)
class PutMessage:
    namespace: bytes | None = None  # serialized kvstore.v1.Namespace, when present
    checksum_kind: int = 0
    blocks: list[WireBlockHeader] = field(default_factory=list)
    chunks: list[WireChunk] = field(default_factory=list)
    runs: list[WireRun] = field(default_factory=list)
    # Decoded without its tail (decode_put_message): the last run's data, this many
    # bytes, is still to be received; until then that run's `data` is empty.
    tail_bytes: int = 0

    def data_bytes(self, run: WireRun) -> int:
        """The bytes of `run`'s data, received or not."""
        if self.tail_bytes and run is self.runs[-1]:
            return self.tail_bytes
        return len(run.data)


@dataclass(slots=True)
class GetMessage:
    chunks: list[WireChunk] = field(default_factory=list)
    runs: list[WireRun] = field(default_factory=list)
    checksum_kind: int = 0
    block_bytes: int = 0
    num_blocks: int = 0
    tiers: list[int] = field(default_factory=list)
    served_none: bool = False  # a later message: the get was shortened to no block


# -- encoding ------------------------------------------------------------------------


def varint(value: int) -> bytes:
    """A protobuf base-128 varint."""
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ONE_BYTE = tuple(bytes((value,)) for value in range(0x80))


@functools.cache
def _tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def _varint_field(number: int, value: int) -> bytes:
    return _tag(number, _VARINT) + varint(value) if value else b""


def len_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: its tag, its length, then `payload`."""
    return _tag(number, _LEN) + varint(len(payload)) + payload


_DATA_TAG = _tag(CHUNK_DATA, _LEN)
_CHECKSUM_TAG = _tag(CHUNK_LAYER_CHECKSUM, _I64)
_RUN_DATA_TAG = _tag(RUN_DATA, _LEN)
_RUN_LAYER_TAG = _tag(RUN_LAYER, _VARINT)
_RUN_FIRST_BLOCK_TAG = _tag(RUN_FIRST_BLOCK, _VARINT)
_RUN_NUM_BLOCKS_TAG = _tag(RUN_NUM_BLOCKS, _VARINT)
_RUN_CHECKSUMS_TAG = _tag(RUN_LAYER_CHECKSUMS, _LEN)
_RUN_COMPRESSION_TAG = _tag(RUN_COMPRESSION, _VARINT)
_RUN_RAW_BYTES_TAG = _tag(RUN_RAW_BYTES, _VARINT)
# One-byte tags of LayerChunk's fields, read inline by the decoder's hot loop.
_CHUNK_VARINT_NUMBERS = (CHUNK_BLOCK_INDEX, CHUNK_LAYER, CHUNK_OFFSET)
_CHUNK_VARINT_TAGS = tuple((number << 3) | _VARINT for number in _CHUNK_VARINT_NUMBERS)
_CHUNK_DATA_TAG = (CHUNK_DATA << 3) | _LEN
_CHUNK_CHECKSUM_TAG = (CHUNK_LAYER_CHECKSUM << 3) | _I64


def chunk_parts(
    number: int,
    block_index: int,
    layer: int,
    offset: int,
    checksum: int,
    data: Sequence[memoryview | bytes],
    *,
    compression: int = 0,
    raw_bytes: int = 0,
) -> list[memoryview | bytes]:
    """Wire parts of one LayerChunk as field `number` of its parent (PUT_CHUNKS or
    GET_CHUNKS); `data` is not copied. With `compression`, `data` is encoded so and
    decodes to `raw_bytes`."""
    data_len = sum(len(part) for part in data)
    head = (
        _varint_field(CHUNK_BLOCK_INDEX, block_index)
        + _varint_field(CHUNK_LAYER, layer)
        + _varint_field(CHUNK_OFFSET, offset)
        + (_CHECKSUM_TAG + _FIXED64.pack(checksum) if checksum else b"")
        + _varint_field(CHUNK_COMPRESSION, compression)
        + (_varint_field(CHUNK_RAW_BYTES, raw_bytes) if compression else b"")
        + _DATA_TAG
        + varint(data_len)
    )
    return [_tag(number, _LEN) + varint(len(head) + data_len) + head, *data]


def run_parts(
    number: int,
    layer: int,
    first_block: int,
    checksums: list[int],
    data: Sequence[memoryview | bytes],
    *,
    compression: int = 0,
    raw_bytes: int = 0,
) -> list[memoryview | bytes]:
    """Wire parts of one LayerRun as field `number` of its parent (PUT_RUNS or
    GET_RUNS); `data` is not copied. `compression` and `raw_bytes` as in chunk_parts."""
    data_len = len(data[0]) if len(data) == 1 else sum(len(part) for part in data)
    count = len(checksums)
    # Tags are constants; fields that are 0 are left out, as protobuf leaves them.
    head = b"".join(
        (
            _RUN_LAYER_TAG + varint(layer) if layer else b"",
            _RUN_FIRST_BLOCK_TAG + varint(first_block) if first_block else b"",
            _RUN_NUM_BLOCKS_TAG + varint(count) if count else b"",
            _RUN_CHECKSUMS_TAG + varint(8 * count) + struct.pack(f"<{count}Q", *checksums),
            _RUN_COMPRESSION_TAG + varint(compression) if compression else b"",
            _RUN_RAW_BYTES_TAG + varint(raw_bytes) if compression and raw_bytes else b"",
            _RUN_DATA_TAG,
            varint(data_len),
        )
    )
    return [_tag(number, _LEN) + varint(len(head) + data_len) + head, *data]


class TailedParts(list[bytes | memoryview]):
    """A put message's wire parts whose last `tail_bytes` bytes are the data of its last
    field, a LayerRun: the data plane sends it as a PUT_TAIL frame, and the server
    receives those bytes where it stores them (kvstore.wire.frames)."""

    __slots__ = ("tail_bytes",)

    def __init__(self, parts: list[bytes | memoryview], tail_bytes: int) -> None:
        super().__init__(parts)
        self.tail_bytes = tail_bytes


def tailed_run_message(
    head: list[bytes | memoryview], run: list[bytes | memoryview]
) -> TailedParts:
    """A put message of `head` (declarations, or nothing) then one run's parts
    (run_parts), its tail the run's data."""
    data_bytes = sum(memoryview(part).nbytes for part in run[1:])
    return TailedParts([*head, *run], data_bytes)


def encode_get_header(
    *,
    checksum_kind: int = 0,
    block_bytes: int = 0,
    num_blocks: int = 0,
    tiers: list[int] | None = None,
    served_none: bool = False,
) -> bytes:
    """The scalar fields of a GetBlocksResponse; chunk or run parts may follow it."""
    out = _varint_field(GET_CHECKSUM_KIND, checksum_kind)
    out += _varint_field(GET_BLOCK_BYTES, block_bytes)
    out += _varint_field(GET_NUM_BLOCKS, num_blocks)
    out += _varint_field(GET_SERVED_NONE, int(served_none))
    if tiers:
        out += len_field(GET_TIERS, b"".join(varint(tier) for tier in tiers))
    return out


def encode_put_header(
    *,
    namespace: bytes | None = None,
    checksum_kind: int = 0,
    blocks: Sequence[tuple[bytes, bytes] | WireBlockHeader] | None = None,
) -> bytes:
    """The namespace, checksum kind and block declarations of a PutBlocksRequest; a
    block is (key, parent_key), or a WireBlockHeader to set `parent_remote`."""
    out = len_field(PUT_NAMESPACE, namespace) if namespace is not None else b""
    out += _varint_field(PUT_CHECKSUM_KIND, checksum_kind)
    for block in blocks or ():
        if isinstance(block, WireBlockHeader):
            key, parent_key, parent_remote = block.key, block.parent_key, block.parent_remote
        else:
            (key, parent_key), parent_remote = block, False
        body = len_field(BLOCK_KEY, key)
        if parent_key:
            body += len_field(BLOCK_PARENT_KEY, parent_key)
        body += _varint_field(BLOCK_PARENT_REMOTE, int(parent_remote))
        out += len_field(PUT_BLOCKS, body)
    return out


# -- decoding ------------------------------------------------------------------------


class _Reader:
    __slots__ = ("_buffer", "_end", "position")

    def __init__(self, buffer: memoryview, start: int = 0, end: int | None = None) -> None:
        self._buffer = buffer
        self.position = start
        self._end = len(buffer) if end is None else end

    def more(self) -> bool:
        return self.position < self._end

    def varint(self) -> int:
        buffer, position = self._buffer, self.position
        if position + 1 < self._end:  # most are one byte, and lengths under 16 KiB two
            if (first := buffer[position]) < 0x80:
                self.position = position + 1
                return first
            if (second := buffer[position + 1]) < 0x80:
                self.position = position + 2
                return (first & 0x7F) | (second << 7)
        result = shift = 0
        while True:
            if position >= self._end or shift > 63:
                raise WireError("malformed message: truncated or overlong varint")
            byte = buffer[position]
            position += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.position = position
                return result
            shift += 7

    # Protobuf reads a tag or a length in at most 5 bytes (a varint may take 10), and so
    # does this decoder, so that both read the same messages.

    def tag(self) -> tuple[int, int]:
        start = self.position
        if start < self._end and self._buffer[start] < 0x80:  # fields 1 to 15: one byte
            key = self._buffer[start]
            self.position = start + 1
            return key >> 3, key & 7
        key = self.varint()
        if self.position - start > 5:
            raise WireError("malformed message: a tag written in more than 5 bytes")
        return key >> 3, key & 7

    def length_delimited(self) -> tuple[int, int]:
        before = self.position
        size = self.varint()
        start = self.position
        if start - before > 5:
            raise WireError("malformed message: a length written in more than 5 bytes")
        if start + size > self._end:
            raise WireError("malformed message: a field runs past the end")
        self.position = start + size
        return start, start + size

    def fixed64(self) -> int:
        start = self.position
        if start + 8 > self._end:
            raise WireError("malformed message: truncated fixed64")
        self.position = start + 8
        return int(_FIXED64.unpack_from(self._buffer, start)[0])

    def skip(self, message: str, number: int, wire_type: int) -> None:
        """Step over a field this codec does not know (lenient decoding of replies)."""
        if wire_type == _VARINT:
            self.varint()
        elif wire_type == _I64:
            self.fixed64()
        elif wire_type == _LEN:
            self.length_delimited()
        elif wire_type == _I32:
            if self.position + 4 > self._end:
                raise WireError("malformed message: truncated fixed32")
            self.position += 4
        else:  # groups (3, 4) are not proto3, and 6 and 7 are not wire types
            raise WireError(f"malformed {message}: field {number} has wire type {wire_type}")


def _unknown(message: str, number: int, wire_type: int) -> WireError:
    return WireError(
        f"{message} has an unknown field number {number} (wire type {wire_type}); this server "
        f"speaks kvstore.v1 as of its proto file; upgrade the server or drop the field"
    )


def _compressed_put(message: str) -> WireError:
    return WireError(
        f"a put's {message} sets compression or raw_bytes; compressed layer bytes travel in "
        f"get replies only: send the put's bytes raw"
    )


def _decode_chunk(buffer: memoryview, start: int, end: int, strict: bool) -> WireChunk:
    # The hot loop of every get: single-byte tags and varints are read inline, and
    # anything else falls back to the general reader.
    values = [0, 0, 0, 0]  # unused, block_index, layer, offset (indexed by field number)
    data = buffer[start:start]
    checksum = compression = raw_bytes = 0
    position = start
    while position < end:
        key = buffer[position]
        if key in _CHUNK_VARINT_TAGS:
            byte = buffer[position + 1] if position + 1 < end else 0x80
            if byte < 0x80:
                values[key >> 3] = byte
                position += 2
                continue
            reader = _Reader(buffer, position + 1, end)
            values[key >> 3] = reader.varint()
            position = reader.position
        elif key == _CHUNK_DATA_TAG:
            reader = _Reader(buffer, position + 1, end)
            data_start, data_end = reader.length_delimited()
            data = buffer[data_start:data_end]
            position = data_end
        elif key == _CHUNK_CHECKSUM_TAG:
            if position + 9 > end:
                raise WireError("malformed message: truncated fixed64")
            checksum = int(_FIXED64.unpack_from(buffer, position + 1)[0])
            position += 9
        else:  # a tag written in more bytes than it needs, or an unknown field
            reader = _Reader(buffer, position, end)
            number, wire_type = reader.tag()
            if number in _CHUNK_VARINT_NUMBERS and wire_type == _VARINT:
                values[number] = reader.varint()
            elif number == CHUNK_DATA and wire_type == _LEN:
                data_start, data_end = reader.length_delimited()
                data = buffer[data_start:data_end]
            elif number == CHUNK_LAYER_CHECKSUM and wire_type == _I64:
                checksum = reader.fixed64()
            elif number == CHUNK_COMPRESSION and wire_type == _VARINT:
                compression = reader.varint()
            elif number == CHUNK_RAW_BYTES and wire_type == _VARINT:
                raw_bytes = reader.varint()
            elif strict:
                raise _unknown("LayerChunk", number, wire_type)
            else:
                reader.skip("LayerChunk", number, wire_type)
            position = reader.position
    if strict and (compression or raw_bytes):
        raise _compressed_put("LayerChunk")
    return WireChunk(values[1], values[2], values[3], data, checksum, compression, raw_bytes)


def _decode_block_header(buffer: memoryview, start: int, end: int) -> WireBlockHeader:
    reader = _Reader(buffer, start, end)
    key = parent_key = b""
    parent_remote = False
    while reader.more():
        number, wire_type = reader.tag()
        if number in (BLOCK_KEY, BLOCK_PARENT_KEY) and wire_type == _LEN:
            value_start, value_end = reader.length_delimited()
            value = bytes(buffer[value_start:value_end])
            if number == BLOCK_KEY:
                key = value
            else:
                parent_key = value
        elif number == BLOCK_PARENT_REMOTE and wire_type == _VARINT:
            # As protobuf reads a bool: any non-zero varint is true.
            parent_remote = reader.varint() != 0
        else:
            raise _unknown("BlockHeader", number, wire_type)
    return WireBlockHeader(key, parent_key, parent_remote)


def decode_put_message(data: bytes | memoryview, tail_bytes: int = 0) -> PutMessage:
    """A PutBlocksRequest, strictly: any field this codec does not know is an error.

    With `tail_bytes`, `data` is the message without its last `tail_bytes` bytes, which
    must be exactly the data of its last field, a LayerRun (a PUT_TAIL frame: the server
    receives those bytes straight to where they are stored). That run's `data` is left
    empty, and `PutMessage.data_bytes` gives its length.
    """
    buffer = memoryview(data)
    received = len(buffer)
    reader = _Reader(buffer, 0, received + tail_bytes)
    message = PutMessage(tail_bytes=tail_bytes)
    namespace_parts: list[bytes] = []
    try:
        while reader.more():
            if reader.position >= received:
                raise _bad_tail("a field starts in it")
            _decode_put_field(reader, buffer, message, namespace_parts)
    except (IndexError, struct.error):  # a field cut where the tail begins
        raise _bad_tail("a field other than the last run's data reaches into it") from None
    if namespace_parts:
        message.namespace = b"".join(namespace_parts)
    return message


def _bad_tail(why: str) -> WireError:
    return WireError(
        f"malformed PUT_TAIL frame: its tail must be exactly the data of the message's last "
        f"LayerRun, but {why}"
    )


def _decode_put_field(
    reader: _Reader, buffer: memoryview, message: PutMessage, namespace_parts: list[bytes]
) -> None:
    received = len(buffer)
    number, wire_type = reader.tag()
    if wire_type == _LEN and number in (PUT_NAMESPACE, PUT_BLOCKS, PUT_CHUNKS, PUT_RUNS):
        start, end = reader.length_delimited()
        if end > received:  # reaches into the tail: only the last run may, with its data
            if number != PUT_RUNS or reader.more():
                raise _bad_tail(f"field {number} reaches into it")
            message.runs.append(_decode_tail_run(buffer, start, end))
        elif number == PUT_CHUNKS:
            message.chunks.append(_decode_chunk(buffer, start, end, strict=True))
        elif number == PUT_RUNS:
            message.runs.append(_decode_run(buffer, start, end, strict=True))
        elif number == PUT_BLOCKS:
            message.blocks.append(_decode_block_header(buffer, start, end))
        else:
            # A repeated message field merges, as in protobuf: its parts concatenate
            # (joined once by the caller: joining as they come would be quadratic).
            namespace_parts.append(bytes(buffer[start:end]))
        # A piece or header costs an object: no message may make more than its bytes
        # could carry in real ones (a field of a few bytes each is an attack).
        if len(message.chunks) + len(message.runs) + len(message.blocks) > MAX_PUT_FIELDS:
            raise WireError(
                f"more than {MAX_PUT_FIELDS} blocks, chunks and runs in one put message"
            )
    elif number == PUT_CHECKSUM_KIND and wire_type == _VARINT:
        message.checksum_kind = reader.varint()
    else:
        raise _unknown("PutBlocksRequest", number, wire_type)


def _decode_tail_run(buffer: memoryview, start: int, end: int) -> WireRun:
    """The last LayerRun of a message whose tail, from the end of `buffer` to `end`, is
    this run's data: every field before the data is in `buffer`, and the data is last."""
    received = len(buffer)
    reader = _Reader(buffer, start, end)
    while True:
        if reader.position >= received:
            raise _bad_tail("a LayerRun field starts in it")
        field_start = reader.position
        number, wire_type = reader.tag()
        if number == RUN_DATA and wire_type == _LEN:
            data_start, data_end = reader.length_delimited()
            if data_start != received or data_end != end:
                raise _bad_tail("the last run's data does not begin where the tail does")
            break
        reader.skip("LayerRun", number, wire_type)
        if reader.position > received:
            raise _bad_tail(f"LayerRun field {number} reaches into it")
    # The fields before the data, decoded as any run's; the data is received later.
    return _decode_run(buffer, start, field_start, strict=True)


def _decode_run(buffer: memoryview, start: int, end: int, strict: bool) -> WireRun:
    reader = _Reader(buffer, start, end)
    values = [0, 0, 0, 0]  # unused, layer, first_block, num_blocks (indexed by field number)
    data = buffer[start:start]
    checksums: list[int] = []  # appended to, never concatenated: repeats stay linear
    compression = raw_bytes = 0
    while reader.more():
        number, wire_type = reader.tag()
        if wire_type == _VARINT and number in (RUN_LAYER, RUN_FIRST_BLOCK, RUN_NUM_BLOCKS):
            values[number] = reader.varint()
        elif number == RUN_DATA and wire_type == _LEN:
            data_start, data_end = reader.length_delimited()
            data = buffer[data_start:data_end]
        elif number == RUN_LAYER_CHECKSUMS and wire_type == _LEN:
            packed_start, packed_end = reader.length_delimited()
            if (packed_end - packed_start) % 8:
                raise WireError("malformed LayerRun: packed checksums are not 8-byte aligned")
            count = (packed_end - packed_start) // 8
            checksums.extend(struct.unpack_from(f"<{count}Q", buffer, packed_start))
        elif number == RUN_LAYER_CHECKSUMS and wire_type == _I64:
            checksums.append(reader.fixed64())
        elif number == RUN_COMPRESSION and wire_type == _VARINT:
            compression = reader.varint()
        elif number == RUN_RAW_BYTES and wire_type == _VARINT:
            raw_bytes = reader.varint()
        elif strict:
            raise _unknown("LayerRun", number, wire_type)
        else:
            reader.skip("LayerRun", number, wire_type)
        if len(checksums) > MAX_RUN_CHECKSUMS:
            raise WireError(f"malformed LayerRun: more than {MAX_RUN_CHECKSUMS} checksums")
    if strict and (compression or raw_bytes):
        raise _compressed_put("LayerRun")
    return WireRun(values[1], values[2], values[3], data, tuple(checksums), compression, raw_bytes)


def decode_get_message(data: bytes | memoryview) -> GetMessage:
    """A GetBlocksResponse, leniently: fields this codec does not know are skipped.

    Malformed bytes still raise WireError.
    """
    buffer = memoryview(data)
    reader = _Reader(buffer)
    message = GetMessage()
    while reader.more():
        number, wire_type = reader.tag()
        if number == GET_CHUNKS and wire_type == _LEN:
            start, end = reader.length_delimited()
            message.chunks.append(_decode_chunk(buffer, start, end, strict=False))
        elif number == GET_CHECKSUM_KIND and wire_type == _VARINT:
            message.checksum_kind = reader.varint()
        elif number == GET_BLOCK_BYTES and wire_type == _VARINT:
            message.block_bytes = reader.varint()
        elif number == GET_NUM_BLOCKS and wire_type == _VARINT:
            message.num_blocks = reader.varint()
        elif number == GET_SERVED_NONE and wire_type == _VARINT:
            message.served_none = reader.varint() != 0
        elif number == GET_TIERS and wire_type == _LEN:  # packed enums
            start, end = reader.length_delimited()
            packed = _Reader(buffer, start, end)
            while packed.more():
                message.tiers.append(packed.varint())
        elif number == GET_TIERS and wire_type == _VARINT:
            message.tiers.append(reader.varint())
        elif number == GET_RUNS and wire_type == _LEN:
            start, end = reader.length_delimited()
            message.runs.append(_decode_run(buffer, start, end, strict=False))
        else:
            reader.skip("GetBlocksResponse", number, wire_type)
    return message
