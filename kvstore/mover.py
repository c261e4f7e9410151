"""TierMover: moves blocks between tiers and owns every SSD read and write.

- Write-through: an admitted block is written to SSD as soon as it is committed.
- Write-back: when DRAM passes its high watermark, a background pass makes room down
  to the low watermark: blocks that already have an SSD copy just drop their DRAM
  copy, admitted ones are written to SSD first (a demotion), the rest are evicted.
- Promotion: a get of an SSD-only block reads it back into DRAM; blocks seen often
  enough are copied into HBM.
- Recovery: on start, the index is rebuilt from the SSD directory.

SSD I/O runs on a small thread pool so it never blocks the event loop; all index and
accounting changes happen back on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvstore.checksum import ChecksumKind
from kvstore.enums import TierKind
from kvstore.errors import CapacityExhausted
from kvstore.index import BlockEntry
from kvstore.recovery import recover_index
from kvstore.store import BlockStore, DeleteResult
from kvstore.tiers.blockfile import BlockFileHeader, CorruptBlockFile
from kvstore.tiers.ssd import SsdLocation, SsdTier

logger = logging.getLogger("kvstore.mover")
_MAINTENANCE_PERIOD_S = 0.05
_QUIET_AFTER_IDLE_PASS_S = 1.0


class TierMover:
    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self.config = store.config
        store.listener = self
        self._executor = ThreadPoolExecutor(
            max_workers=self.config.ssd_io_threads, thread_name_prefix="kvstore-ssd"
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._flushing: set[BlockEntry] = set()
        # Blocks whose DRAM copy goes once their SSD write ends.
        self._demoting: set[BlockEntry] = set()
        self._wake: asyncio.Event | None = None
        self._quiet_until = 0.0
        self._maintenance: asyncio.Task[None] | None = None

    # -- life cycle -------------------------------------------------------------------

    def recover(self) -> int:
        """Rebuild the index from the SSD directory; returns the number of blocks restored."""
        return recover_index(self.store)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._maintenance = asyncio.create_task(self._maintain(), name="kvstore-maintenance")

    async def flush_all(self) -> int:
        """Write every admitted DRAM-only block to SSD (a graceful shutdown does this)."""
        if self.store.ssd is None:
            return 0
        pending = [
            entry
            for entry in self.store.index.entries()
            if TierKind.SSD not in entry.copies and self._admitted(entry)
        ]
        # Parents first, so the files on disk always form whole chains.
        pending.sort(key=lambda entry: entry.depth)
        for entry in pending:
            await self.flush(entry, demote=False)
        return len(pending)

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)

    # -- StoreListener ----------------------------------------------------------------

    def committed(self, entry: BlockEntry) -> None:
        if self.config.write_policy == "write-through" and self._admitted(entry):
            self._spawn(self.flush(entry, demote=False))
        self._nudge()

    def on_committed(self, entries: list[BlockEntry]) -> None:
        """Act on newly committed blocks as the write policy says (write-through: write
        each admitted one to SSD), and wake the watermark pass if memory runs high."""
        for entry in entries:
            self.committed(entry)

    def ssd_copy_dropped(self, location: SsdLocation) -> None:
        assert self.store.ssd is not None
        ssd = self.store.ssd
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            ssd.remove(location)
            return
        future = loop.run_in_executor(self._executor, ssd.remove, location)
        future.add_done_callback(lambda done: done.exception())

    # -- reads ------------------------------------------------------------------------

    async def load(self, entries: list[BlockEntry]) -> tuple[int, dict[BlockEntry, bytes]]:
        """Bring SSD-only blocks of a pinned chain into memory.

        Returns how many leading entries can be served and, for blocks that could not
        be promoted, their verified payloads. A block whose file fails its checksum or
        cannot be read ends the served prefix and is dropped with its descendants.
        """
        ssd = self.store.ssd
        payloads: dict[BlockEntry, bytes] = {}
        served = len(entries)
        needs = [entry for entry in entries if not _in_memory(entry)]
        if needs and ssd is not None:
            results = await asyncio.gather(
                *(self._read_ssd(ssd, entry) for entry in needs), return_exceptions=True
            )
            lost: list[tuple[BlockEntry, BaseException]] = []
            for entry, result in zip(needs, results, strict=True):
                if isinstance(result, BaseException):
                    served = min(served, entries.index(entry))
                    lost.append((entry, result))
                    continue
                ssd.counters.bytes_read += len(result)
                if not self._promote_to_dram(entry, result):
                    payloads[entry] = result
            for entry, error in lost:
                self._lost(entry, error, entries[served:])
        for entry in entries[:served]:
            self._maybe_promote_to_hbm(entry)
            if self.config.write_policy == "write-through" and self._admitted(entry):
                self._spawn(self.flush(entry, demote=False))
        return served, payloads

    async def _read_ssd(self, ssd: SsdTier, entry: BlockEntry) -> bytes:
        location = entry.copies.get(TierKind.SSD)
        if not isinstance(location, SsdLocation):
            raise CorruptBlockFile("no SSD copy")
        loop = asyncio.get_running_loop()
        header, payload = await loop.run_in_executor(self._executor, ssd.read_block, location)
        if header.key != entry.key or list(header.layer_checksums) != entry.layer_checksums:
            raise CorruptBlockFile(f"{location.path} holds a different block")
        return payload

    def _lost(self, entry: BlockEntry, error: BaseException, unserved: list[BlockEntry]) -> None:
        store = self.store
        assert store.ssd is not None
        store.ssd.record_error(error, "reading a block")
        logger.error("SSD copy of block %s is unusable (%s); dropping it", entry.key.hex(), error)
        if TierKind.SSD not in entry.copies:
            return
        if len(entry.copies) > 1:
            store.drop_copy(entry, TierKind.SSD)
            return
        # The only copy is unusable: the block goes, and every block chained below it.
        # Reads of it, this one included, cannot use it, so their pins do not hold it;
        # nor do this read's pins on the blocks it will no longer serve.
        for other in unserved:
            other.read_pins -= 1
        pins, entry.read_pins = entry.read_pins, 0
        try:
            store.delete_subtree(entry.namespace, entry, time.monotonic(), DeleteResult())
        finally:
            entry.read_pins = pins
            for other in unserved:
                other.read_pins += 1

    def _promote_to_dram(self, entry: BlockEntry, payload: bytes) -> bool:
        if not self.config.promote_on_hit or not entry.is_indexed():
            return False
        try:
            handle = self.store.allocate(TierKind.DRAM, len(payload))
        except CapacityExhausted:
            return False
        self.store.dram.write(handle, 0, payload)
        entry.add_copy(TierKind.DRAM, handle)
        self.store.dram.counters.promotions += 1
        self.store.refresh(entry)
        return True

    def _maybe_promote_to_hbm(self, entry: BlockEntry) -> None:
        store = self.store
        if (
            store.hbm is None
            or TierKind.HBM in entry.copies
            or TierKind.DRAM not in entry.copies
            or entry.num_seen < self.config.hbm_promote_after_seen
        ):
            return
        nbytes = entry.namespace.namespace.layout.block_bytes
        try:
            handle = store.allocate(TierKind.HBM, nbytes)
        except CapacityExhausted:
            return
        for offset, view in _offsets(store.dram.read(entry.copies[TierKind.DRAM], 0, nbytes)):
            store.hbm.write(handle, offset, view)
        entry.add_copy(TierKind.HBM, handle)
        store.hbm.counters.promotions += 1
        store.refresh(entry)

    # -- writes to SSD ----------------------------------------------------------------

    async def flush(self, entry: BlockEntry, *, demote: bool) -> None:
        """Write an in-memory block to SSD; with `demote`, then free its DRAM copy."""
        store, ssd = self.store, self.store.ssd
        source = TierKind.DRAM if TierKind.DRAM in entry.copies else TierKind.HBM
        if (
            ssd is None
            or TierKind.SSD in entry.copies
            or entry in self._flushing
            or not entry.is_indexed()
            or source not in entry.copies
            or not ssd.accepts_writes()
        ):
            # A victim popped off a queue must go back on it, or it could never leave.
            store.refresh(entry)
            return
        layout = entry.namespace.namespace.layout
        header = BlockFileHeader(
            namespace=entry.namespace.namespace,
            key=entry.key,
            parent_key=entry.parent.key if entry.parent is not None else b"",
            checksum_kind=ChecksumKind(entry.checksum_kind_value),
            layer_checksums=tuple(entry.layer_checksums),
        )
        location = ssd.location_for(header.namespace, entry.key, ssd.file_bytes(header))
        if not self._reserve_ssd(ssd, location.nbytes):
            store.refresh(entry)
            return
        self._flushing.add(entry)
        if demote:
            self._demoting.add(entry)
        store.acquire_read([entry])
        try:
            payload = store.memory_tier(source).read(entry.copies[source], 0, layout.block_bytes)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, ssd.write_block, location, header, payload)
        except OSError as error:
            ssd.record_error(error, "writing a block")
            return
        finally:
            ssd.reserved -= location.nbytes
            self._flushing.discard(entry)
            self._demoting.discard(entry)
            store.release_read([entry])
        ssd.counters.bytes_written += layout.block_bytes
        if not entry.is_indexed():
            self.ssd_copy_dropped(location)
            return
        entry.add_copy(TierKind.SSD, location)
        ssd.used += location.nbytes
        store.refresh(entry)
        if demote and TierKind.DRAM in entry.copies and not entry.is_pinned(time.monotonic()):
            store.drop_copy(entry, TierKind.DRAM, demoted=True)

    def _reserve_ssd(self, ssd: SsdTier, nbytes: int) -> bool:
        """Make room on SSD by dropping its coldest copies; False if that cannot be done."""
        if nbytes > ssd.capacity_bytes:
            return False
        queue = self.store.victim_queue(TierKind.SSD)
        while ssd.used + ssd.reserved + nbytes > ssd.capacity_bytes:
            victim = queue.pop()
            if victim is None:
                return False
            if self.store.evictable_from(victim, TierKind.SSD, time.monotonic()):
                self.store.drop_copy(victim, TierKind.SSD)
            else:
                self.store.refresh(victim)
        ssd.reserved += nbytes
        return True

    async def ensure_room(self, kind: TierKind, nbytes: int) -> None:
        """Wait until an allocation of `nbytes` in a memory tier will succeed.

        Dropping redundant copies and chain tails is immediate; when only demotions
        (SSD writes) can make room, this starts them and waits for them, so a put under
        pressure slows down instead of failing. Raises CapacityExhausted when nothing
        can make room.
        """
        store = self.store
        tier = store.memory_tier(kind)
        for _ in range(64):
            handle = tier.allocate(nbytes)
            if handle is None and self._writes_back(kind):
                # Write-back: blocks leave DRAM for SSD in the policy's order instead of
                # being dropped; only what cannot move down (or a full SSD) is left to
                # `allocate` below.
                used_bytes = tier.used_bytes
                demotions = self._move_down_for(kind, nbytes)
                if demotions:
                    await asyncio.wait(demotions)
                if tier.used_bytes < used_bytes:
                    continue
            try:
                handle = handle if handle is not None else store.allocate(kind, nbytes)
            except CapacityExhausted:
                demotions = self._start_demotions(kind, nbytes)
                if not demotions:
                    # Blocks being written to SSD are pinned until their write ends;
                    # then they leave DRAM (a demotion) or may be dropped.
                    writes = list(self._tasks) if self._flushing else []
                    if not writes:
                        raise
                    await asyncio.wait(writes, return_when=asyncio.FIRST_COMPLETED)
                    continue
                await asyncio.wait(demotions)
                continue
            # Nothing runs between this return and the caller's allocation.
            tier.free(handle)
            return
        raise CapacityExhausted(f"{kind.name} tier: demotions did not free {nbytes} B in time")

    def _writes_back(self, kind: TierKind) -> bool:
        ssd = self.store.ssd
        return (
            kind is TierKind.DRAM
            and ssd is not None
            and self.config.write_policy == "write-back"
            and ssd.accepts_writes()
        )

    def _move_down_for(self, kind: TierKind, nbytes: int) -> list[asyncio.Task[None]]:
        """Move victims down until `nbytes` are free or a batch of demotions is under way.

        Redundant copies go at once; returns the demotions (SSD writes) to wait for.
        """
        self.store.release_expired_leases()
        tier = self.store.memory_tier(kind)
        return self._take_victims(
            kind,
            nbytes,
            lambda victim, tasks: self._move_down(victim, kind, tasks),
            room_made=lambda: tier.capacity_bytes - tier.used_bytes >= nbytes,
        )

    def _start_demotions(self, kind: TierKind, nbytes: int) -> list[asyncio.Task[None]]:
        """Start writing a batch of DRAM victims to SSD; returns the writes to wait for."""

        def demote(victim: BlockEntry, tasks: list[asyncio.Task[None]]) -> bool:
            if kind is not TierKind.DRAM or not self.store.demotable(victim):
                return False
            task = self._spawn(self.flush(victim, demote=True))
            if task is not None:
                tasks.append(task)
            return True

        return self._take_victims(kind, nbytes, demote, room_made=lambda: False)

    def _take_victims(
        self,
        kind: TierKind,
        nbytes: int,
        move: Callable[[BlockEntry, list[asyncio.Task[None]]], bool],
        *,
        room_made: Callable[[], bool],
    ) -> list[asyncio.Task[None]]:
        """Pop `kind`'s victims in policy order and `move` each, until `room_made()` or
        moves worth 4 × `nbytes` are planned: demotions go in batches, so I/O overlaps.
        Victims that are pinned or cannot move go back in the queue."""
        store = self.store
        tasks: list[asyncio.Task[None]] = []
        kept: list[BlockEntry] = []
        planned = 0
        while not room_made() and planned < 4 * nbytes:
            victim = store.victim_queue(kind).pop()
            if victim is None:
                break
            if not store.evictable_from(victim, kind, time.monotonic()):
                store.refresh(victim)
            elif move(victim, tasks):
                planned += victim.namespace.namespace.layout.block_bytes
            else:
                kept.append(victim)
        for entry in kept:
            store.refresh(entry)
        return tasks

    def _admitted(self, entry: BlockEntry) -> bool:
        return entry.num_seen >= self.config.ssd_admit_after_seen

    # -- background watermarks ------------------------------------------------------------

    def _nudge(self) -> None:
        if (
            self._wake is not None
            and time.monotonic() >= self._quiet_until
            and self._over_high_watermark()
        ):
            self._wake.set()

    def _over_high_watermark(self) -> bool:
        high = self.config.high_watermark
        return any(
            tier.used_bytes > high * tier.capacity_bytes
            for tier in (self.store.dram, self.store.hbm)
            if tier is not None
        )

    async def _maintain(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _MAINTENANCE_PERIOD_S)
            self._wake.clear()
            try:
                self.make_room()
            except Exception:  # the loop must survive; the error is logged
                logger.exception("background eviction pass failed")

    def make_room(self) -> None:
        """One watermark pass over the memory tiers; demotions finish in the background.

        The pass only moves data down or drops redundant copies. It never evicts a block
        outright: that loses data, so it is left to a put that actually needs the room.
        """
        store = self.store
        store.release_expired_leases()
        for kind in (TierKind.HBM, TierKind.DRAM):
            if kind not in store.queues:
                continue
            tier = store.memory_tier(kind)
            if tier.used_bytes <= self.config.high_watermark * tier.capacity_bytes:
                continue
            to_free = tier.used_bytes - self.config.low_watermark * tier.capacity_bytes
            if kind is TierKind.DRAM:
                # Demotions already under way will free their blocks: do not start more.
                to_free -= sum(
                    entry.namespace.namespace.layout.block_bytes for entry in self._demoting
                )
            if (
                kind is TierKind.DRAM
                and store.hbm is None
                and (store.ssd is None or not store.ssd.accepts_writes())
            ):
                continue  # no block can leave DRAM without being lost: puts evict on demand
            kept: list[BlockEntry] = []
            moved = 0
            while to_free > 0:
                victim = store.victim_queue(kind).pop()
                if victim is None:
                    break
                if not store.evictable_from(victim, kind, time.monotonic()):
                    store.refresh(victim)
                elif self._move_down(victim, kind):
                    to_free -= victim.namespace.namespace.layout.block_bytes
                    moved += 1
                else:
                    kept.append(victim)
            for entry in kept:
                store.refresh(entry)
            if not moved:
                # Nothing could move down (pinned, or not admitted yet). Scanning again on
                # every commit would cost O(blocks) each time: wait a while instead.
                self._quiet_until = time.monotonic() + _QUIET_AFTER_IDLE_PASS_S

    def _move_down(
        self, victim: BlockEntry, kind: TierKind, tasks: list[asyncio.Task[None]] | None = None
    ) -> bool:
        """Free the victim's copy in `kind` without losing the block; False if it cannot."""
        store, ssd = self.store, self.store.ssd
        if len(victim.copies) > 1:
            store.drop_copy(victim, kind, demoted=True)
            return True
        if kind is TierKind.DRAM and store.demotable(victim) and ssd is not None:
            if not ssd.accepts_writes():
                return False
            task = self._spawn(self.flush(victim, demote=True))
            if task is not None and tasks is not None:
                tasks.append(task)
            return True
        return False

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        try:
            task = asyncio.get_running_loop().create_task(coroutine)
        except RuntimeError:  # no loop: the store is used synchronously (tests, tools)
            coroutine.close()
            return None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _in_memory(entry: BlockEntry) -> bool:
    return TierKind.DRAM in entry.copies or TierKind.HBM in entry.copies


def _offsets(views: list[memoryview]) -> list[tuple[int, memoryview]]:
    out, offset = [], 0
    for view in views:
        out.append((offset, view))
        offset += len(view)
    return out
