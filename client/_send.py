"""The sending side of PutBlocks: tensor bytes into wire messages, without copying them."""

from __future__ import annotations

from collections.abc import Iterator

from kvstore.checksum import ChecksumKind, checksum_of_parts, checksums_of
from kvstore.codec import ByteMap
from kvstore.layout import KVLayout
from kvstore.wire.chunks import PUT_CHUNKS, PUT_RUNS, chunk_parts, encode_put_header, run_parts


def run_messages(
    header: bytes,
    keys: list[bytes],
    first: int,
    parent_key: bytes,
    source: ByteMap,
    layout: KVLayout,
    kind: ChecksumKind,
    chunk_bytes: int,
) -> Iterator[list[bytes | memoryview]]:
    """Put messages for small layers: groups of blocks, one LayerRun per layer per group.

    Messages are made as they are sent, so the first is on the wire while the rest are
    still being checksummed. A group is declared just before its first layer, so the
    server reserves room as the put goes.
    """
    layer_bytes = layout.layer_bytes
    per_run = max(1, chunk_bytes // layer_bytes)
    prefix = header
    for start in range(first, len(keys), per_run):
        end = min(len(keys), start + per_run)
        declarations = encode_put_header(
            blocks=[
                (keys[index], keys[index - 1] if index else parent_key)
                for index in range(start, end)
            ]
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
            parts: list[bytes | memoryview] = [prefix + declarations] if layer == 0 else []
            parts.extend(run_parts(PUT_RUNS, layer, start - first, checksums, views))
            yield parts
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

    def declare(self, key: bytes, parent_key: bytes) -> None:
        self._parts.append(encode_put_header(blocks=[(key, parent_key)]))

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
