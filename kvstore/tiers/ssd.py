"""The SSD tier: one file per block under a directory, surviving restarts.

The methods that touch the disk are plain blocking functions; `read` and `write` run
them on the tier's own I/O threads, so SSD I/O never blocks the event loop. Byte
accounting and the degraded state are changed only on the loop's thread.

Accounting: a write first reserves its file's bytes (`reserve`), then either commits
them to `used_bytes` once the file is in place (`commit`) or gives them back
(`release`). A file found at start-up is `adopt`ed; `free` takes a stored copy away,
file and bytes. So used + reserved never exceeds the capacity, and no byte counts twice.

A failing disk degrades the tier instead of failing requests: after a write error
(disk full, read-only directory, EIO) the tier takes no new blocks for
`retry_after_s`, logs why, and counts the error; reads of blocks already there go on.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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
        self,
        directory: Path,
        capacity_bytes: int,
        *,
        fsync: bool,
        io_threads: int = 2,
        retry_after_s: float = 30.0,
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        self.retry_after_s = retry_after_s
        self.counters = TierCounters()
        self._capacity_bytes = capacity_bytes
        self._used_bytes = 0
        self._reserved_bytes = 0
        # Threads start on first use; `close` joins them.
        self._executor = ThreadPoolExecutor(
            max_workers=io_threads, thread_name_prefix="kvstore-ssd"
        )
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
        return self._capacity_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of the files the tier holds (reservations not included)."""
        return self._used_bytes

    @property
    def reserved_bytes(self) -> int:
        """Bytes set aside for writes in flight."""
        return self._reserved_bytes

    # -- accounting: on the loop's thread -------------------------------------------

    def reserve(self, nbytes: int) -> bool:
        """Set `nbytes` aside for a file about to be written; False if they do not fit."""
        if self._used_bytes + self._reserved_bytes + nbytes > self._capacity_bytes:
            return False
        self._reserved_bytes += nbytes
        return True

    def commit(self, location: SsdLocation) -> None:
        """The reserved file is in place: its bytes now count as used."""
        self._reserved_bytes -= location.nbytes
        self._used_bytes += location.nbytes

    def release(self, location: SsdLocation) -> None:
        """Give back a reservation whose file will not be kept (the write failed, or the
        block left meanwhile: then `discard_file` deletes what was written)."""
        self._reserved_bytes -= location.nbytes

    def adopt(self, location: SsdLocation) -> None:
        """Count a file found in the directory at start-up (never reserved)."""
        self._used_bytes += location.nbytes

    def free(self, handle: object) -> None:
        """Take a stored copy away: its bytes stop counting and its file is deleted."""
        assert isinstance(handle, SsdLocation)
        self._used_bytes -= handle.nbytes
        self.discard_file(handle)

    def discard_file(self, location: SsdLocation) -> None:
        """Delete a block file; off the event loop when one is running."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.remove(location)
            return
        try:
            future = loop.run_in_executor(self._executor, self.remove, location)
        except RuntimeError:  # the I/O threads are shut down: the tier is closing
            self.remove(location)
            return
        future.add_done_callback(lambda done: done.exception())

    # -- I/O on the tier's threads ----------------------------------------------------

    async def write(
        self, location: SsdLocation, header: BlockFileHeader, payload: Sequence[bytes | memoryview]
    ) -> None:
        """`write_block` on an I/O thread."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.write_block, location, header, payload)

    async def read(self, location: SsdLocation) -> tuple[BlockFileHeader, bytes]:
        """`read_block` on an I/O thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.read_block, location)

    def close(self) -> None:
        """Wait for I/O in flight, then stop the I/O threads."""
        self._executor.shutdown(wait=True)

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
