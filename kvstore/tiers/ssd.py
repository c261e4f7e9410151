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

Durability: a file is written under a temporary name and renamed into place; with
`fsync`, the file is fsynced before the rename and its directory after it (and the tier's
directory after a namespace directory is created), so a renamed file survives power loss.
A Delete answers once its blocks' unlinks have run (`settle_removals`; with `fsync`, their
directories fsynced too), so a restart cannot bring a deleted block back; a write waits for
an unlink of its own path still queued, which another I/O thread could run after it.

Compression (`compression="lz4"`): each layer is byte-shuffled and lz4-compressed where
that saves `compress_min_saving` of it (kvstore.layer_codec), on the I/O threads,
before the file's bytes are reserved: a file is accounted at its stored size, so the
tier holds more blocks when they compress.

Restart (kvstore.recovery) reads only each file's header and size (`read_header`); the
payload is verified on every read (`read_block`). While recovery runs next to serving,
`location_for` claims each path it hands out: recovery neither indexes nor deletes a
claimed path, since a live write owns it now.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kvstore.enums import TierKind
from kvstore.layer_codec import COMPRESSIONS, LayerCodec
from kvstore.layout import Namespace
from kvstore.tiers.base import TierCounters
from kvstore.tiers.blockfile import (
    BlockFileHeader,
    CorruptBlockFile,
    decode_header,
    decode_layer_checked,
    encode_header,
    encode_payload,
    header_bytes,
    namespace_to_json,
    stored_layer_bytes,
)

