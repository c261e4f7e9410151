"""lz4 on the network path: a get's chunks and runs, compressed where it pays.

The encoding (kvstore.v1 WireCompression LZ4_SHUFFLE) is the SSD tier's
(kvstore.layer_codec): a byte shuffle by the layout's element size, then an lz4 block,
kept only where it saves `min_saving` of the bytes; anything else travels raw. The server
encodes (`WireEncoder`, on a thread: lz4 releases the GIL); the client decodes
(`decode_wire_data`) after checking the size the message claims against what the layout
allows there, so a forged size cannot make it allocate more than one layer (or one
run's layers), and lz4 never writes past that size.

Checksums stay over the raw bytes: the client verifies what it decoded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvstore.layer_codec import LayerCodec, LayerEncoding, decode_layer
from kvstore.v1 import kvstore_pb2 as pb

NONE = int(pb.WireCompression.WIRE_COMPRESSION_NONE)
LZ4_SHUFFLE = int(pb.WireCompression.LZ4_SHUFFLE)
# What compression must save of a chunk or run for it to travel compressed: less than
# that is not worth the receiver's decode.
WIRE_MIN_SAVING = 0.1


class WireEncoder:
    """Encodes the data of one get's chunks and runs, for `element_bytes`-byte elements."""

    def __init__(self, element_bytes: int, min_saving: float = WIRE_MIN_SAVING) -> None:
        self._codec = LayerCodec(element_bytes, min_saving)

    def encode(
        self, views: Sequence[memoryview | bytes]
    ) -> tuple[int, int, list[memoryview | bytes]]:
        """(compression, raw bytes, data parts): the views themselves where lz4 does not
        save enough (compression NONE, raw bytes 0), else one compressed part."""
        data = views[0] if len(views) == 1 else b"".join(views)
        encoded = self._codec.encode(data)
        if encoded.encoding is LayerEncoding.RAW:
            return NONE, 0, list(views)
        return LZ4_SHUFFLE, memoryview(data).nbytes, [encoded.data]


class WireDataError(ValueError):
    """A compressed chunk or run that is not what it claims; the message says why."""


def decode_wire_data(
    compression: int,
    data: memoryview | bytes,
    raw_bytes: int,
    element_bytes: int,
    max_raw_bytes: int,
) -> memoryview:
    """The raw bytes of a compressed chunk or run, in a fresh buffer of `raw_bytes`.

    `max_raw_bytes` is what the layout allows where the data goes (the rest of the layer
    for a chunk, exactly its layers for a run). Raises WireDataError for an unknown
    compression, a claimed size out of bounds, or data that does not decode to it.
    """
    if compression != LZ4_SHUFFLE:
        raise WireDataError(f"unknown compression {compression} (this client knows LZ4_SHUFFLE)")
    if not 0 < raw_bytes <= max_raw_bytes:
        raise WireDataError(
            f"it claims {raw_bytes} raw bytes where the layout allows 1..{max_raw_bytes}"
        )
    if raw_bytes % element_bytes:
        raise WireDataError(f"{raw_bytes} raw bytes is not whole {element_bytes}-byte elements")
    encoding = LayerEncoding.LZ4 if element_bytes == 1 else LayerEncoding.SHUFFLE_LZ4
    out = np.empty(raw_bytes, dtype=np.uint8).data  # not zeroed: decoding fills it
    try:
        decode_layer(encoding, data, element_bytes, out)
    except ValueError as error:
        raise WireDataError(str(error)) from None
    return out
