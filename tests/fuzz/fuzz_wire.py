"""Seeded mutations of protobuf wire bytes: the fuzzer's byte-level operators.

They know the wire format (tags, varints, the wire types), not kvstore's messages,
so they reach whatever a hand-built request would not: fields flipped, truncated,
duplicated, reordered or dropped, lengths and varints that lie, fields no version of
kvstore.v1 defines, wire types that do not match, and nesting deep enough to hit a
parser's recursion limit; and rewritings protobuf reads as the same message (tags in
more bytes than they need, a submessage split in two), which a hand-written decoder
must read the same way too. Every operator is a pure function of its `random.Random`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from kvstore.wire.chunks import varint

VARINT, I64, LEN, START_GROUP, END_GROUP, I32 = 0, 1, 2, 3, 4, 5
# Values that sit on a boundary of some integer type the server may use.
HOSTILE_VARINTS = (
    0,
    1,
    2,
    0x7F,
    0x80,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**63 - 1,
    2**63,
    2**64 - 1,
)
# Field numbers no kvstore.v1 message defines (0 and 2**29 - 1 are the edges; 0 is illegal).
UNKNOWN_NUMBERS = (0, 6, 7, 15, 16, 99, 1000, 2**29 - 1)

Mutation = Callable[[random.Random, bytes], bytes | None]


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def overlong_varint(value: int, extra_bytes: int) -> bytes:
    """`value` as a varint padded with `extra_bytes` redundant continuation bytes."""
    body = bytearray(varint(value))
    body[-1] |= 0x80
    body += b"\x80" * (extra_bytes - 1) + b"\x00"
    return bytes(body)


@dataclass(frozen=True, slots=True)
class WireField:
    """One top-level field: bytes [start, end); its value starts at `value_start`
    (after the length, for a length-delimited field)."""

    number: int
    wire_type: int
    start: int
    value_start: int
    end: int


def _read_varint(data: bytes, position: int) -> tuple[int, int] | None:
    result = shift = 0
    while position < len(data) and shift < 70:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
    return None


def split_fields(data: bytes) -> list[WireField] | None:
    """The top-level fields of `data`; None if it is not a sequence of well-formed,
    group-free fields."""
    fields: list[WireField] = []
    position = 0
    while position < len(data):
        key = _read_varint(data, position)
        if key is None:
            return None
        value, value_start = key
        number, wire_type = value >> 3, value & 7
        end: int
        if wire_type == VARINT:
            read = _read_varint(data, value_start)
            if read is None:
                return None
            end = read[1]
        elif wire_type == I64:
            end = value_start + 8
        elif wire_type == I32:
            end = value_start + 4
        elif wire_type == LEN:
            read = _read_varint(data, value_start)
            if read is None:
                return None
            length, value_start = read
            end = value_start + length
        else:
            return None
        if end > len(data):
            return None
        fields.append(WireField(number, wire_type, position, value_start, end))
        position = end
    return fields


def _boundaries(fields: list[WireField], data: bytes) -> list[int]:
    return [field.start for field in fields] + [len(data)]


# -- byte operators: any bytes ---------------------------------------------------------


def flip_bits(rng: random.Random, data: bytes) -> bytes | None:
    if not data:
        return None
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def set_byte(rng: random.Random, data: bytes) -> bytes | None:
    if not data:
        return None
    out = bytearray(data)
    out[rng.randrange(len(out))] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF))
    return bytes(out)


def truncate(rng: random.Random, data: bytes) -> bytes | None:
    return data[: rng.randrange(len(data))] if data else None


def insert_bytes(rng: random.Random, data: bytes) -> bytes | None:
    at = rng.randint(0, len(data))
    return data[:at] + rng.randbytes(rng.randint(1, 8)) + data[at:]


# -- field operators: well-formed messages ---------------------------------------------


def duplicate_field(rng: random.Random, data: bytes) -> bytes | None:
    fields = split_fields(data)
    if not fields:
        return None
    field = rng.choice(fields)
    at = rng.choice(_boundaries(fields, data))
    return data[:at] + data[field.start : field.end] + data[at:]


def reorder_fields(rng: random.Random, data: bytes) -> bytes | None:
    fields = split_fields(data)
    if not fields or len(fields) < 2:
        return None
    order = fields[:]
    rng.shuffle(order)
    return b"".join(data[field.start : field.end] for field in order)


def drop_field(rng: random.Random, data: bytes) -> bytes | None:
    fields = split_fields(data)
    if not fields:
        return None
    field = rng.choice(fields)
    return data[: field.start] + data[field.end :]


def unknown_field(rng: random.Random, data: bytes) -> bytes | None:
    """A field of a number no message defines, of any wire type (6 and 7 are none)."""
    number = rng.choice(UNKNOWN_NUMBERS)
    wire_type = rng.randrange(8)
    payloads = {
        VARINT: varint(rng.choice(HOSTILE_VARINTS)),
        I64: rng.randbytes(8),
        LEN: varint(3) + rng.randbytes(3),
        START_GROUP: tag(number, END_GROUP),
        I32: rng.randbytes(4),
    }
    extra = tag(number, wire_type) + payloads.get(wire_type, rng.randbytes(2))
    fields = split_fields(data)
    at = rng.choice(_boundaries(fields, data)) if fields else len(data)
    return data[:at] + extra + data[at:]


def hostile_varint(rng: random.Random, data: bytes) -> bytes | None:
    """A varint field's value replaced by a boundary value, or padded overlong."""
    fields = [field for field in split_fields(data) or () if field.wire_type == VARINT]
    if not fields:
        return None
    field = rng.choice(fields)
    if rng.random() < 0.25:
        value = _read_varint(data, field.value_start)
        assert value is not None
        encoded = overlong_varint(value[0], rng.randint(1, 12))
    else:
        encoded = varint(rng.choice(HOSTILE_VARINTS))
    return data[: field.value_start] + encoded + data[field.end :]


