"""The sending side of PutBlocks: tensor bytes into wire messages, without copying them."""

from __future__ import annotations

from collections.abc import Iterator

from kvstore.checksum import ChecksumKind, checksum_of_parts, checksums_of, checksums_of_slices
from kvstore.codec import ByteMap
from kvstore.layout import KVLayout
from kvstore.wire.chunks import (
    MIN_PUT_CHUNK_BYTES,
    PUT_CHUNKS,
    PUT_RUNS,
    WireBlockHeader,
    chunk_parts,
    encode_put_header,
    run_parts,
    tailed_run_message,
    uses_runs,
)

Message = list[bytes | memoryview]


def put_chunk_bytes(chunk_bytes: int) -> int:
    """The piece size a put uses: `chunk_bytes`, raised to MIN_PUT_CHUNK_BYTES so that
    every piece and message meets the server's put floor (docs/protocol.md)."""
    return max(chunk_bytes, MIN_PUT_CHUNK_BYTES)


def blocks_per_run(layout: KVLayout, chunk_bytes: int) -> int:
    """How many blocks' layers one LayerRun carries: as many as fit in `chunk_bytes`."""
    return max(1, chunk_bytes // layout.layer_bytes)


def block_headers(
    keys: list[bytes],
    start: int,
    end: int,
    parent_key: bytes,
    parent_remote: bool,
    first: int = 0,
) -> list[WireBlockHeader]:
    """Declarations of blocks `keys[start:end]` of a put that sends `keys[first:]`: each
    chains from the key before it, and `keys[0]` from `parent_key`. With `parent_remote`,
    the parent of `keys[first]`, the first block sent, may be stored on another node (a
    cluster's previous run)."""
    return [
        WireBlockHeader(
            keys[index], keys[index - 1] if index else parent_key, parent_remote and index == first
        )
        for index in range(start, end)
    ]


# The smallest layer whose runs go as PUT_TAIL (received in place by the daemon). Smaller
# layers cost the daemon more to scatter into than to copy: measured with
# `kvstore-bench transfer-cost` on 2026-12-07, 4 KiB layers (128 KiB blocks) took about
# 1.15 CPU-s per GB in place against 1.0–1.1 through a buffer; 32 KiB layers (1 MiB
# blocks) took 0.47 against 0.52 (`kvstore-bench peers`).
MIN_TAIL_LAYER_BYTES = 32 << 10


def run_message(
    layout: KVLayout, head: list[bytes | memoryview], run: list[bytes | memoryview]
) -> Message:
    """A put message of `head` then one run: tailed (PUT_TAIL on the data plane) where
    the layout's layers are large enough to pay for being received in place."""
    if layout.layer_bytes >= MIN_TAIL_LAYER_BYTES:
        return tailed_run_message(head, run)
    return [*head, *run]


def put_messages(
    header: bytes,
    keys: list[bytes],
    first: int,
    parent_key: bytes,
    source: ByteMap,
    layout: KVLayout,
    kind: ChecksumKind,
    chunk_bytes: int,
    *,
    parent_remote: bool = False,
) -> Iterator[Message]:
    """The messages of a whole put of blocks `keys[first:]`; block i is index i of
    `source`, and `keys[0]` chains from `parent_key` (stored on another node, perhaps,
    with `parent_remote`). `header` opens the first message."""
    chunk_bytes = put_chunk_bytes(chunk_bytes)
    if uses_runs(layout, chunk_bytes):
        yield from run_messages(
            header,
            keys,
            first,
            parent_key,
            source,
            layout,
            kind,
            chunk_bytes,
            parent_remote=parent_remote,
        )
        return
    batch = MessageBatch(chunk_bytes, header)
    for declared, index in enumerate(range(first, len(keys))):
        # Declared just before its bytes, so the server reserves room as it goes.
        batch.declare(*block_headers(keys, index, index + 1, parent_key, parent_remote, first))
        for layer in range(layout.num_layers):
            runs = source.runs(index, layer, chunk_bytes)
            yield from batch.add_layer(declared, layer, runs, kind)
    yield batch.flush()


def layer_messages(
    layer: int,
    source: ByteMap,
    num_blocks: int,
    layout: KVLayout,
    kind: ChecksumKind,
    chunk_bytes: int,
) -> Iterator[Message]:
    """The messages of one layer of a layer put; `source` holds that layer of every
    block (`KVForm.LAYER`), and the blocks were declared when the put opened."""
    chunk_bytes = put_chunk_bytes(chunk_bytes)
    layer_bytes = layout.layer_bytes
    if uses_runs(layout, chunk_bytes):
        per_run = blocks_per_run(layout, chunk_bytes)
        for start in range(0, num_blocks, per_run):
            end = min(num_blocks, start + per_run)
            # The tensor holds this layer of every block back to back: one view.
            data = source.view[start * layer_bytes : end * layer_bytes]
            checksums = checksums_of_slices(kind, data, layer_bytes)
            yield run_message(layout, [], run_parts(PUT_RUNS, layer, start, checksums, [data]))
        return
    batch = MessageBatch(chunk_bytes, b"")
    for block in range(num_blocks):
        runs = source.runs(block, 0, chunk_bytes)
        yield from batch.add_layer(block, layer, runs, kind)
    if batch.has_content:
        yield batch.flush()


def run_messages(
    header: bytes,
    keys: list[bytes],
    first: int,
    parent_key: bytes,
    source: ByteMap,
    layout: KVLayout,
    kind: ChecksumKind,
    chunk_bytes: int,
    *,
    parent_remote: bool = False,
) -> Iterator[Message]:
    """Put messages for small layers: groups of blocks, one LayerRun per layer per group.

    Messages are made as they are sent, so the first is on the wire while the rest are
    still being checksummed. A group is declared just before its first layer, so the
    server reserves room as the put goes.
    """
    per_run = blocks_per_run(layout, chunk_bytes)
    prefix = header
    for start in range(first, len(keys), per_run):
        end = min(len(keys), start + per_run)
        declarations = encode_put_header(
            blocks=block_headers(keys, start, end, parent_key, parent_remote, first)
        )
        for layer in range(layout.num_layers):
            views: list[bytes | memoryview] = []
            checksums: list[int] = []
            whole_layers = source.run_views(start, end, layer)
            if whole_layers is not None:
                views += whole_layers
                checksums = checksums_of(kind, whole_layers)
            else:
                for index in range(start, end):
                    pieces = source.layer_parts(index, layer)
                    views += pieces
                    checksums.append(checksum_of_parts(kind, pieces))
            head: list[bytes | memoryview] = [prefix + declarations] if layer == 0 else []
            yield run_message(
                layout, head, run_parts(PUT_RUNS, layer, start - first, checksums, views)
            )
            prefix = b""


class MessageBatch:
    """Packs block declarations and layer chunks into messages of about `chunk_bytes`.

    A message is a list of wire parts (see kvstore.wire.chunks); the tensor bytes are not
    copied until gRPC serializes the message.
    """

    def __init__(self, chunk_bytes: int, header: bytes) -> None:
        self._chunk_bytes = chunk_bytes
        self._parts: list[bytes | memoryview] = [header] if header else []
        self._size = 0

    @property
    def has_content(self) -> bool:
        return bool(self._parts)

    def declare(self, header: WireBlockHeader) -> None:
        self._parts.append(encode_put_header(blocks=[header]))

    def add_layer(
        self, block: int, layer: int, runs: list[tuple[int, memoryview]], kind: ChecksumKind
    ) -> list[list[bytes | memoryview]]:
        """Queue one block-layer given as (offset, bytes) runs; returns the messages now full."""
        layer_checksum = checksum_of_parts(kind, [data for _, data in runs])
        full: list[list[bytes | memoryview]] = []
        for offset, data in runs:
            if self._size and self._size + len(data) > self._chunk_bytes:
                full.append(self.flush())
            self._parts.extend(
                chunk_parts(PUT_CHUNKS, block, layer, offset, layer_checksum, [data])
            )
            self._size += len(data)
        return full

    def flush(self) -> list[bytes | memoryview]:
        parts, self._parts, self._size = self._parts, [], 0
        return parts
