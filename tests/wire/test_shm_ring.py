"""RegionRing (kvstore.wire.shm): where messages go in a shared buffer, and when space
comes back; and the region codec."""

from __future__ import annotations

import pytest

from kvstore.wire.errors import WireError
from kvstore.wire.shm import Region, RegionRing, copy_parts, decode_region


def test_messages_go_back_to_back_and_wrap_to_the_start_when_the_end_is_short() -> None:
    ring = RegionRing(100)
    assert ring.reserve(40) == 0
    assert ring.reserve(40) == 40
    assert ring.reserve(30) is None  # 20 left at the end, none at the start
    ring.free_oldest()  # [0, 40) is free again
    assert ring.reserve(30) == 0  # wraps: the tail's 20 bytes are skipped
    assert ring.reserve(11) is None  # [30, 40) is only 10 bytes before the oldest
    assert ring.reserve(10) == 30
    ring.free_oldest()
    ring.free_oldest()
    ring.free_oldest()
    assert ring.num_in_use == 0
    assert ring.reserve(100) == 0  # empty: the whole ring, from the start


def test_a_ring_inside_a_buffer_gives_absolute_offsets() -> None:
    ring = RegionRing(64, start=1000)
    assert ring.reserve(64) == 1000
    assert ring.reserve(1) is None


def test_regions_in_use_never_overlap() -> None:
    ring = RegionRing(1000)
    live: list[tuple[int, int]] = []
    sizes = [7, 300, 120, 999, 1, 450, 64, 500, 333, 250] * 20
    for size in sizes:
        offset = ring.reserve(size)
        while offset is None:
            ring.free_oldest()
            live.pop(0)
            offset = ring.reserve(size)
        assert offset >= 0
        assert offset + size <= 1000
        for start, end in live:
            assert offset + size <= start or end <= offset
        live.append((offset, offset + size))


def test_a_message_larger_than_the_ring_never_fits() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        RegionRing(10).reserve(11)


def test_freeing_more_than_was_handed_out_is_a_wire_error() -> None:
    ring = RegionRing(10)
    with pytest.raises(WireError, match="SHM_DONE for no message"):
        ring.free_oldest()


def test_regions_round_trip_and_short_ones_are_refused() -> None:
    region = Region(3, 1 << 40, 12345)
    assert decode_region(region.encode()) == region
    assert region.end == (1 << 40) + 12345
    with pytest.raises(WireError, match="20 bytes"):
        decode_region(region.encode()[:19])


def test_copy_parts_joins_bytes_and_views_of_any_item_size() -> None:
    import array

    buffer = memoryview(bytearray(16))
    words = memoryview(array.array("H", [0x0201, 0x0403]))
    assert copy_parts(buffer, 2, [b"ab", words, memoryview(b"xyz")]) == 9
    assert bytes(buffer[:12]) == b"\0\0ab\x01\x02\x03\x04xyz\0"


def test_the_newest_message_can_give_back_what_it_did_not_use() -> None:
    ring = RegionRing(100)
    assert ring.reserve(80) == 0
    ring.shrink_newest(30)
    assert ring.reserve(70) == 30  # the 50 bytes it gave back, and the 20 after them
    with pytest.raises(ValueError, match="more than the 70 reserved"):
        ring.shrink_newest(71)
