"""The SSD tier: one file per block under a directory, surviving restarts.

The methods that touch the disk are plain blocking functions; the store runs them on
worker threads so SSD I/O never blocks the event loop. Byte accounting and the
degraded state are changed only on the store's thread.

A failing disk degrades the tier instead of failing requests: after a write error
(disk full, read-only directory, EIO) the tier takes no new blocks for
`retry_after_s`, logs why, and counts the error; reads of blocks already there go on.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvstore.enums import TierKind
from kvstore.layout import Namespace
from kvstore.tiers.base import TierCounters
from kvstore.tiers.blockfile import (
    BlockFileHeader,
    CorruptBlockFile,
    decode_header,
    encode_header,
    namespace_to_json,
    verify_payload,
)

logger = logging.getLogger("kvstore.ssd")
SUFFIX = ".kvb"
_HEADER_READ_BYTES = 64 << 10
# Disk-level failures: the tier stops taking blocks for a while. EFBIG is a file size
# limit (RLIMIT_FSIZE, or a filesystem's own), which every later write would hit too.
_DEGRADING_ERRNOS = frozenset(
    (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
)


@dataclass(frozen=True, slots=True)
class SsdLocation:
    path: Path
    nbytes: int


@dataclass(frozen=True, slots=True)
class RecoveredBlock:
    header: BlockFileHeader
    location: SsdLocation


class SsdTier:
    kind = TierKind.SSD
    name = "ssd"

    def __init__(
        self, directory: Path, capacity_bytes: int, *, fsync: bool, retry_after_s: float = 30.0
    ) -> None:
        self.directory = directory
        self.capacity = capacity_bytes
        self.fsync = fsync
        self.retry_after_s = retry_after_s
        self.counters = TierCounters()
        self.used = 0
        self.reserved = 0
        self.degraded_reason: str | None = None
        self._degraded_until = 0.0
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if not os.access(directory, os.W_OK):
                raise PermissionError(errno.EACCES, "directory is not writable", str(directory))
        except OSError as error:
            self.record_error(error, "opening the SSD directory")

    @property
    def capacity_bytes(self) -> int:
        return self.capacity

    @property
    def used_bytes(self) -> int:
        return self.used

    @property
    def degraded(self) -> bool:
        return self.degraded_reason is not None

    def accepts_writes(self) -> bool:
        if self.degraded_reason is not None and time.monotonic() >= self._degraded_until:
            logger.info("SSD tier: retrying writes after: %s", self.degraded_reason)
            self.degraded_reason = None
        return self.degraded_reason is None

    def record_error(self, error: BaseException, doing: str) -> None:
        """Count an error; disk-level ones degrade the tier for a while."""
        self.counters.errors += 1
        code = getattr(error, "errno", None)
        if code in _DEGRADING_ERRNOS:
            reason = f"{doing}: {os.strerror(code)} ({self.directory})"
            if self.degraded_reason is None:
                logger.error("SSD tier degraded, serving from the other tiers: %s", reason)
            self.degraded_reason = reason
            self._degraded_until = time.monotonic() + self.retry_after_s
        else:
            logger.error("SSD tier error while %s: %s", doing, error)

    def location_for(self, namespace: Namespace, key: bytes, nbytes: int) -> SsdLocation:
        digest = hashlib.sha256(repr(namespace_to_json(namespace)).encode()).hexdigest()[:16]
        return SsdLocation(self.directory / digest / f"{key.hex()}{SUFFIX}", nbytes)

    def file_bytes(self, header: BlockFileHeader) -> int:
        return len(encode_header(header)) + header.payload_bytes

    # -- blocking I/O: called on worker threads ---------------------------------------

    def write_block(
        self, location: SsdLocation, header: BlockFileHeader, payload: Sequence[bytes | memoryview]
    ) -> None:
        path = location.path
        path.parent.mkdir(exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            with open(temporary, "wb") as file:
                file.write(encode_header(header))
                for part in payload:
                    file.write(part)
                if self.fsync:
                    file.flush()
                    os.fsync(file.fileno())
            # Only a complete file ever carries the final name.
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def read_block(self, location: SsdLocation) -> tuple[BlockFileHeader, bytes]:
        """The verified header and payload; raises CorruptBlockFile or OSError."""
        data = location.path.read_bytes()
        header, payload_offset = decode_header(data[:_HEADER_READ_BYTES])
        payload = data[payload_offset:]
        verify_payload(header, payload)
        return header, payload

    def remove(self, location: SsdLocation) -> None:
        location.path.unlink(missing_ok=True)

    def discard(self, path: Path, doing: str) -> None:
        """Delete a file the tier will not use; a read-only directory only counts an error."""
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            self.record_error(error, doing)

    def recover(self) -> list[RecoveredBlock]:
        """Every intact block under the directory; torn, corrupt and temporary files are deleted."""
        if not self.directory.is_dir():
            return []
        recovered: list[RecoveredBlock] = []
        for path in sorted(self.directory.glob("*/*")):
            if path.name.endswith(".tmp"):
                self.discard(path, "deleting a torn temporary file")
                continue
            if path.suffix != SUFFIX:
                continue
            try:
                data = path.read_bytes()
                header, offset = decode_header(data[:_HEADER_READ_BYTES])
                verify_payload(header, memoryview(data)[offset:])
            except (CorruptBlockFile, OSError) as error:
                logger.warning("dropping damaged block file %s: %s", path, error)
                self.counters.errors += 1
                self.discard(path, "deleting a damaged block file")
                continue
            recovered.append(RecoveredBlock(header, SsdLocation(path, len(data))))
        return recovered
