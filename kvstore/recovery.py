"""Rebuilding the block index from the SSD tier's directory at start-up.

Restart reads each block file's header and size, never its payload: one small read per
file, on a few threads, so it costs per file, not per byte. A torn file (shorter than
its header says, or a header that fails its checksum) is deleted, and so are the
leftovers of writes a crash cut short. A payload damaged on disk is caught when the
block is read: `SsdTier.read_block` verifies every layer and `BlockPool.read_from_ssd`
the block's identity, and the pool drops the block with its descendants
(`drop_unreadable`), so a client gets a shorter prefix or a miss, never wrong bytes.

A block comes back only if its parent did, so a lookup never finds a child whose parent
is gone; block files whose parent never came back are deleted at the end, and so are
files beyond the tier's capacity (a restart with a smaller `ssd_bytes`), chain tails
first, as eviction would have. A file names
the parent its index entry had (`BlockPool._write_claimed`), so a block put with
`parent_remote` whose parent was on another node is a root in its file too, not an orphan;
the file's `chain_root` tells it from a chain's true first block (a file written before
that mark reads as not a chain root).

`recover_while_serving` gives the rebuild a short budget before the daemon serves, and
lets a larger directory go on being indexed in the background. Until it is done, Stats
names the SSD tier "ssd (recovering)", a lookup of a block not yet indexed is an honest
miss, and the rebuild leaves alone every path a write has claimed meanwhile
(`SsdTier.location_for`): that write owns the file now.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvstore.enums import TierKind
from kvstore.index import BlockEntry
from kvstore.layout import Namespace
from kvstore.pool import BlockPool
from kvstore.tiers.blockfile import CorruptBlockFile
from kvstore.tiers.ssd import TEMPORARY_SUFFIX, BlockFileListing, RecoveredBlock, SsdTier

logger = logging.getLogger("kvstore.recovery")

# How long start-up waits for the rebuild before it serves; the rest goes on meanwhile.
SERVE_AFTER_S = 0.5
# Header reads run on their own threads (the syscalls release the GIL), a batch at a
# time each; one batch's index work is what the event loop does between two yields.
_NUM_THREADS = 4
_BATCH_FILES = 256


@dataclass(frozen=True, slots=True)
class DamagedFile:
    path: Path
    reason: str


HeaderResult = RecoveredBlock | DamagedFile


def recover_index(pool: BlockPool) -> int:
    """Rebuild the whole index before returning; returns the number of blocks restored."""
    ssd = pool.ssd
    if ssd is None:
        return 0
    rebuild = IndexRebuild(pool, ssd)
    listing = ssd.list_files()
    rebuild.discard_temporary(listing.temporary_files)
    with ThreadPoolExecutor(_NUM_THREADS, thread_name_prefix="kvstore-recovery") as executor:
        batches = _batches(listing)
        for results in executor.map(lambda batch: read_headers(ssd, *batch), batches):
            rebuild.apply(results)
    return rebuild.finish()


async def recover_while_serving(
    pool: BlockPool, serve_after_s: float | None = None
) -> asyncio.Task[int] | None:
    """Start the rebuild and wait for it up to `serve_after_s` (SERVE_AFTER_S by
    default); past that it runs on in the returned task (cancel it to stop early) while
    the caller serves."""
    if pool.ssd is None:
        return None
    if serve_after_s is None:
        serve_after_s = SERVE_AFTER_S
    task = asyncio.create_task(_recover_in_background(pool, pool.ssd), name="kvstore-recovery")
    done, _ = await asyncio.wait({task}, timeout=serve_after_s)
    if done:
        task.result()  # a failed rebuild fails the start, as it always did
    else:
        logger.warning(
            "SSD index still rebuilding after %.1fs: serving now; until it is done, blocks "
            "not yet indexed are misses and Stats names the tier 'ssd (recovering)'",
            serve_after_s,
        )
        task.add_done_callback(_log_failure)
    return task


async def _recover_in_background(pool: BlockPool, ssd: SsdTier) -> int:
    loop = asyncio.get_running_loop()
    ssd.begin_recovery()
    executor = ThreadPoolExecutor(_NUM_THREADS, thread_name_prefix="kvstore-recovery")
    try:
        rebuild = IndexRebuild(pool, ssd)
        listing = await loop.run_in_executor(executor, ssd.list_files)
        logger.info("indexing %d block files under %s", listing.num_block_files, ssd.directory)
        rebuild.discard_temporary(listing.temporary_files)
        # Keep every thread busy while the loop indexes the batch read before.
        in_flight: deque[asyncio.Future[list[HeaderResult]]] = deque()
        for batch in _batches(listing):
            in_flight.append(loop.run_in_executor(executor, read_headers, ssd, *batch))
            if len(in_flight) > _NUM_THREADS:
                rebuild.apply(await in_flight.popleft())
                await asyncio.sleep(0)  # a finished future does not yield: let requests in
        while in_flight:
            rebuild.apply(await in_flight.popleft())
            await asyncio.sleep(0)
        return rebuild.finish()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        ssd.end_recovery()


def _log_failure(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.error(
            "rebuilding the SSD index failed; blocks not yet indexed stay unused: %r", error
        )


def _batches(listing: BlockFileListing) -> Iterator[tuple[Path, list[str]]]:
    for directory, names in listing.block_files:
        for start in range(0, len(names), _BATCH_FILES):
            yield directory, names[start : start + _BATCH_FILES]


def read_headers(ssd: SsdTier, directory: Path, names: list[str]) -> list[HeaderResult]:
    """Each file's checked header, or why it is damaged; on a worker thread."""
    results: list[HeaderResult] = []
    for name in names:
        try:
            results.append(ssd.read_header(directory, name))
        except FileNotFoundError:
            continue  # deleted since the listing: nothing to index or drop
        except (CorruptBlockFile, OSError) as error:
            results.append(DamagedFile(directory / name, str(error)))
    return results


