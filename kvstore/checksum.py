"""Block checksums: xxh3-64 (default) or CRC32C over a layer's bytes, streamed."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Protocol

import crc32c
import xxhash


class ChecksumKind(enum.Enum):
    """The values equal the wire enum's numbers."""

    XXH3_64 = 1
    CRC32C = 2


class Hasher(Protocol):
    def update(self, data: bytes | memoryview) -> None: ...

    def value(self) -> int: ...


class _Xxh3Hasher:
    __slots__ = ("_state",)

    def __init__(self) -> None:
        self._state = xxhash.xxh3_64()

    def update(self, data: bytes | memoryview) -> None:
        self._state.update(data)

    def value(self) -> int:
        return int(self._state.intdigest())


class _Crc32cHasher:
    __slots__ = ("_crc",)

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes | memoryview) -> None:
        self._crc = crc32c.crc32c(data, self._crc)

    def value(self) -> int:
        return self._crc


def new_hasher(kind: ChecksumKind) -> Hasher:
    if kind is ChecksumKind.XXH3_64:
        return _Xxh3Hasher()
    return _Crc32cHasher()


def checksum(kind: ChecksumKind, data: bytes | memoryview) -> int:
    return int(_DIGESTS[kind](data))


def checksums_of(kind: ChecksumKind, parts: Sequence[bytes | memoryview]) -> list[int]:
    """The checksum of each part on its own (the layers of a run)."""
    digest = _DIGESTS[kind]
    return [digest(part) for part in parts]


def checksums_of_slices(kind: ChecksumKind, data: memoryview, nbytes: int) -> list[int]:
    """The checksum of each consecutive `nbytes` slice of `data` (a run of layers)."""
    return checksums_of(
        kind, [data[start : start + nbytes] for start in range(0, len(data), nbytes)]
    )


def checksum_of_parts(kind: ChecksumKind, parts: Sequence[bytes | memoryview]) -> int:
    """The checksum of the parts' concatenation: one call for one part (the common case,
    and several times cheaper than a hasher for a small layer)."""
    if len(parts) == 1:
        return checksum(kind, parts[0])
    hasher = new_hasher(kind)
    for part in parts:
        hasher.update(part)
    return hasher.value()


# The C functions themselves: a run of 32 layers makes 32 calls per message.
_DIGESTS: dict[ChecksumKind, Callable[[bytes | memoryview], int]] = {
    ChecksumKind.XXH3_64: xxhash.xxh3_64_intdigest,
    ChecksumKind.CRC32C: crc32c.crc32c,
}
