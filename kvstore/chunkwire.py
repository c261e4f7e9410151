"""A hand-written codec for the two messages that carry block bytes.

`PutBlocksRequest` and `GetBlocksResponse` carry megabytes per message. Through the
generated protobuf classes every message costs three or four copies of its payload
(into the message, out of each attribute access, into the serialized string). This
module writes and reads exactly the same wire format (proto/kvstore/v1/kvstore.proto)
with one copy on the way out (joining header bytes and payload views) and none on the
way in (payloads are memoryview slices of the received buffer). The tests check it
against the generated classes in both directions.

Decoding is strict: an unknown field number, a wrong wire type or a truncated
message raises InvalidRequest, so unknown fields are rejected as everywhere else.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvstore.errors import InvalidRequest

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_FIXED64 = struct.Struct("<Q")


@dataclass(slots=True)
class WireChunk:
    """A LayerChunk whose `data` is a view into the received (or source) buffer."""

    block_index: int
    layer: int
    offset: int
    data: memoryview
    layer_checksum: int


@dataclass(slots=True)
class WireRun:
    """A LayerRun: one whole layer of consecutive blocks; `data` is a view."""

    layer: int
    first_block: int
    num_blocks: int
    data: memoryview
    layer_checksums: tuple[int, ...]


@dataclass(slots=True)
class WireBlockHeader:
    key: bytes
    parent_key: bytes


@dataclass(slots=True)
class PutMessage:
    namespace: bytes | None = None  # serialized kvstore.v1.Namespace, when present
    checksum_kind: int = 0
    blocks: list[WireBlockHeader] = field(default_factory=list)
    chunks: list[WireChunk] = field(default_factory=list)
    runs: list[WireRun] = field(default_factory=list)


@dataclass(slots=True)
class GetMessage:
    chunks: list[WireChunk] = field(default_factory=list)
    runs: list[WireRun] = field(default_factory=list)
    checksum_kind: int = 0
    block_bytes: int = 0
    num_blocks: int = 0
    tiers: list[int] = field(default_factory=list)


# -- encoding ------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _varint_field(number: int, value: int) -> bytes:
    return _tag(number, _VARINT) + _varint(value) if value else b""


def _len_field(number: int, payload: bytes) -> bytes:
    return _tag(number, _LEN) + _varint(len(payload)) + payload


_DATA_TAG = _tag(4, _LEN)
_CHECKSUM_TAG = _tag(5, _I64)


def chunk_parts(
    number: int,
    block_index: int,
    layer: int,
    offset: int,
    checksum: int,
    data: Sequence[memoryview | bytes],
) -> list[memoryview | bytes]:
    """Wire parts of one LayerChunk as field `number` of its parent; `data` is not copied."""
    data_len = sum(len(part) for part in data)
    head = (
        _varint_field(1, block_index)
        + _varint_field(2, layer)
        + _varint_field(3, offset)
        + (_CHECKSUM_TAG + _FIXED64.pack(checksum) if checksum else b"")
        + _DATA_TAG
        + _varint(data_len)
    )
    return [_tag(number, _LEN) + _varint(len(head) + data_len) + head, *data]


def run_parts(
    number: int,
    layer: int,
    first_block: int,
    checksums: list[int],
    data: Sequence[memoryview | bytes],
) -> list[memoryview | bytes]:
    """Wire parts of one LayerRun as field `number` of its parent; `data` is not copied."""
    data_len = sum(len(part) for part in data)
    packed = struct.pack(f"<{len(checksums)}Q", *checksums)
    head = (
        _varint_field(1, layer)
        + _varint_field(2, first_block)
        + _varint_field(3, len(checksums))
        + _len_field(5, packed)
        + _DATA_TAG
        + _varint(data_len)
    )
    return [_tag(number, _LEN) + _varint(len(head) + data_len) + head, *data]


def encode_get_header(
    *,
    checksum_kind: int = 0,
    block_bytes: int = 0,
    num_blocks: int = 0,
    tiers: list[int] | None = None,
) -> bytes:
    out = _varint_field(2, checksum_kind) + _varint_field(3, block_bytes)
    out += _varint_field(4, num_blocks)
    if tiers:
        out += _len_field(5, b"".join(_varint(tier) for tier in tiers))
    return out


def encode_put_header(
    *,
    namespace: bytes | None = None,
    checksum_kind: int = 0,
    blocks: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    out = _len_field(1, namespace) if namespace is not None else b""
    out += _varint_field(2, checksum_kind)
    for key, parent_key in blocks or ():
        body = _len_field(1, key) + (_len_field(2, parent_key) if parent_key else b"")
        out += _len_field(3, body)
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
        result = shift = 0
        while True:
            if position >= self._end or shift > 63:
                raise InvalidRequest("malformed message: truncated or overlong varint")
            byte = buffer[position]
            position += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.position = position
                return result
            shift += 7

    def tag(self) -> tuple[int, int]:
        key = self.varint()
        return key >> 3, key & 7

    def length_delimited(self) -> tuple[int, int]:
        size = self.varint()
        start = self.position
        if start + size > self._end:
            raise InvalidRequest("malformed message: a field runs past the end")
        self.position = start + size
        return start, start + size

    def fixed64(self) -> int:
        start = self.position
        if start + 8 > self._end:
            raise InvalidRequest("malformed message: truncated fixed64")
        self.position = start + 8
        return int(_FIXED64.unpack_from(self._buffer, start)[0])


def _unexpected(message: str, number: int, wire_type: int) -> InvalidRequest:
    return InvalidRequest(
        f"{message} has an unknown field number {number} (wire type {wire_type}); this server "
        f"speaks kvstore.v1 as of its proto file; upgrade the server or drop the field"
    )


def _decode_chunk(buffer: memoryview, start: int, end: int) -> WireChunk:
    # The hot loop of every get: single-byte tags and varints are read inline, and
    # anything else falls back to the general reader.
    values = [0, 0, 0, 0]  # unused, block_index, layer, offset
    data = buffer[start:start]
    checksum = 0
    position = start
    while position < end:
        key = buffer[position]
        if key in (0x08, 0x10, 0x18):
            byte = buffer[position + 1] if position + 1 < end else 0x80
            if byte < 0x80:
                values[key >> 3] = byte
                position += 2
                continue
            reader = _Reader(buffer, position + 1, end)
            values[key >> 3] = reader.varint()
            position = reader.position
        elif key == 0x22:
            reader = _Reader(buffer, position + 1, end)
            data_start, data_end = reader.length_delimited()
            data = buffer[data_start:data_end]
            position = data_end
        elif key == 0x29:
            if position + 9 > end:
                raise InvalidRequest("malformed message: truncated fixed64")
            checksum = int(_FIXED64.unpack_from(buffer, position + 1)[0])
            position += 9
        else:
            reader = _Reader(buffer, position, end)
            number, wire_type = reader.tag()
            raise _unexpected("LayerChunk", number, wire_type)
    return WireChunk(values[1], values[2], values[3], data, checksum)


def _decode_block_header(buffer: memoryview, start: int, end: int) -> WireBlockHeader:
    reader = _Reader(buffer, start, end)
    key = parent_key = b""
    while reader.more():
        number, wire_type = reader.tag()
        if number in (1, 2) and wire_type == _LEN:
            value_start, value_end = reader.length_delimited()
            value = bytes(buffer[value_start:value_end])
            if number == 1:
                key = value
            else:
                parent_key = value
        else:
            raise _unexpected("BlockHeader", number, wire_type)
    return WireBlockHeader(key, parent_key)


def decode_put_message(data: bytes | memoryview) -> PutMessage:
    buffer = memoryview(data)
    reader = _Reader(buffer)
    message = PutMessage()
    while reader.more():
        number, wire_type = reader.tag()
        if wire_type == _LEN and number in (1, 3, 4, 5):
            start, end = reader.length_delimited()
            if number == 4:
                message.chunks.append(_decode_chunk(buffer, start, end))
            elif number == 5:
                message.runs.append(_decode_run(buffer, start, end))
            elif number == 3:
                message.blocks.append(_decode_block_header(buffer, start, end))
            else:
                message.namespace = bytes(buffer[start:end])
        elif number == 2 and wire_type == _VARINT:
            message.checksum_kind = reader.varint()
        else:
            raise _unexpected("PutBlocksRequest", number, wire_type)
    return message


def _decode_run(buffer: memoryview, start: int, end: int) -> WireRun:
    reader = _Reader(buffer, start, end)
    values = [0, 0, 0, 0]  # unused, layer, first_block, num_blocks
    data = buffer[start:start]
    checksums: tuple[int, ...] = ()
    while reader.more():
        number, wire_type = reader.tag()
        if number in (1, 2, 3) and wire_type == _VARINT:
            values[number] = reader.varint()
        elif number == 4 and wire_type == _LEN:
            data_start, data_end = reader.length_delimited()
            data = buffer[data_start:data_end]
        elif number == 5 and wire_type == _LEN:
            packed_start, packed_end = reader.length_delimited()
            if (packed_end - packed_start) % 8:
                raise InvalidRequest("malformed LayerRun: packed checksums are not 8-byte aligned")
            count = (packed_end - packed_start) // 8
            checksums += struct.unpack_from(f"<{count}Q", buffer, packed_start)
        elif number == 5 and wire_type == _I64:
            checksums += (reader.fixed64(),)
        else:
            raise _unexpected("LayerRun", number, wire_type)
    return WireRun(values[1], values[2], values[3], data, checksums)


def decode_get_message(data: bytes | memoryview) -> GetMessage:
    buffer = memoryview(data)
    reader = _Reader(buffer)
    message = GetMessage()
    while reader.more():
        number, wire_type = reader.tag()
        if number == 1 and wire_type == _LEN:
            start, end = reader.length_delimited()
            message.chunks.append(_decode_chunk(buffer, start, end))
        elif number in (2, 3, 4) and wire_type == _VARINT:
            value = reader.varint()
            if number == 2:
                message.checksum_kind = value
            elif number == 3:
                message.block_bytes = value
            else:
                message.num_blocks = value
        elif number == 5 and wire_type == _LEN:  # packed enums
            start, end = reader.length_delimited()
            packed = _Reader(buffer, start, end)
            while packed.more():
                message.tiers.append(packed.varint())
        elif number == 5 and wire_type == _VARINT:
            message.tiers.append(reader.varint())
        elif number == 6 and wire_type == _LEN:
            start, end = reader.length_delimited()
            message.runs.append(_decode_run(buffer, start, end))
        else:
            raise _unexpected("GetBlocksResponse", number, wire_type)
    return message
