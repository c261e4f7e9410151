"""Per-layer lz4 after a byte-shuffle filter, kept only where it pays: the SSD tier's block
files (kvstore.tiers.ssd) and a get's bytes on the network (kvstore.wire.compression).

KV elements are 16-bit floats (fp16, bf16) or 8-bit ones (fp8). A float's high byte
(sign and exponent) varies far less than its low byte (mantissa), but interleaved the
two look like noise to lz4, which only finds repeats. The shuffle groups byte 0 of every
element, then byte 1 (Blosc's filter), so the exponent bytes sit together and repeat.
8-bit elements have nothing to shuffle and go to lz4 as they are.

Adaptive: a layer is first probed (its first `probe_bytes`); a layer whose probe, or
whole, does not shrink by `min_saving` is stored raw, so incompressible data (random
bytes, dense mantissas) costs one small probe, not a whole compression, and a read of a
raw layer costs no decompression at all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import lz4.block
import numpy as np

PROBE_BYTES = 64 << 10
COMPRESSIONS = ("off", "lz4")  # the SSD tier's settings


class LayerEncoding(enum.Enum):
    """How a layer's bytes are stored; the values are written in block file headers."""

    RAW = "raw"
    LZ4 = "lz4"  # lz4 block format, bytes as they are
    SHUFFLE_LZ4 = "shuffle+lz4"  # bytes grouped by their position in the element, then lz4


@dataclass(frozen=True, slots=True)
class EncodedLayer:
    encoding: LayerEncoding
    data: bytes | memoryview  # the stored bytes: the layer itself when RAW


class LayerCodec:
    """Encodes the layers of one element size; `min_saving` is the fraction of a layer's
    bytes that compression must save (0.1: stored <= 90%) for it to be kept."""

    def __init__(
        self, element_bytes: int, min_saving: float, probe_bytes: int = PROBE_BYTES
    ) -> None:
        if element_bytes < 1:
            raise ValueError(f"element_bytes must be >= 1, got {element_bytes}")
        if not 0.0 <= min_saving < 1.0:
            raise ValueError(f"min_saving must be in [0, 1), got {min_saving}")
        self.element_bytes = element_bytes
        self.min_saving = min_saving
        # Whole elements, so the probe shuffles as the layer does.
        self.probe_bytes = max(element_bytes, probe_bytes - probe_bytes % element_bytes)
        self.compressed_encoding = (
            LayerEncoding.LZ4 if element_bytes == 1 else LayerEncoding.SHUFFLE_LZ4
        )

    def encode(self, layer: bytes | memoryview) -> EncodedLayer:
        view = memoryview(layer).cast("B")
        nbytes = len(view)
        if nbytes == 0 or nbytes % self.element_bytes:
            return EncodedLayer(LayerEncoding.RAW, view)
        if nbytes > self.probe_bytes:
            probe = view[: self.probe_bytes]
            if not self._pays(len(self._compress(probe)), len(probe)):
                return EncodedLayer(LayerEncoding.RAW, view)
        compressed = self._compress(view)
        if not self._pays(len(compressed), nbytes):
            return EncodedLayer(LayerEncoding.RAW, view)
        return EncodedLayer(self.compressed_encoding, compressed)

    def _pays(self, stored_bytes: int, nbytes: int) -> bool:
        return stored_bytes <= nbytes * (1.0 - self.min_saving)

    def _compress(self, view: memoryview) -> bytes:
        source = view if self.element_bytes == 1 else shuffle(view, self.element_bytes)
        return bytes(lz4.block.compress(source, store_size=False))


def decode_layer(
    encoding: LayerEncoding, stored: bytes | memoryview, element_bytes: int, out: memoryview
) -> None:
    """Write the layer's original bytes into `out` (exactly the layer's size).

    Raises ValueError when the stored bytes do not decode to exactly `len(out)` bytes.
    """
    nbytes = len(out)
    if encoding is LayerEncoding.RAW:
        if len(stored) != nbytes:
            raise ValueError(f"a raw layer of {len(stored)} B where {nbytes} B belong")
        out[:] = stored
        return
    try:
        plain = lz4.block.decompress(stored, uncompressed_size=nbytes)
    except lz4.block.LZ4BlockError as error:
        raise ValueError(f"lz4 data does not decode: {error}") from error
    if len(plain) != nbytes:
        raise ValueError(f"lz4 data decodes to {len(plain)} B where {nbytes} B belong")
    if encoding is LayerEncoding.LZ4 or element_bytes == 1:
        out[:] = plain
    else:
        unshuffle_into(plain, element_bytes, out)


def shuffle(data: bytes | memoryview, element_bytes: int) -> np.ndarray:
    """Byte i of every element, for i = 0 .. element_bytes - 1, one run after another."""
    source = np.frombuffer(data, dtype=np.uint8)
    if element_bytes == 2:
        # Two vectorised passes over 16-bit words: several times a strided copy's speed.
        words = source.view(np.uint16)
        out = np.empty(len(source), dtype=np.uint8)
        planes = out.reshape(2, -1)
        np.bitwise_and(words, 0xFF, out=planes[0], casting="unsafe")
        np.right_shift(words, 8, out=planes[1], casting="unsafe")
        return out
    return source.reshape(-1, element_bytes).T.copy().reshape(-1)


def unshuffle_into(data: bytes | memoryview, element_bytes: int, out: memoryview) -> None:
    """The inverse of `shuffle`, written into `out`."""
    planes = np.frombuffer(data, dtype=np.uint8).reshape(element_bytes, -1)
    target = np.frombuffer(out, dtype=np.uint8)
    if element_bytes == 2:
        # Little-endian words: the high plane shifted left, then the low plane or-ed in.
        words = target.view(np.uint16)
        np.left_shift(planes[1], 8, out=words, dtype=np.uint16)
        np.bitwise_or(words, planes[0], out=words)
        return
    target.reshape(-1, element_bytes)[:] = planes.T
