"""PutBlocks streams for the fuzzer: valid puts cut every way the protocol allows, and
puts built to be hostile (sizes at every limit, counts of 0 and 2**32 - 1).

A stream is a list of serialized PutBlocksRequest messages; the same list goes over
gRPC as the stream's messages and over the data plane as PUT frames.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

from fuzz_corpus import (
    CHECKSUM_KINDS,
    FUZZ_LAYOUT,
    FUZZ_NS,
    MAX_MESSAGE_BYTES,
    VICTIM_KEYS,
    WIDE_NS,
    layer_checksum,
    random_key,
    wire_namespace,
)

from kvstore.layout import DType, KVLayout, Namespace
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.namespace import namespace_to_wire

# What one message carries at most, leaving room for its own framing.
_MESSAGE_DATA_BYTES = MAX_MESSAGE_BYTES - 4096
# 4 MiB blocks: a handful of started ones pass the fuzz server's per-put reservation cap.
_BIG_LAYOUT = KVLayout(
    num_layers=64, num_kv_heads=8, head_dim=128, dtype=DType.FLOAT16, block_tokens=16
)

Unit = pb.LayerChunk | pb.LayerRun


def put_stream(rng: random.Random) -> list[bytes]:
    """A put: valid 90 % of the time (before any mutation), else hostile."""
    if rng.random() < 0.002:
        return _too_many_blocks(rng)
    if rng.random() < 0.1:
        return rng.choice(_HOSTILE)(rng)
    return _valid_put(rng)


def _valid_put(rng: random.Random) -> list[bytes]:
    namespace_choice = rng.choices((FUZZ_NS, WIDE_NS), (3, 1))[0]
    namespace = namespace_to_wire(namespace_choice)
    if rng.random() < 0.15:
        namespace.tenant = f"fresh-{rng.randrange(10**6)}"
    elif rng.random() < 0.1:
        namespace = wire_namespace(rng)
    kind = rng.choice(CHECKSUM_KINDS)
    keys = list(dict.fromkeys(random_key(rng) for _ in range(rng.randint(1, 4))))
    if namespace_choice is WIDE_NS:
        keys = keys[:3]
    first_parent = rng.choice((b"", b"", VICTIM_KEYS[-1], VICTIM_KEYS[0], random_key(rng)))
    parents = [first_parent, *keys[:-1]]
    # A run continuing a parent on another node: committed as a root when it is absent.
    remote = [bool(first_parent) and rng.random() < 0.3, *[False] * (len(keys) - 1)]
    units = _units(rng, namespace_choice, kind, len(keys))
    return _pack(rng, namespace, kind, list(zip(keys, parents, remote, strict=True)), units)


def _units(
    rng: random.Random, namespace: Namespace, kind: int, num_blocks: int
) -> list[list[Unit]]:
    """Every layer of every block, as chunks or runs; one inner list per block it starts."""
    layout = namespace.layout
    data = {
        (block, layer): rng.randbytes(layout.layer_bytes)
        for block in range(num_blocks)
        for layer in range(layout.num_layers)
    }
    units: list[list[Unit]] = []
    max_run = max(1, _MESSAGE_DATA_BYTES // layout.layer_bytes)
    for layer in range(layout.num_layers):
        block = 0
        while block < num_blocks:
            if rng.random() < 0.4:  # a run of whole layers
                count = rng.randint(1, min(max_run, num_blocks - block))
                run_data = [data[(index, layer)] for index in range(block, block + count)]
                run = pb.LayerRun(
                    layer=layer,
                    first_block=block,
                    num_blocks=count,
                    data=b"".join(run_data),
                    layer_checksums=[layer_checksum(kind, part) for part in run_data],
                )
                units.append([run])
                block += count
                continue
            layer_bytes = data[(block, layer)]
            cuts = sorted(rng.sample(range(1, len(layer_bytes)), rng.randint(0, 2)))
            pieces = [layer_bytes[start:end] for start, end in _spans(cuts, len(layer_bytes))]
            offset, chunks = 0, []
            for piece in pieces:
                chunks.append(
                    pb.LayerChunk(
                        block_index=block,
                        layer=layer,
                        offset=offset,
                        data=piece,
                        layer_checksum=layer_checksum(kind, layer_bytes) if not offset else 0,
                    )
                )
                offset += len(piece)
            units.append(chunks)
            block += 1
    if rng.random() < 0.5:  # block by block rather than layer by layer
        units.sort(key=_first_block)
    return units


def _first_block(group: list[Unit]) -> int:
    unit = group[0]
    return unit.block_index if isinstance(unit, pb.LayerChunk) else unit.first_block


def _spans(cuts: list[int], size: int) -> list[tuple[int, int]]:
    edges = [0, *cuts, size]
    return list(itertools.pairwise(edges))


def _pack(
    rng: random.Random,
    namespace: pb.Namespace,
    kind: int,
    blocks: list[tuple[bytes, bytes, bool]],
    units: list[list[Unit]],
) -> list[bytes]:
    """Messages of at most a message's worth of data; blocks (key, parent, parent_remote)
    declared up front, or each in the message that first sends its bytes."""
    up_front = rng.random() < 0.6
    headers = [
        pb.BlockHeader(key=key, parent_key=parent, parent_remote=remote)
        for key, parent, remote in blocks
    ]
    message = pb.PutBlocksRequest(namespace=namespace, checksum_kind=kind)  # type: ignore[arg-type]
    if up_front:
        message.blocks.extend(headers)
    declared = len(headers) if up_front else 0
    messages: list[pb.PutBlocksRequest] = [message]
    size = 0
    for group in units:
        for unit in group:
            unit_bytes = len(unit.data)
            if size + unit_bytes > _MESSAGE_DATA_BYTES or rng.random() < 0.2:
                message, size = pb.PutBlocksRequest(), 0
                messages.append(message)
            if isinstance(unit, pb.LayerChunk):
                message.chunks.append(unit)
                last_block = unit.block_index
            else:
                message.runs.append(unit)
                last_block = unit.first_block + unit.num_blocks - 1
            while declared <= last_block:
                message.blocks.append(headers[declared])
                declared += 1
            size += unit_bytes
    return [message.SerializeToString() for message in messages]


# -- hostile puts ------------------------------------------------------------------------------


def _first(**fields: object) -> pb.PutBlocksRequest:
    """A first message in the fuzz namespace, xxh3 checksums, with `fields` on top."""
    values: dict[str, object] = {"namespace": namespace_to_wire(FUZZ_NS), "checksum_kind": 1}
    values.update(fields)
    return pb.PutBlocksRequest(**values)  # type: ignore[arg-type]


def _declared_not_sent(rng: random.Random) -> list[bytes]:
    count = rng.choice((1, 100, 1000))
    headers = [pb.BlockHeader(key=b"d%d" % index) for index in range(count)]
    return [_first(blocks=headers).SerializeToString()]


def _too_many_blocks(rng: random.Random) -> list[bytes]:
    """65,537 declarations (the limit is 65,536), over as many messages as that takes;
    slow to build and send, so seldom drawn."""
    messages, headers = [_first()], []
    for index in range(65_537):
        headers.append(pb.BlockHeader(key=index.to_bytes(3, "little")))
        if len(headers) == 8000:
            messages.append(pb.PutBlocksRequest(blocks=headers))
            headers = []
    messages.append(pb.PutBlocksRequest(blocks=headers))
    return [message.SerializeToString() for message in messages]


def _run_edges(rng: random.Random) -> list[bytes]:
    huge = 2**32 - 1
    layer, first_block, num_blocks = rng.choice(
        ((0, 0, 0), (0, 0, huge), (0, huge, 1), (huge, 0, 1), (0, 1, huge), (huge, huge, huge))
    )
    checksums = rng.choice(([], [0], [1, 2], [0] * 1000))
    run = pb.LayerRun(
        layer=layer,
        first_block=first_block,
        num_blocks=num_blocks,
        data=rng.randbytes(rng.choice((0, 1, 16))),
        layer_checksums=checksums,
    )
    return [_first(blocks=[pb.BlockHeader(key=b"r")], runs=[run]).SerializeToString()]


def _chunk_edges(rng: random.Random) -> list[bytes]:
    chunk = pb.LayerChunk(
        block_index=rng.choice((0, 1, 2**32 - 1)),
        layer=rng.choice((0, 2, 2**32 - 1)),
        offset=rng.choice((0, 1, 2**63, 2**64 - 1)),
        data=rng.randbytes(rng.choice((0, 1, 16, 17))),
        layer_checksum=rng.choice((0, 1, 2**64 - 1)),
    )
    return [_first(blocks=[pb.BlockHeader(key=b"c")], chunks=[chunk]).SerializeToString()]


def _reservation_pressure(rng: random.Random) -> list[bytes]:
    """Big blocks, one byte of each: past the per-put cap, or past DRAM."""
    namespace = namespace_to_wire(
        Namespace(tenant="fuzz", model_fingerprint="big", layout=_BIG_LAYOUT)
    )
    count = rng.choice((2, 8, 16))
    chunks = [pb.LayerChunk(block_index=index, data=b"\x00") for index in range(count)]
    message = pb.PutBlocksRequest(
        namespace=namespace,
        blocks=[pb.BlockHeader(key=b"big-%d" % index) for index in range(count)],
        chunks=chunks,
    )
    return [message.SerializeToString()]


def _bad_checksum(rng: random.Random) -> list[bytes]:
    data = rng.randbytes(FUZZ_LAYOUT.layer_bytes)
    good = layer_checksum(1, data)
    chunk = pb.LayerChunk(data=data, layer_checksum=good ^ (1 << rng.randrange(64)))
    return [_first(blocks=[pb.BlockHeader(key=b"bad-sum")], chunks=[chunk]).SerializeToString()]


def _odd_structure(rng: random.Random) -> list[bytes]:
    return rng.choice(
        (
            [],  # no message at all
            [b""],  # one empty message: no namespace
            [_first().SerializeToString(), _first().SerializeToString()],  # namespace twice
            [_first(checksum_kind=rng.choice((3, 2**31 - 1))).SerializeToString()],
            [_first(blocks=[pb.BlockHeader(key=b"x", parent_key=b"x")]).SerializeToString()],
            [_first(blocks=[pb.BlockHeader(key=b"x")] * 2).SerializeToString()],
            [_first(blocks=[pb.BlockHeader(key=b"k" * 65)]).SerializeToString()],
            [_first(blocks=[pb.BlockHeader(key=b"k", parent_key=b"p" * 65)]).SerializeToString()],
            [_first(blocks=[pb.BlockHeader(key=b"k", parent_remote=True)]).SerializeToString()],
            [_first().SerializeToString()] + [b""] * 50,  # many empty messages
        )
    )


_HOSTILE: list[Callable[[random.Random], list[bytes]]] = [
    _declared_not_sent,
    _run_edges,
    _run_edges,
    _chunk_edges,
    _chunk_edges,
    _reservation_pressure,
    _bad_checksum,
    _odd_structure,
    _odd_structure,
]
