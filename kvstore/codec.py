"""Between a worker's torch tensors and block bytes, without copies where the layout allows.

A worker holds KV in one of three forms:

- `blocks`:   `[num_blocks, num_layers, 2, block_tokens, num_kv_heads, head_dim]`, the
  store's own layout: each block-layer is one contiguous run of bytes (zero copies).
- `sequence`: `[num_layers, 2, num_tokens, num_kv_heads, head_dim]`, K and V over a
  token sequence: each block-layer is two contiguous runs (K, then V), still zero copies.
- `layer`:    `[num_blocks, 2, block_tokens, num_kv_heads, head_dim]`, one layer of many
  blocks, as a prefill worker produces it layer by layer (paged caches look like this).

Block-layer bytes are addressed as a list of 1-D uint8 CPU tensors ("pieces") that,
concatenated, are the layer's bytes. 8-bit types travel as their raw bytes.
"""

from __future__ import annotations

import enum

import numpy as np
import torch

from kvstore.errors import InvalidRequest
from kvstore.layout import KVLayout


class KVForm(enum.Enum):
    BLOCKS = "blocks"
    SEQUENCE = "sequence"
    LAYER = "layer"


def expected_shape(layout: KVLayout, form: KVForm, num_blocks: int) -> tuple[int, ...]:
    lay = layout
    if form is KVForm.BLOCKS:
        return (num_blocks, lay.num_layers, *lay.layer_shape)
    if form is KVForm.SEQUENCE:
        return (lay.num_layers, 2, num_blocks * lay.block_tokens, lay.num_kv_heads, lay.head_dim)
    return (num_blocks, *lay.layer_shape)


def check_tensor(
    tensor: torch.Tensor, layout: KVLayout, form: KVForm, num_blocks: int, *, at_least: bool = False
) -> None:
    """Raise InvalidRequest unless `tensor` has the layout's dtype and the form's shape.

    With `at_least`, a `sequence` tensor may hold more tokens than the blocks need
    (a trailing partial block is simply not stored).
    """
    if tensor.dtype != layout.dtype.torch_dtype:
        raise InvalidRequest(
            f"KV tensor dtype {tensor.dtype} does not match the namespace layout's "
            f"{layout.dtype.torch_dtype}"
        )
    want = expected_shape(layout, form, num_blocks)
    shape = tuple(tensor.shape)
    if at_least and form is KVForm.SEQUENCE and len(shape) == 5:
        ok = shape[:2] == want[:2] and shape[3:] == want[3:] and shape[2] >= want[2]
    else:
        ok = shape == want
    if not ok:
        raise InvalidRequest(
            f"KV tensor has shape {shape}; the {form.value} form for {num_blocks} blocks of this "
            f"layout is {want}"
        )


def cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when it is already a contiguous CPU tensor (no copy), else a copy."""
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    return tensor.contiguous()


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a 1-D uint8 view (no copy)."""
    flat = tensor.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def block_layer_pieces(
    kv: torch.Tensor, form: KVForm, block: int, layer: int, block_tokens: int
) -> list[torch.Tensor]:
    """Byte views that, concatenated, are layer `layer` of block `block` (kv is contiguous)."""
    if form is KVForm.BLOCKS:
        return [as_bytes(kv[block, layer])]
    if form is KVForm.LAYER:
        return [as_bytes(kv[block])]
    tokens = slice(block * block_tokens, (block + 1) * block_tokens)
    return [as_bytes(kv[layer, 0, tokens]), as_bytes(kv[layer, 1, tokens])]