class IndexRebuild:
    """One restart's rebuild: it takes header results and indexes them, on the loop's thread.

    A block whose parent is not indexed yet waits for it; `finish` deletes the files of
    blocks still waiting. A block whose key is already indexed (a put of it came first)
    is left alone, and its waiting children hang under the indexed block.
    """

    def __init__(self, pool: BlockPool, ssd: SsdTier) -> None:
        self._pool = pool
        self._ssd = ssd
        self._waiting: defaultdict[tuple[Namespace, bytes], list[RecoveredBlock]]
        self._waiting = defaultdict(list)
        self._started = time.monotonic()
        self.num_restored = 0
        self.num_damaged = 0
        self.num_left_alone = 0

    def discard_temporary(self, paths: list[Path]) -> None:
        """Delete what writes cut short by a crash left, unless a write owns the name now."""
        for path in paths:
            final = path.with_name(path.name[1 : -len(TEMPORARY_SUFFIX)])
            if not self._ssd.is_claimed(final):
                self._ssd.discard(path, "deleting a torn temporary file")

    def apply(self, results: list[HeaderResult]) -> None:
        for result in results:
            if isinstance(result, DamagedFile):
                self._drop_damaged(result)
                continue
            header = result.header
            parent = None
            if header.parent_key:
                parent = self._indexed(header.namespace, header.parent_key)
                if parent is None:
                    self._waiting[(header.namespace, header.parent_key)].append(result)
                    continue
            self._restore_chain(result, parent)

    def finish(self) -> int:
        """Index the blocks a put gave a parent meanwhile, delete the orphans; returns the
        number of blocks restored."""
        for group in list(self._waiting):
            parent = self._indexed(*group)
            if parent is not None and group in self._waiting:
                for block in self._waiting.pop(group):
                    self._restore_chain(block, parent)
        orphans = [block for blocks in self._waiting.values() for block in blocks]
        self._waiting.clear()
        for block in orphans:
            if not self._ssd.is_claimed(block.location.path):
                self._ssd.discard(block.location.path, "deleting an orphaned block file")
        if orphans:
            logger.warning(
                "dropped %d block files whose parent block did not survive (a crash loses "
                "blocks that were only in DRAM, and files not yet written)",
                len(orphans),
            )
        if self._ssd.used_bytes > self._ssd.capacity_bytes:
            over = self._ssd.used_bytes - self._ssd.capacity_bytes
            dropped = self._pool.trim_ssd()
            logger.warning(
                "the SSD directory held %d B more than ssd_bytes (%d B): dropped %d B of the "
                "coldest block files",
                over,
                self._ssd.capacity_bytes,
                dropped,
            )
        if self._pool.num_namespaces > self._pool.max_namespaces:
            # Recovery brings back every namespace it finds (they are the daemon's own
            # blocks); the limit holds again for puts that would open another.
            logger.warning(
                "the SSD directory holds blocks of %d namespaces, more than "
                "store.max_namespaces (%d): all are served, and a put to a new namespace "
                "is refused until %d of them have no block left",
                self._pool.num_namespaces,
                self._pool.max_namespaces,
                self._pool.num_namespaces - self._pool.max_namespaces + 1,
            )
        logger.info(
            "recovered %d blocks (%d B) from %s in %.2fs; %d damaged files dropped, "
            "%d left to writes made meanwhile",
            self.num_restored,
            self._ssd.used_bytes,
            self._ssd.directory,
            time.monotonic() - self._started,
            self.num_damaged,
            self.num_left_alone,
        )
        return self.num_restored

    def _indexed(self, namespace: Namespace, key: bytes) -> BlockEntry | None:
        state = self._pool.find_namespace(namespace)
        return state.blocks.get(key) if state is not None else None

    def _restore_chain(self, block: RecoveredBlock, parent: BlockEntry | None) -> None:
        """Index the block, then every block that waited for it, and so on down."""
        stack: list[tuple[RecoveredBlock, BlockEntry | None]] = [(block, parent)]
        while stack:
            block, parent = stack.pop()
            entry = self._restore(block, parent)
            if entry is not None:
                header = block.header
                children = self._waiting.pop((header.namespace, header.key), [])
                stack.extend((child, entry) for child in children)

    def _restore(self, block: RecoveredBlock, parent: BlockEntry | None) -> BlockEntry | None:
        """The block's index entry: restored now, or the one a put indexed meanwhile;
        None when a write claimed the file's path."""
        header = block.header
        existing = self._indexed(header.namespace, header.key)
        if existing is not None:
            self.num_left_alone += 1
            path = block.location.path
            if TierKind.SSD not in existing.copies and not self._ssd.is_claimed(path):
                # A put stored the block again before the rebuild reached its file, and
                # has not written it: the file is its SSD copy if it holds the same bytes.
                if _same_block(existing, block):
                    self._pool.adopt_ssd_copy(existing, block.location)
                else:
                    self._ssd.discard(path, "deleting a block file a put replaced")
            return existing
        if self._ssd.is_claimed(block.location.path):
            self.num_left_alone += 1
            return None
        entry = BlockEntry(
            namespace=self._pool.namespace_state(header.namespace),
            key=header.key,
            parent=parent,
            layer_checksums=list(header.layer_checksums),
            checksum_kind_value=header.checksum_kind.value,
            chain_root=header.chain_root,
            copies={TierKind.SSD: block.location},
        )
        self._pool.restore(entry)
        self.num_restored += 1
        return entry

    def _drop_damaged(self, damaged: DamagedFile) -> None:
        logger.warning("dropping damaged block file %s: %s", damaged.path, damaged.reason)
        self._ssd.counters.errors += 1
        self.num_damaged += 1
        if not self._ssd.is_claimed(damaged.path):
            self._ssd.discard(damaged.path, "deleting a damaged block file")


def _same_block(entry: BlockEntry, block: RecoveredBlock) -> bool:
    header = block.header
    parent_key = entry.parent.key if entry.parent is not None else b""
    return (
        header.parent_key == parent_key
        and header.checksum_kind.value == entry.checksum_kind_value
        and list(header.layer_checksums) == entry.layer_checksums
    )
