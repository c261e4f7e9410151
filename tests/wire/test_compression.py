"""The wire's lz4 codec: what the server encodes decodes byte-exact, data that do not
shrink travel as they are, and the client's decoder trusts no size it is told beyond
what the layout allows there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.wire.compression import (
    LZ4_SHUFFLE,
    NONE,
    WireDataError,
    WireEncoder,
    decode_wire_data,
)

KiB = 1024


def smooth(nbytes: int, dtype: torch.dtype) -> bytes:
    """Values of a narrow range: their exponent bytes repeat."""
    count = nbytes // dtype.itemsize
    values = torch.rand(count, generator=torch.Generator().manual_seed(0)) * 0.2 + 1.0
    return values.to(dtype).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_encoded_data_decode_byte_exact(dtype: torch.dtype) -> None:
    raw = smooth(256 * KiB, dtype)
    encoder = WireEncoder(dtype.itemsize)
    # Two views, as a chunk spanning two arena segments arrives.
    compression, raw_bytes, parts = encoder.encode([memoryview(raw)[:1000], memoryview(raw)[1000:]])
    assert (compression, raw_bytes, len(parts)) == (LZ4_SHUFFLE, len(raw), 1)
    assert len(parts[0]) < 0.9 * len(raw)
    decoded = decode_wire_data(compression, parts[0], raw_bytes, dtype.itemsize, len(raw))
    assert bytes(decoded) == raw


def test_data_that_do_not_shrink_go_as_they_are() -> None:
    noise = memoryview(np.random.default_rng(0).integers(0, 256, 128 * KiB, dtype=np.uint8))
    views = [noise[: 64 * KiB], noise[64 * KiB :]]
    compression, raw_bytes, parts = WireEncoder(2).encode(views)
    assert (compression, raw_bytes) == (NONE, 0)
    assert parts == views  # the views themselves: no copy


def encoded(nbytes: int = 64 * KiB) -> tuple[bytes, int]:
    raw = smooth(nbytes, torch.float16)
    _, raw_bytes, parts = WireEncoder(2).encode([raw])
    return bytes(parts[0]), raw_bytes


@pytest.mark.parametrize(
    ("claimed", "max_raw", "message"),
    [
        (1 << 40, 64 * KiB, "allows 1..65536"),  # a forged size: nothing that large is made
        (0, 64 * KiB, "allows 1..65536"),
        (64 * KiB + 2, 64 * KiB, "allows 1..65536"),
        (64 * KiB - 1, 64 * KiB, "whole 2-byte elements"),
        (32 * KiB, 64 * KiB, "does not decode"),  # the data hold more than claimed
        (64 * KiB - 2, 64 * KiB, "does not decode"),
    ],
)
def test_claimed_sizes_are_checked_against_the_layout(
    claimed: int, max_raw: int, message: str
) -> None:
    data, _ = encoded()
    with pytest.raises(WireDataError, match=message):
        decode_wire_data(LZ4_SHUFFLE, data, claimed, 2, max_raw)


def test_a_size_larger_than_the_data_hold_is_an_error() -> None:
    data, raw_bytes = encoded(32 * KiB)
    with pytest.raises(WireDataError, match=r"decodes to|does not decode"):
        decode_wire_data(LZ4_SHUFFLE, data, raw_bytes * 2, 2, raw_bytes * 2)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # cut short
        lambda data: bytes(len(data)),  # zeros
        lambda data: b"\xff" * len(data),
        lambda data: b"",
    ],
    ids=["truncated", "zeros", "ones", "empty"],
)
def test_damaged_data_are_an_error_not_a_crash(damage) -> None:  # type: ignore[no-untyped-def]
    data, raw_bytes = encoded()
    with pytest.raises(WireDataError):
        decode_wire_data(LZ4_SHUFFLE, damage(data), raw_bytes, 2, raw_bytes)


def test_an_unknown_compression_is_an_error() -> None:
    data, raw_bytes = encoded()
    with pytest.raises(WireDataError, match="unknown compression 7"):
        decode_wire_data(7, data, raw_bytes, 2, raw_bytes)