class ByteMap:
    """Where each block-layer lives in a contiguous CPU tensor's bytes, by arithmetic.

    `segments(block, layer)` lists the (start, nbytes) runs that, in order, hold the
    layer's bytes: one run in the `blocks` and `layer` forms, two (K, V) in `sequence`.
    `view` is the tensor's bytes as a writable memoryview (no copy).
    """

    def __init__(self, tensor: torch.Tensor, layout: KVLayout, form: KVForm) -> None:
        if not tensor.is_contiguous() or tensor.device.type != "cpu":
            raise InvalidRequest("ByteMap needs a contiguous CPU tensor")
        self.view = as_bytes(tensor).numpy().data
        self._array = np.frombuffer(self.view, dtype=np.uint8)
        self._form = form
        self._layer_bytes = layout.layer_bytes
        self._num_layers = layout.num_layers
        self._half = layout.layer_bytes // 2
        self._num_tokens = tensor.shape[2] if form is KVForm.SEQUENCE else 0
        self._token_bytes = layout.token_layer_bytes // 2  # K (or V) of one token
        block_bytes = self._num_layers * self._layer_bytes
        self._blocks = (  # the blocks form's array, shaped once (None: no whole blocks)
            self._array.reshape(-1, self._num_layers, self._layer_bytes)
            if form is KVForm.BLOCKS and len(self._array) % block_bytes == 0
            else None
        )

    def segments(self, block: int, layer: int) -> tuple[tuple[int, int], ...]:
        if self._form is KVForm.BLOCKS:
            return (((block * self._num_layers + layer) * self._layer_bytes, self._layer_bytes),)
        if self._form is KVForm.LAYER:
            return ((block * self._layer_bytes, self._layer_bytes),)
        half = self._half
        key_start = (2 * layer * self._num_tokens) * self._token_bytes + block * half
        value_start = key_start + self._num_tokens * self._token_bytes
        return ((key_start, half), (value_start, half))

    def write(self, block: int, layer: int, offset: int, data: memoryview | bytes) -> None:
        """Copy `data` into the block-layer at byte `offset`."""
        done, size = 0, len(data)
        for start, length in self.segments(block, layer):
            if offset >= length:
                offset -= length
                continue
            take = min(length - offset, size - done)
            self.view[start + offset : start + offset + take] = data[done : done + take]
            done += take
            offset = 0
            if done == size:
                return
        raise InvalidRequest("chunk runs past the end of its block layer")

    def write_run(self, first_block: int, num_blocks: int, layer: int, data: memoryview) -> None:
        """Copy whole layer `layer` of consecutive blocks (concatenated in `data`) in one go."""
        layer_bytes = self._layer_bytes
        if len(data) != num_blocks * layer_bytes:
            raise InvalidRequest(f"a run of {num_blocks} blocks carries {len(data)} bytes")
        if self._form is KVForm.LAYER:
            start = first_block * layer_bytes
            self.view[start : start + len(data)] = data
            return
        if self._form is KVForm.BLOCKS:
            if num_blocks == 1:  # one contiguous slice: no array needed
                start = (first_block * self._num_layers + layer) * layer_bytes
                if not 0 <= start <= len(self.view) - layer_bytes:
                    raise InvalidRequest(f"block {first_block} is past the tensor's end")
                self.view[start : start + layer_bytes] = data
                return
            blocks = self._blocks
            if blocks is None:
                blocks = self._array.reshape(-1, self._num_layers, layer_bytes)
            blocks[first_block : first_block + num_blocks, layer] = np.frombuffer(
                data, dtype=np.uint8
            ).reshape(num_blocks, layer_bytes)
        else:
            source = np.frombuffer(data, dtype=np.uint8)
            # Each block's layer is [K | V]; in the sequence form all K of a layer are one
            # run over the tokens, and all V another: two strided copies.
            half = self._half
            pairs = source.reshape(num_blocks, 2, half)
            key_start, _ = self.segments(first_block, layer)[0]
            value_start = key_start + self._num_tokens * self._token_bytes
            for start, part in ((key_start, 0), (value_start, 1)):
                target = self._array[start : start + num_blocks * half]
                target.reshape(num_blocks, half)[:] = pairs[:, part]

    def run_views(self, first: int, end: int, layer: int) -> list[memoryview] | None:
        """Layer `layer` of blocks `first..end-1`, one view per block, by stride arithmetic;
        None in the `sequence` form, where each block-layer is two pieces (K and V)."""
        layer_bytes = self._layer_bytes
        if self._form is KVForm.BLOCKS:
            stride = self._num_layers * layer_bytes
            begin = (first * self._num_layers + layer) * layer_bytes
        elif self._form is KVForm.LAYER:
            stride, begin = layer_bytes, first * layer_bytes
        else:
            return None
        view = self.view
        starts = range(begin, begin + (end - first) * stride, stride)
        return [view[start : start + layer_bytes] for start in starts]

    def layer_parts(self, block: int, layer: int) -> list[memoryview]:
        """The block-layer's bytes as views, in order: one, or two (K, V) in `sequence`."""
        view = self.view
        return [view[start : start + length] for start, length in self.segments(block, layer)]

    def runs(self, block: int, layer: int, max_chunk_bytes: int) -> list[tuple[int, memoryview]]:
        """(offset within the layer, bytes) runs of at most `max_chunk_bytes`, no copies."""
        runs: list[tuple[int, memoryview]] = []
        offset = 0
        for start, length in self.segments(block, layer):
            for part in range(0, length, max_chunk_bytes):
                size = min(max_chunk_bytes, length - part)
                runs.append((offset + part, self.view[start + part : start + part + size]))
            offset += length
        return runs


def read_pieces(pieces: list[torch.Tensor], max_chunk_bytes: int) -> list[tuple[int, memoryview]]:
    """(offset, bytes) runs of at most `max_chunk_bytes` covering the pieces, in order."""
    runs: list[tuple[int, memoryview]] = []
    offset = 0
    for piece in pieces:
        view = piece.numpy().data
        for start in range(0, len(view), max_chunk_bytes):
            part = view[start : start + max_chunk_bytes]
            runs.append((offset + start, part))
        offset += len(view)
    return runs


def write_pieces(pieces: list[torch.Tensor], offset: int, data: bytes) -> None:
    """Copy `data` into the pieces' concatenated bytes at `offset`."""
    source = np.frombuffer(data, dtype=np.uint8)
    done = 0
    for piece in pieces:
        size = piece.numel()
        if offset >= size:
            offset -= size
            continue
        take = min(size - offset, len(source) - done)
        piece.numpy()[offset : offset + take] = source[done : done + take]
        done += take
        offset = 0
        if done == len(source):
            return
    if done != len(source):
        raise InvalidRequest("chunk runs past the end of its block layer")