logger = logging.getLogger("kvstore.ssd")
SUFFIX = ".kvb"
TEMPORARY_SUFFIX = ".tmp"
# A header with a few dozen layer checksums fits in one page: one read per file at restart.
_HEADER_PROBE_BYTES = 4 << 10
_DIRECTORY_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
# Disk-level failures: the tier stops taking blocks for a while. EFBIG is a file size
# limit (RLIMIT_FSIZE, or a filesystem's own), which every later write would hit too.
_DEGRADING_ERRNOS = frozenset(
    (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
)


# Called on the I/O thread with a read's header and its verified layer 0.
FirstLayerCallback = Callable[[BlockFileHeader, memoryview], None]


@dataclass(frozen=True, slots=True)
class SsdLocation:
    path: Path
    nbytes: int


@dataclass(frozen=True, slots=True)
class RecoveredBlock:
    header: BlockFileHeader
    location: SsdLocation


@dataclass(slots=True)
class BlockFileListing:
    """What a restart finds under the tier's directory, by name only."""

    block_files: list[tuple[Path, list[str]]] = field(default_factory=list)  # (dir, names)
    temporary_files: list[Path] = field(default_factory=list)

    @property
    def num_block_files(self) -> int:
        return sum(len(names) for _, names in self.block_files)


class Syscalls(Protocol):
    """The calls whose order makes a write durable; the `os` module is the real one.

    A seam for tests, which count and order them without strace.
    """

    def open(self, path: Path, flags: int, /) -> int: ...

    def fsync(self, fd: int, /) -> None: ...

    def close(self, fd: int, /) -> None: ...

    def replace(self, source: Path, target: Path, /) -> None: ...


class SsdTier:
    kind = TierKind.SSD

    def __init__(
        self,
        directory: Path,
        capacity_bytes: int,
        *,
        fsync: bool,
        io_threads: int = 2,
        retry_after_s: float = 30.0,
        syscalls: Syscalls = os,
        compression: str = "off",
        compress_min_saving: float = 0.1,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        self.directory = directory
        self.compression = compression
        self.compress_min_saving = compress_min_saving
        self._codecs: dict[int, LayerCodec] = {}  # by element size
        self.fsync = fsync
        self.retry_after_s = retry_after_s
        self.name = "ssd"
        self._syscalls = syscalls
        # Paths handed out while recovery runs; None when it does not.
        self._claimed: set[Path] | None = None
        self.counters = TierCounters()
        self._capacity_bytes = capacity_bytes
        # Namespace directories whose entry in `directory` is known fsynced (I/O threads
        # add to it; set membership is read without the lock, adds take it).
        self._durable_directories: set[Path] = set()
        self._lock = threading.Lock()
        self._used_bytes = 0
        self._reserved_bytes = 0
        # Unlinks queued on the I/O threads, by path (loop thread only). A write of the
        # same path waits for its unlink, which another I/O thread could otherwise run
        # after the write's rename; `settle_removals` waits for them all.
        self._removals: dict[Path, asyncio.Future[None]] = {}
        # Directories with unlinks not yet fsynced (I/O threads add, under the lock).
        self._unsynced_removal_directories: set[Path] = set()
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
        path = location.path
        self._removals[path] = future

        def forget(done: asyncio.Future[None]) -> None:
            done.exception()
            if self._removals.get(path) is done:
                del self._removals[path]

        future.add_done_callback(forget)

    async def settle_removals(self) -> None:
        """Wait until every unlink queued so far has run, then (with `fsync`) fsync their
        directories: a block deleted before this returns stays deleted after a crash."""
        pending = list(self._removals.values())
        if pending:
            await asyncio.wait(pending)
        if self.fsync and self._unsynced_removal_directories:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._fsync_removal_directories)

    def _fsync_removal_directories(self) -> None:
        with self._lock:
            directories = list(self._unsynced_removal_directories)
            self._unsynced_removal_directories.clear()
        for index, directory in enumerate(directories):
            try:
                self._fsync_directory(directory)
            except BaseException:
                with self._lock:  # not durable yet: the next settle tries again
                    self._unsynced_removal_directories.update(directories[index:])
                raise

    # -- I/O on the tier's threads ----------------------------------------------------

    async def write(
        self, location: SsdLocation, header: BlockFileHeader, payload: Sequence[bytes | memoryview]
    ) -> None:
        """`write_block` on an I/O thread: once it returns, the file is renamed into place,
        and with `fsync` the file and its directory are fsynced (it survives power loss)."""
        removal = self._removals.get(location.path)
        if removal is not None:
            await asyncio.wait([removal])
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.write_block, location, header, payload)

    async def encode(
        self, header: BlockFileHeader, payload: Sequence[bytes | memoryview]
    ) -> tuple[BlockFileHeader, list[bytes | memoryview]]:
        """The header and stored parts of the block's file (`encode_block`); on an I/O
        thread when compression is on. The payload's views must stay valid until then."""
        if self.compression == "off":
            return header, list(payload)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.encode_block, header, payload)

    def encode_block(
        self, header: BlockFileHeader, payload: Sequence[bytes | memoryview]
    ) -> tuple[BlockFileHeader, list[bytes | memoryview]]:
        if self.compression == "off":
            return header, list(payload)
        element_bytes = header.namespace.layout.dtype.itemsize
        codec = self._codecs.get(element_bytes)
        if codec is None:
            codec = LayerCodec(element_bytes, self.compress_min_saving)
            self._codecs[element_bytes] = codec
        return encode_payload(header, payload, codec)

    async def read(
        self,
        location: SsdLocation,
        on_first_layer: FirstLayerCallback | None = None,
        layer_bytes_hint: int = 0,
        namespace: Namespace | None = None,
    ) -> tuple[BlockFileHeader, bytearray]:
        """`read_block` on an I/O thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor,
            self.read_block,
            location,
            on_first_layer,
            layer_bytes_hint,
            namespace,
        )

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

    def retry_writes_now(self) -> None:
        """End a degraded spell early: the next write is tried (a shutdown's flush)."""
        self._degraded_until = 0.0

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
        """Where the block's file goes; while recovery runs, the path is claimed."""
        path = self.path_for(namespace, key)
        if self._claimed is not None:
            self._claimed.add(path)
        return SsdLocation(path, nbytes)

    def path_for(self, namespace: Namespace, key: bytes) -> Path:
        return self.directory / _namespace_directory(namespace) / f"{key.hex()}{SUFFIX}"

    # -- recovery: on the loop's thread ------------------------------------------------

    @property
    def recovering(self) -> bool:
        return self._claimed is not None

    def begin_recovery(self) -> None:
        """From now until `end_recovery`, paths handed out are claimed; Stats says so."""
        self._claimed = set()
        self.name = "ssd (recovering)"

    def end_recovery(self) -> None:
        self._claimed = None
        self.name = "ssd"

    def is_claimed(self, path: Path) -> bool:
        """A write may own the path now: recovery must leave its file alone."""
        return self._claimed is not None and path in self._claimed

    def file_bytes(self, header: BlockFileHeader) -> int:
        return len(encode_header(header)) + header.payload_bytes

    # -- blocking I/O: called on worker threads ---------------------------------------

    def write_block(
        self, location: SsdLocation, header: BlockFileHeader, payload: Sequence[bytes | memoryview]
    ) -> None:
        """Write the file under a temporary name, then rename it into place; with `fsync`,
        fsync the file before the rename and the directory after it."""
        path = location.path
        directory = path.parent
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
        if self.fsync and directory not in self._durable_directories:
            # The namespace directory's own entry must survive power loss too: fsync its
            # parent until that has once succeeded, whichever write made the directory
            # (a write that found it made by another, still in flight, must not skip it).
            self._fsync_directory(self.directory)
            with self._lock:
                self._durable_directories.add(directory)
        temporary = path.with_name(f".{path.name}{TEMPORARY_SUFFIX}")
        try:
            with open(temporary, "wb") as file:
                file.write(encode_header(header))
                for part in payload:
                    file.write(part)
                if self.fsync:
                    file.flush()
                    self._syscalls.fsync(file.fileno())
            # Only a complete file ever carries the final name.
            self._syscalls.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        if self.fsync:
            # The rename lives in the directory: until it is fsynced, power loss can undo it.
            try:
                self._fsync_directory(directory)
            except BaseException:
                path.unlink(missing_ok=True)  # not durable: the write failed, leave no file
                raise

    def _fsync_directory(self, directory: Path) -> None:
        fd = self._syscalls.open(directory, _DIRECTORY_FLAGS)
        try:
            self._syscalls.fsync(fd)
        finally:
            self._syscalls.close(fd)

    def read_block(
        self,
        location: SsdLocation,
        on_first_layer: FirstLayerCallback | None = None,
        layer_bytes_hint: int = 0,
        namespace: Namespace | None = None,
    ) -> tuple[BlockFileHeader, bytearray]:
        """The verified header and the block's bytes (decoded); raises CorruptBlockFile
        or OSError. With `namespace`, a file of another namespace is CorruptBlockFile
        before anything is allocated for it: its layout says how much that would be.

        Layer 0 comes first: the header and layer 0 are read (one read when the header
        fits `_HEADER_PROBE_BYTES` and layer 0 `layer_bytes_hint`), checked against the
        file's size, verified, and handed to `on_first_layer` (on this thread; it may
        raise to stop the read) as a view of the returned buffer; then the rest of the
        file is read and verified. A raw file's layers are read straight into the buffer.
        """
        fd = _open_block_file(location.path)
        try:
            file_bytes = os.fstat(fd).st_size
            head = os.pread(fd, _HEADER_PROBE_BYTES + layer_bytes_hint, 0)
            needed = header_bytes(head)
            if needed > len(head) and file_bytes >= needed:
                head = os.pread(fd, needed, 0)
            header, payload_offset = decode_header(head)
            if namespace is not None and header.namespace != namespace:
                raise CorruptBlockFile(f"{location.path} holds a block of another namespace")
            expected = payload_offset + header.payload_bytes
            if file_bytes != expected:
                raise CorruptBlockFile(
                    f"file is {file_bytes} B, a whole block file is {expected} B"
                )
            layout = header.namespace.layout
            layer_bytes = layout.layer_bytes
            out = bytearray(layout.block_bytes)
            target = memoryview(out)
            first_end = payload_offset + stored_layer_bytes(header, 0)
            first = memoryview(head)[payload_offset:first_end]
            if len(first) < first_end - payload_offset:
                first = memoryview(os.pread(fd, first_end - payload_offset, payload_offset))
            decode_layer_checked(header, 0, first, target[:layer_bytes])
            if on_first_layer is not None:
                on_first_layer(header, target[:layer_bytes])
            rest = target[layer_bytes:] if not header.compressed else None
            stored = _pread_exactly(
                fd, rest if rest is not None else bytearray(expected - first_end), first_end
            )
            start = 0
            for layer in range(1, layout.num_layers):
                end = start + stored_layer_bytes(header, layer)
                decode_layer_checked(
                    header,
                    layer,
                    None if rest is not None else stored[start:end],
                    target[layer * layer_bytes : (layer + 1) * layer_bytes],
                )
                start = end
            return header, out
        finally:
            os.close(fd)

    def remove(self, location: SsdLocation) -> None:
        location.path.unlink(missing_ok=True)
        if self.fsync:
            with self._lock:
                self._unsynced_removal_directories.add(location.path.parent)

    def discard(self, path: Path, doing: str) -> None:
        """Delete a file the tier will not use; a read-only directory only counts an error."""
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            self.record_error(error, doing)

    def list_files(self) -> BlockFileListing:
        """The block and temporary files under the directory, by name; reads no file."""
        listing = BlockFileListing()
        try:
            directories = [entry for entry in os.scandir(self.directory) if entry.is_dir()]
        except FileNotFoundError:
            return listing
        for entry in directories:
            directory = Path(entry.path)
            names = []
            for name in os.listdir(directory):
                if name.endswith(TEMPORARY_SUFFIX):
                    listing.temporary_files.append(directory / name)
                elif name.endswith(SUFFIX):
                    names.append(name)
            listing.block_files.append((directory, names))
        return listing

    def read_header(self, directory: Path, name: str) -> RecoveredBlock:
        """A block file's header, checked against the file's size and name; the payload
        is not read. Raises CorruptBlockFile (torn, damaged or misplaced) or OSError."""
        path = directory / name
        fd = _open_block_file(path)
        try:
            file_bytes = os.fstat(fd).st_size
            head = os.pread(fd, _HEADER_PROBE_BYTES, 0)
            needed = header_bytes(head)
            if needed > len(head) and file_bytes >= needed:
                head = os.pread(fd, needed, 0)
        finally:
            os.close(fd)
        header, payload_offset = decode_header(head)
        expected = payload_offset + header.payload_bytes
        if file_bytes != expected:
            raise CorruptBlockFile(f"file is {file_bytes} B, a whole block file is {expected} B")
        if name != f"{header.key.hex()}{SUFFIX}" or directory.name != _namespace_directory(
            header.namespace
        ):
            raise CorruptBlockFile("the file's name or directory does not match its header")
        return RecoveredBlock(header, SsdLocation(path, file_bytes))


def _pread_exactly(fd: int, into: bytearray | memoryview, offset: int) -> memoryview:
    """Fill `into` from `offset` of the file; a shorter file is a torn one."""
    view = memoryview(into)
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise CorruptBlockFile(f"the file ended {len(view) - done} B early")
        done += count
    return view


@functools.lru_cache(maxsize=4096)
def _namespace_directory(namespace: Namespace) -> str:
    return hashlib.sha256(repr(namespace_to_json(namespace)).encode()).hexdigest()[:16]


def _open_block_file(path: Path) -> int:
    """A descriptor of the regular file at `path`, read-only; CorruptBlockFile for
    anything else. Neither a FIFO (whose open would block the I/O thread for ever) nor a
    symbolic link (to a file elsewhere) is a block file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CorruptBlockFile("a symbolic link, not a block file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptBlockFile("not a regular file")
    return fd
