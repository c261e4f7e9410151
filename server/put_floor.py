"""The put floor: a put's server work stays within a constant of the bytes it carries.

Every put message, chunk and run costs the server a fixed amount of work (a gRPC
message or a frame, a decode, a checksum call, a copy), so a put cut into 1-byte
chunks, or padded with empty messages, would cost thousands of times what the same
bytes cost in normal pieces. The rule (docs/protocol.md, "The put floor"), with
`floor` = MIN_PUT_PIECE_BYTES (16 KiB; less where the message limit is small):

- a LayerChunk of fewer than `floor` bytes must end its block-layer or the layer's
  K half (a sender's last piece of a contiguous segment);
- a LayerRun of fewer than `floor` bytes must reach the last block declared so far
  (the last, partial group of a put or of a layer);
- a message after the first must carry something (a declaration, a chunk or a run);
- the put's messages number at most 3 + num_layers + data_bytes // floor: on average
  a message carries `floor` bytes, beyond one short message per layer;
- its chunks and runs, counted over the whole put, number at most 4 per message +
  num_layers + 2 x data_bytes // floor: each carries `floor` bytes, beyond a few short
  ones per message and one per layer (a put of a few blocks of a many-layer model
  sends every layer's short run in one message).

kvstore's client sends pieces of at least MIN_PUT_CHUNK_BYTES (2 x floor), which
meets every clause (see the docs for why). Anything else is INVALID_ARGUMENT, before
the message is applied.
"""

from __future__ import annotations

from kvstore.errors import InvalidRequest
from kvstore.layout import KVLayout
from kvstore.wire.chunks import PutMessage

# Messages a put may send beyond its average and its one short message per layer: the
# first (namespace and declarations), and a last short one.
_SPARE_MESSAGES = 3
# Pieces a message may carry beyond two per `floor` of its bytes: a short piece that
# ends a layer's K half and one that ends the layer, or a run and a chunk.
_SPARE_PIECES = 4


class PutFloor:
    """Checks one put's messages against the floor, as they arrive."""

    def __init__(self, layout: KVLayout, floor_bytes: int) -> None:
        self._floor_bytes = floor_bytes
        self._layer_bytes = layout.layer_bytes
        self._half_bytes = layout.layer_bytes // 2  # K precedes V in every block-layer
        self._num_layers = layout.num_layers
        self._num_messages = 0
        self._data_bytes = 0
        self._num_pieces = 0

    def admit(self, message: PutMessage) -> None:
        """Before `message` is applied: raise InvalidRequest if it is empty (after the
        first), has more pieces than its bytes allow, or takes the put over its budget
        of messages. What passes costs the server a constant times its bytes."""
        floor = self._floor_bytes
        data_bytes = sum(len(chunk.data) for chunk in message.chunks)
        data_bytes += sum(message.data_bytes(run) for run in message.runs)
        num_pieces = len(message.chunks) + len(message.runs)
        self._num_messages += 1
        self._data_bytes += data_bytes
        if self._num_messages > 1 and not (message.blocks or num_pieces):
            raise InvalidRequest(
                "an empty put message (no block, chunk or run); every message after the "
                "first must carry something"
            )
        self._num_pieces += num_pieces
        # Counted over the whole put, not per message: a put of short layers (a few blocks
        # of a many-layer model) may carry every layer's one short piece in one message.
        allowed_pieces = (
            _SPARE_PIECES * self._num_messages + self._num_layers + 2 * self._data_bytes // floor
        )
        if self._num_pieces > allowed_pieces:
            raise InvalidRequest(
                f"{self._num_pieces} chunks and runs in {self._num_messages} put messages carry "
                f"{self._data_bytes} bytes: they carry at least {floor} bytes each (the "
                f"server's put floor), beyond one short piece per layer; send fewer, larger "
                f"chunks (see docs/protocol.md)"
            )
        allowed = _SPARE_MESSAGES + self._num_layers + self._data_bytes // floor
        if self._num_messages > allowed:
            raise InvalidRequest(
                f"{self._num_messages} put messages for {self._data_bytes} bytes of layer "
                f"data: a put's messages carry at least {floor} bytes each on average (the "
                f"server's put floor), beyond one short message per layer; send fewer, "
                f"larger messages (see docs/protocol.md)"
            )

    def check_pieces(self, message: PutMessage, num_declared: int) -> None:
        """Before `message` is applied, with `num_declared` counting its own block
        declarations: raise InvalidRequest if a short chunk or run does not end what it
        writes."""
        floor = self._floor_bytes
        # A malformed piece (empty, past its layer, the wrong size, past the blocks
        # declared) is left to the message's own validation, whose error names what is
        # wrong with it; it is refused there all the same, and costs nothing more.
        for chunk in message.chunks:
            size = len(chunk.data)
            end = chunk.offset + size
            if size == 0 or end > self._layer_bytes:
                continue
            if size < floor and end != self._layer_bytes and end != self._half_bytes:
                raise InvalidRequest(
                    f"block {chunk.block_index} layer {chunk.layer}: a {size}-byte chunk at "
                    f"offset {chunk.offset} that does not end its layer (or the layer's K "
                    f"half); chunks carry at least {floor} bytes (the server's put floor) "
                    f"unless they end one; see docs/protocol.md"
                )
        for run in message.runs:
            size = message.data_bytes(run)
            last = run.first_block + run.num_blocks
            if size != run.num_blocks * self._layer_bytes or last > num_declared:
                continue
            if size < floor and last != num_declared:
                raise InvalidRequest(
                    f"a {size}-byte run of layer {run.layer} (blocks {run.first_block}.."
                    f"{run.first_block + run.num_blocks - 1}) that does not reach the last "
                    f"declared block; runs carry at least {floor} bytes (the server's put "
                    f"floor) unless they end the blocks declared; see docs/protocol.md"
                )
