"""PageArena.write_slices: the vectorised path and the per-block fallback agree with write."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.arena import PageArena

PAGE = 4096


def _random(nbytes: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(nbytes)


def _block_bytes(arena: PageArena, pages: list[int], nbytes: int) -> bytes:
    return b"".join(bytes(view) for view in arena.read(pages, 0, nbytes))


@pytest.mark.parametrize(
    ("slice_bytes", "offset"),
    [
        (1024, 2048),  # inside one page at a multiple of its size: one vectorised copy
        (1024, 4096 + 1024),  # the same, in a block's second page
        (1000, 3000),  # not a divisor of the page: a write per block
        (1024, 3584),  # straddles a page boundary: a write per block
    ],
)
def test_write_slices_puts_each_slice_into_its_block(slice_bytes: int, offset: int) -> None:
    arena = PageArena(16 * PAGE, PAGE)
    # Blocks of two pages each, deliberately not adjacent and out of order.
    blocks = [arena.allocate(2 * PAGE) for _ in range(4)]
    assert all(pages is not None for pages in blocks)
    handles = [pages for pages in blocks if pages is not None][::-1]
    before = {id(pages): _random(2 * PAGE, index) for index, pages in enumerate(handles)}
    for pages in handles:
        arena.write(pages, 0, before[id(pages)])
    data = _random(len(handles) * slice_bytes, 99)

    arena.write_slices(handles, offset, memoryview(data), slice_bytes)

    for number, pages in enumerate(handles):
        expected = bytearray(before[id(pages)])
        expected[offset : offset + slice_bytes] = data[
            number * slice_bytes : (number + 1) * slice_bytes
        ]
        assert _block_bytes(arena, pages, 2 * PAGE) == bytes(expected)


def test_write_slices_through_tensor_copies_matches() -> None:
    arena = PageArena(8 * PAGE, PAGE, tensor_copies=True)  # the HBM tier's code path
    handles = [arena.allocate(PAGE), arena.allocate(PAGE)]
    pages = [handle for handle in handles if handle is not None]
    data = _random(2 * 512, 7)
    arena.write_slices(pages, 512, memoryview(data), 512)
    assert _block_bytes(arena, pages[0], PAGE)[512:1024] == data[:512]
    assert _block_bytes(arena, pages[1], PAGE)[512:1024] == data[512:]


@pytest.mark.parametrize(
    ("offset", "nbytes"),
    [(1024, 1024), (4096 + 512, 2048), (3584, 1024), (0, 2 * PAGE)],  # last two span pages
)
@pytest.mark.parametrize("tensor_copies", [False, True])
def test_read_slices_equals_reading_each_block(
    offset: int, nbytes: int, tensor_copies: bool
) -> None:
    arena = PageArena(16 * PAGE, PAGE, tensor_copies=tensor_copies)
    handles = [arena.allocate(2 * PAGE) for _ in range(3)]
    blocks = [pages for pages in handles if pages is not None][::-1]
    for index, pages in enumerate(blocks):
        arena.write(pages, 0, _random(2 * PAGE, index))

    got = b"".join(bytes(view) for view in arena.read_slices(blocks, offset, nbytes))

    expected = b"".join(
        _block_bytes(arena, pages, 2 * PAGE)[offset : offset + nbytes] for pages in blocks
    )
    assert got == expected
    assert len(got) == 3 * nbytes