def lying_length(rng: random.Random, data: bytes) -> bytes | None:
    """A length-delimited field whose length says more (or other) than its bytes."""
    fields = [field for field in split_fields(data) or () if field.wire_type == LEN]
    if not fields:
        return None
    field = rng.choice(fields)
    size = field.end - field.value_start
    length = rng.choice(
        (
            varint(size + rng.randint(1, 16)),
            varint(max(0, size - rng.randint(1, 16))),
            varint(2**31 - 1),
            varint(2**32 - 1),
            varint(2**64 - 1),
            overlong_varint(size, rng.randint(1, 10)),
        )
    )
    header = tag(field.number, LEN)
    return data[: field.start] + header + length + data[field.value_start :]


def wrong_wire_type(rng: random.Random, data: bytes) -> bytes | None:
    fields = split_fields(data)
    if not fields:
        return None
    field = rng.choice(fields)
    other = rng.choice([wire_type for wire_type in range(8) if wire_type != field.wire_type])
    value_start = field.value_start
    if field.wire_type == LEN:  # keep the length: the new tag is read, then whatever follows
        key = _read_varint(data, field.start)
        assert key is not None
        value_start = key[1]
    return data[: field.start] + tag(field.number, other) + data[value_start:]


def overlong_tag(rng: random.Random, data: bytes) -> bytes | None:
    """A field's tag written in more bytes than it needs: the same message to protobuf."""
    fields = split_fields(data)
    if not fields:
        return None
    field = rng.choice(fields)
    key = _read_varint(data, field.start)
    assert key is not None
    encoded = overlong_varint(key[0], rng.randint(1, 4))
    return data[: field.start] + encoded + data[key[1] :]


def split_field(rng: random.Random, data: bytes) -> bytes | None:
    """A submessage field sent as two fields of the same number, its fields divided
    between them: protobuf merges them back into the same message."""
    fields = [
        field
        for field in split_fields(data) or ()
        if field.wire_type == LEN
        and len(split_fields(data[field.value_start : field.end]) or ()) > 1
    ]
    if not fields:
        return None
    field = rng.choice(fields)
    payload = data[field.value_start : field.end]
    inner = split_fields(payload)
    assert inner is not None
    cut = inner[rng.randrange(1, len(inner))].start
    head, tail = payload[:cut], payload[cut:]
    encoded = b"".join(tag(field.number, LEN) + varint(len(part)) + part for part in (head, tail))
    return data[: field.start] + encoded + data[field.end :]


def deep_nesting(rng: random.Random, data: bytes) -> bytes | None:
    """An unknown field holding groups nested past any parser's recursion limit."""
    number = rng.choice((6, 99, 2**29 - 1))
    depth = rng.choice((64, 101, 1000, 10_000))
    nested = tag(number, START_GROUP) * depth + tag(number, END_GROUP) * depth
    if rng.random() < 0.3:  # unbalanced: a group that never ends
        nested = nested[: len(nested) // 2]
    return data + nested


def nested(rng: random.Random, data: bytes) -> bytes | None:
    """Mutate inside a length-delimited field (a namespace, a layout, a chunk, a run),
    then write the field back with its new length."""
    fields = [
        field
        for field in split_fields(data) or ()
        if field.wire_type == LEN and split_fields(data[field.value_start : field.end])
    ]
    if not fields:
        return None
    field = rng.choice(fields)
    inner, _ = mutate_once(rng, data[field.value_start : field.end])
    encoded = tag(field.number, LEN) + varint(len(inner)) + inner
    return data[: field.start] + encoded + data[field.end :]


MUTATIONS: dict[str, Mutation] = {
    "flip_bits": flip_bits,
    "set_byte": set_byte,
    "truncate": truncate,
    "insert_bytes": insert_bytes,
    "duplicate_field": duplicate_field,
    "reorder_fields": reorder_fields,
    "drop_field": drop_field,
    "unknown_field": unknown_field,
    "hostile_varint": hostile_varint,
    "lying_length": lying_length,
    "wrong_wire_type": wrong_wire_type,
    "overlong_tag": overlong_tag,
    "split_field": split_field,
    "deep_nesting": deep_nesting,
    "nested": nested,
}
# Field-aware operators find more than blind flips: weigh them up.
_WEIGHTS = {"nested": 6, "hostile_varint": 3, "duplicate_field": 2, "deep_nesting": 0.3}


def mutate_once(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One mutation that applies to `data`, and its name."""
    names = list(MUTATIONS)
    weights = [_WEIGHTS.get(name, 1) for name in names]
    while True:
        name = rng.choices(names, weights)[0]
        mutated = MUTATIONS[name](rng, data)
        if mutated is not None:
            return mutated, name


def mutate(rng: random.Random, data: bytes, *, max_rounds: int = 3) -> tuple[bytes, list[str]]:
    """1 to `max_rounds` mutations of `data`, and their names."""
    names: list[str] = []
    for _ in range(rng.randint(1, max_rounds)):
        data, name = mutate_once(rng, data)
        names.append(name)
    return data, names
