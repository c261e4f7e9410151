"""The receiving side of GetBlocks: chunks and runs into tensors, layer by layer, verified."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

import torch

from kvstore.checksum import (
    ChecksumKind,
    Hasher,
    checksum,
    checksums_of_slices,
    new_hasher,
)
from kvstore.client._errors import ChecksumError
from kvstore.client._results import LayerArrival
from kvstore.codec import ByteMap, KVForm
from kvstore.errors import InvalidRequest
from kvstore.layout import KVLayout
from kvstore.wire.chunks import GetMessage, WireChunk, WireRun
from kvstore.wire.compression import WireDataError, decode_wire_data
from kvstore.wire.enums import checksum_kind_from_wire
from kvstore.wire.errors import WireError


class BlockWriter(Protocol):
    """Where received block-layers go: a ByteMap, or one that places blocks elsewhere."""

    def write(self, block: int, layer: int, offset: int, data: memoryview | bytes) -> None: ...

    def write_run(
        self, first_block: int, num_blocks: int, layer: int, data: memoryview
    ) -> None: ...


# The most of a get's raw bytes kept as a sample for the wire-compression probe.
SAMPLE_BYTES = 256 << 10


class WireStats:
    """What one get's replies cost on the wire: layer bytes received, the raw bytes and
    received bytes of its compressed chunks and runs, the seconds spent decoding them,
    and (when asked for) a copy of some of its raw bytes."""

    __slots__ = (
        "compressed_raw_bytes",
        "compressed_wire_bytes",
        "decode_s",
        "raw_bytes",
        "sample",
        "wire_bytes",
    )

    def __init__(self, *, want_sample: bool = False) -> None:
        self.raw_bytes = 0  # layer bytes, decoded
        self.wire_bytes = 0
        self.compressed_raw_bytes = 0
        self.compressed_wire_bytes = 0
        self.decode_s = 0.0
        # None: no sample wanted; b"": wanted, none taken yet.
        self.sample: bytes | None = b"" if want_sample else None


class LayerReceiver:
    """Writes a GetBlocks stream into tensors and reports each layer once it is complete.

    With `writer`, the bytes go there instead of into `dest` (which must be None), and
    an arrival's `kv` is an empty tensor: the writer's owner assembles the layers.
    """

    def __init__(
        self,
        layout: KVLayout,
        first: GetMessage,
        dest: torch.Tensor | None,
        form: KVForm,
        *,
        verify: bool,
        writer: BlockWriter | None = None,
        stats: WireStats | None = None,
        max_blocks: int | None = None,
    ) -> None:
        # Nothing is sized from the server's word before it is checked against the ask.
        if max_blocks is not None and first.num_blocks > max_blocks:
            raise ChecksumError(
                f"the server announced {first.num_blocks} blocks for a get of {max_blocks}"
            )
        self.num_blocks = first.num_blocks
        self.stats = stats or WireStats()
        self._layout = layout
        self._verify = verify
        self._form = form
        self._dest = dest
        self._host: torch.Tensor | None = None
        self._map: ByteMap | None = None
        if dest is not None:
            if dest.device.type == "cpu" and dest.is_contiguous():
                self._host = dest
            else:
                # Bytes land in host memory first; each finished layer is copied over.
                self._host = torch.empty(
                    dest.shape, dtype=dest.dtype, pin_memory=torch.cuda.is_available()
                )
            self._map = ByteMap(self._host, layout, form)
        self._writer = writer
        # Each layer's view of `dest`, made in one call at the first layer's end (the
        # served blocks are known by then): a view per layer costs a torch call each.
        self._dest_layers: tuple[torch.Tensor, ...] | None = None
        self._layer_buffer: torch.Tensor | None = None
        self._current_layer = 0
        # A layer's bytes arrive as chunks (hashed as they come) or inside a run (hashed
        # at once); `_actual` holds the checksum once the block-layer is complete.
        self._hashers: list[Hasher | None] = [None] * self.num_blocks
        self._actual: list[int | None] = [None] * self.num_blocks
        self._expected = [0] * self.num_blocks
        self._filled = [0] * self.num_blocks
        self._kind = ChecksumKind.XXH3_64

    def accept(self, reply: GetMessage) -> Iterator[LayerArrival]:
        """The layers `reply` completes, each as soon as it is (a reply may carry several
        layers: a later one's fault is raised after the earlier ones were handed out).
        Whatever the server sent, a fault is a ChecksumError (a KVStoreClientError),
        never a codec's or numpy's own error."""
        try:
            yield from self._accept(reply)
        except (WireError, InvalidRequest, ValueError) as error:
            raise ChecksumError(f"the server's reply does not fit the get: {error}") from error

    def _accept(self, reply: GetMessage) -> Iterator[LayerArrival]:
        if reply.checksum_kind:
            self._kind = checksum_kind_from_wire(reply.checksum_kind)
        if reply.served_none:
            self._shorten(0)
            if reply.chunks or reply.runs:
                raise ChecksumError("the server served no block, yet sent layer data")
            return
        elif reply.num_blocks and reply.num_blocks != self.num_blocks:
            self._shorten(reply.num_blocks)
        num_layers = self._layout.num_layers
        for chunk in reply.chunks:
            if chunk.layer != self._current_layer:
                yield from self._next_layer(chunk.layer, num_layers)
            self._write(chunk)
        for run in reply.runs:
            if run.layer != self._current_layer:
                yield from self._next_layer(run.layer, num_layers)
            self._write_run(run)

    def _shorten(self, num_blocks: int) -> None:
        """The server found a block unreadable while it streamed layer 0 (it reads SSD
        blocks as it sends): the get serves only the first `num_blocks` blocks, none
        when that was the first. No layer has been handed out yet, so nothing of the
        dropped blocks was used."""
        if num_blocks > self.num_blocks or self._current_layer != 0:
            raise ChecksumError(
                f"the server changed the get from {self.num_blocks} to {num_blocks} blocks "
                f"in layer {self._current_layer}"
            )
        self.num_blocks = num_blocks
        for name in ("_hashers", "_actual", "_expected", "_filled"):
            setattr(self, name, getattr(self, name)[:num_blocks])
        if self._layer_buffer is not None:
            self._layer_buffer = self._layer_buffer[:num_blocks]
            self._layer_buffer_map = ByteMap(self._layer_buffer, self._layout, KVForm.LAYER)

    def _next_layer(self, layer: int, num_layers: int) -> Iterator[LayerArrival]:
        """Complete the current layer and hand it out; the stream must go on with the
        very next one, and one the layout has (a layer past the last would land on the
        next block's). A layer whole and verified is handed out before that is checked."""
        yield self._complete_layer()
        if layer != self._current_layer + 1 or layer >= num_layers:
            raise ChecksumError(
                f"the stream jumped from layer {self._current_layer} to layer {layer} "
                f"(of {num_layers})"
            )
        self._current_layer = layer

    def finish(self) -> list[LayerArrival]:
        if self._current_layer != self._layout.num_layers - 1:
            raise ChecksumError(
                f"the stream ended in layer {self._current_layer} of {self._layout.num_layers}"
            )
        return [self._complete_layer()]

    def _layer_map(self) -> tuple[BlockWriter, int]:
        """The map to write the current layer into, and the layer index within it."""
        if self._writer is not None:
            return self._writer, self._current_layer
        if self._map is not None:
            return self._map, self._current_layer
        if self._layer_buffer is None:
            self._layer_buffer = torch.empty(
                (self.num_blocks, *self._layout.layer_shape), dtype=self._layout.dtype.torch_dtype
            )
            self._layer_buffer_map = ByteMap(self._layer_buffer, self._layout, KVForm.LAYER)
        return self._layer_buffer_map, 0

    def _write(self, chunk: WireChunk) -> None:
        block = chunk.block_index
        if not 0 <= block < self.num_blocks:
            raise ChecksumError(f"server sent block {block} of {self.num_blocks}")
        filled = self._filled[block]
        if chunk.offset != filled:
            raise ChecksumError(f"block {block} layer {chunk.layer}: chunk out of order")
        data = self._payload(
            chunk.compression,
            chunk.data,
            chunk.raw_bytes,
            self._layout.layer_bytes - filled,
            f"block {block} layer {chunk.layer}",
        )
        if chunk.offset == 0:
            self._expected[block] = chunk.layer_checksum
            self._hashers[block] = new_hasher(self._kind)
        if self._verify:
            hasher = self._hashers[block]
            assert hasher is not None
            hasher.update(data)
            if filled + len(data) == self._layout.layer_bytes:
                self._actual[block] = hasher.value()
        byte_map, layer = self._layer_map()
        byte_map.write(block, layer, chunk.offset, data)
        self._filled[block] = filled + len(data)

    def _write_run(self, run: WireRun) -> None:
        first, count = run.first_block, run.num_blocks
        layer_bytes = self._layout.layer_bytes
        if first < 0 or first + count > self.num_blocks or len(run.layer_checksums) != count:
            raise ChecksumError(f"server sent a malformed run of blocks {first}..{first + count}")
        if run.compression:
            data = self._payload(
                run.compression,
                run.data,
                run.raw_bytes,
                count * layer_bytes,
                f"blocks {first}..{first + count - 1} layer {run.layer}",
            )
        else:
            data = run.data
            self._account(data)
        if len(data) != count * layer_bytes:
            raise ChecksumError(f"a run of {count} blocks carries {len(data)} bytes")
        filled = self._filled
        if count == 1:  # a get of one block, or of blocks a run each: no slices
            if filled[first]:
                raise ChecksumError(f"block {first} layer {run.layer} arrived twice")
            self._expected[first] = run.layer_checksums[0]
            if self._verify:
                self._actual[first] = checksum(self._kind, data)
            filled[first] = layer_bytes
        else:
            blocks = slice(first, first + count)
            if any(filled[blocks]):
                twice = next(block for block in range(first, first + count) if filled[block])
                raise ChecksumError(f"block {twice} layer {run.layer} arrived twice")
            self._expected[blocks] = run.layer_checksums
            if self._verify:
                self._actual[blocks] = checksums_of_slices(self._kind, data, layer_bytes)
            filled[blocks] = [layer_bytes] * count
        byte_map, layer = self._layer_map()
        byte_map.write_run(first, count, layer, data)

    def _account(self, data: memoryview) -> None:
        """Count raw bytes received, and keep the first as the probe's sample if wanted."""
        stats = self.stats
        stats.wire_bytes += len(data)
        stats.raw_bytes += len(data)
        if stats.sample == b"" and len(data) >= self._layout.dtype.itemsize:
            size = min(len(data), SAMPLE_BYTES)
            stats.sample = bytes(data[: size - size % self._layout.dtype.itemsize])

    def _payload(
        self, compression: int, data: memoryview, raw_bytes: int, max_raw_bytes: int, where: str
    ) -> memoryview:
        """The raw bytes of a chunk or run, counted; a compressed one is decoded, and a bad
        one is DATA_LOSS, nothing of it used (the layer is never completed)."""
        if not compression:
            self._account(data)
            return data
        started = time.perf_counter()
        try:
            raw = decode_wire_data(
                compression, data, raw_bytes, self._layout.dtype.itemsize, max_raw_bytes
            )
        except WireDataError as error:
            raise ChecksumError(
                f"{where}: compressed bytes from the server do not decode ({error}); "
                f"the data was not used"
            ) from None
        stats = self.stats
        stats.decode_s += time.perf_counter() - started
        stats.wire_bytes += len(data)
        stats.raw_bytes += raw_bytes
        stats.compressed_wire_bytes += len(data)
        stats.compressed_raw_bytes += raw_bytes
        return raw

    def _complete_layer(self) -> LayerArrival:
        layer = self._current_layer
        layer_bytes = self._layout.layer_bytes
        num_blocks = self.num_blocks
        # Whole-list comparisons run in C; the per-block loop only finds the culprit.
        complete = self._filled.count(layer_bytes) == num_blocks
        verified = not self._verify or self._actual == self._expected
        if not (complete and verified):
            for block in range(num_blocks):
                if self._filled[block] != layer_bytes:
                    raise ChecksumError(f"block {block} layer {layer} arrived incomplete")
                if self._actual[block] != self._expected[block]:
                    raise ChecksumError(
                        f"block {block} layer {layer}: received bytes fail their "
                        f"{self._kind.name} checksum; the data was not used"
                    )
        self._filled = [0] * num_blocks
        self._hashers = [None] * num_blocks
        self._actual = [None] * num_blocks
        return LayerArrival(layer=layer, num_blocks=self.num_blocks, kv=self._layer_view(layer))

    def _layer_view(self, layer: int) -> torch.Tensor:
        if self._writer is not None:
            return torch.empty(0)
        if self._host is None:
            assert self._layer_buffer is not None
            buffer, self._layer_buffer = self._layer_buffer, None
            return buffer
        assert self._dest is not None
        if self._host is self._dest:
            if self._dest_layers is None:
                self._dest_layers = self._layer_views(self._dest)
            return self._dest_layers[layer]
        tokens = self.num_blocks * self._layout.block_tokens
        if self._form is KVForm.SEQUENCE:
            host, dest = self._host[layer, :, :tokens], self._dest[layer, :, :tokens]
        elif self._form is KVForm.BLOCKS:
            host, dest = self._host[: self.num_blocks, layer], self._dest[: self.num_blocks, layer]
        else:
            host, dest = self._host[: self.num_blocks], self._dest[: self.num_blocks]
        dest.copy_(host, non_blocking=True)
        return dest

    def _layer_views(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every layer's view of the served blocks in `tensor` (of the receiver's form)."""
        if self._form is KVForm.SEQUENCE:
            tokens = self.num_blocks * self._layout.block_tokens
            return tensor[:, :, :tokens].unbind(0)
        if self._form is KVForm.BLOCKS:
            return tensor[: self.num_blocks].unbind(1)
        return (tensor[: self.num_blocks],) * self._layout.num_layers
