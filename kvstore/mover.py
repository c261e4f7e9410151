"""TierMover: decides when blocks move between tiers, and schedules the I/O.

- Write-through: an admitted block is written to SSD as soon as it is committed.
- Write-back: when DRAM passes its high watermark, a background pass makes room down
  to the low watermark: blocks that already have an SSD copy just drop their DRAM
  copy, admitted ones are written to SSD first (a demotion), the rest are evicted.
- Promotion: a get of an SSD-only block reads it back into DRAM; blocks seen often
  enough are copied into HBM.
- Recovery: on start, the index is rebuilt from the SSD directory.

Every allocation, copy, drop and SSD reservation goes through the store's BlockPool;
SSD I/O runs on the SSD tier's threads, so it never blocks the event loop, and all
index and accounting changes happen back on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from kvstore.census import TenantUsage
from kvstore.enums import TierKind
from kvstore.errors import CapacityExhausted
from kvstore.index import BlockEntry
from kvstore.pool import BlockPool
from kvstore.recovery import recover_index, recover_while_serving
from kvstore.store import BlockStore

logger = logging.getLogger("kvstore.mover")
_MAINTENANCE_PERIOD_S = 0.05
_QUIET_AFTER_IDLE_PASS_S = 1.0


class TierMover:
    def __init__(self, store: BlockStore) -> None:
        self._pool = store.pool
        self._config = store.config
        self._tasks: set[asyncio.Task[None]] = set()
        # Blocks whose DRAM copy goes once their SSD write ends.
        self._demoting: set[BlockEntry] = set()
        self._wake: asyncio.Event | None = None
        self._quiet_until = 0.0
        self._maintenance: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[int] | None = None

    # -- life cycle -------------------------------------------------------------------

    def recover(self) -> int:
        """Rebuild the index from the SSD directory; returns the number of blocks restored."""
        return recover_index(self._pool)

    async def recover_while_serving(self) -> None:
        """Rebuild the index: before returning if that is quick, else partly in the
        background (kvstore.recovery.recover_while_serving)."""
        self._recovery = await recover_while_serving(self._pool)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._maintenance = asyncio.create_task(self._maintain(), name="kvstore-maintenance")

    async def flush_all(self) -> tuple[int, int]:
        """Write every admitted DRAM-only block to SSD (a graceful shutdown does this);
        returns (blocks written, blocks that could not be). This is the blocks' last
        chance: a tier degraded by an earlier error is tried again for each of them."""
        pool, ssd = self._pool, self._pool.ssd
        if ssd is None:
            return 0, 0
        pending = [
            entry
            for entry in pool.entries()
            if TierKind.SSD not in entry.copies and pool.admitted(entry)
        ]
        # Parents first, so the files on disk always form whole chains.
        pending.sort(key=lambda entry: entry.depth)
        for entry in pending:
            if ssd.degraded:
                ssd.retry_writes_now()
            await self.flush(entry, demote=False)
        written = sum(TierKind.SSD in entry.copies for entry in pending if entry.is_indexed())
        return written, len(pending) - written

    async def close(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
            # A rebuild that failed in the background has logged why already.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._recovery
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pool.close()

    def on_committed(self, entries: list[BlockEntry]) -> None:
        """Act on newly committed blocks as the write policy says (write-through: write
        each admitted one to SSD), and wake the watermark pass if memory runs high."""
        if not entries:
            return
        if self._config.write_policy == "write-through" and _loop_is_running():
            pool = self._pool
            for entry in entries:
                # Claimed now, not when the task starts: from commit on, the block
                # cannot be evicted before it is on SSD, and pool.wait_durable sees it.
                if pool.admitted(entry) and pool.claim_ssd_write(entry):
                    self._spawn(self.flush(entry, demote=False))
        self._nudge()

    # -- reads ------------------------------------------------------------------------

    def load(self, entries: list[BlockEntry]) -> OrderedLoad:
        """Bring SSD-only blocks of a pinned chain into memory (kvstore.read.BlockLoader):
        every SSD read starts now, and the blocks come out in chain order, each as soon
        as it and every block before it are in, so a get streams the first blocks while
        later ones are still being read."""
        return OrderedLoad(self, entries)

    def _settle_read(
        self, entry: BlockEntry, payload: bytes | bytearray
    ) -> bytes | bytearray | None:
        """A block read from SSD: promoted into DRAM (None), or its payload to serve."""
        return None if self._promote_to_dram(entry, payload) else payload

    def _settle_served(self, entry: BlockEntry) -> None:
        self._maybe_promote_to_hbm(entry)
        if self._config.write_policy == "write-through" and self._pool.admitted(entry):
            self._spawn(self.flush(entry, demote=False))

    def _drop_unreadable(
        self, entry: BlockEntry, error: BaseException, unserved: list[BlockEntry]
    ) -> None:
        logger.error("SSD copy of block %s is unusable (%s); dropping it", entry.key.hex(), error)
        self._pool.drop_unreadable(entry, error, unserved)

    def _promote_to_dram(self, entry: BlockEntry, payload: bytes | bytearray) -> bool:
        # Two reads of one SSD-only block may end one after the other: the second finds
        # it in DRAM already, and serves its own payload.
        if (
            not self._config.promote_on_hit
            or not entry.is_indexed()
            or TierKind.DRAM in entry.copies
        ):
            return False
        pool = self._pool
        try:
            handle = pool.allocate(TierKind.DRAM, len(payload), entry.namespace.usage)
        except CapacityExhausted:
            return False
        pool.dram.write(handle, 0, memoryview(payload))
        pool.add_copy(entry, TierKind.DRAM, handle)
        return True

    def _maybe_promote_to_hbm(self, entry: BlockEntry) -> None:
        pool = self._pool
        hbm = pool.hbm
        if (
            hbm is None
            or TierKind.HBM in entry.copies
            or TierKind.DRAM not in entry.copies
            or entry.num_seen < self._config.hbm_promote_after_seen
        ):
            return
        nbytes = entry.layout.block_bytes
        try:
            handle = pool.allocate(TierKind.HBM, nbytes, entry.namespace.usage)
        except CapacityExhausted:
            return
        for offset, view in _offsets(pool.dram.read(entry.copies[TierKind.DRAM], 0, nbytes)):
            hbm.write(handle, offset, view)
        pool.add_copy(entry, TierKind.HBM, handle)

    # -- writes to SSD ----------------------------------------------------------------

    async def flush(self, entry: BlockEntry, *, demote: bool) -> None:
        """Write an in-memory block to SSD; with `demote`, then free its DRAM copy."""
        pool = self._pool
        # A write of this block already in flight makes this one a no-op: it must not
        # touch that write's mark.
        marks = demote and entry not in self._demoting
        if marks:
            self._demoting.add(entry)
        try:
            written = await (
                self._write_with_ancestors(entry) if demote else self._write_through(entry)
            )
        finally:
            if marks:
                self._demoting.discard(entry)
        if (
            written
            and demote
            and TierKind.DRAM in entry.copies
            and not entry.is_pinned(time.monotonic())
        ):
            pool.drop_copy(entry, TierKind.DRAM, demoted=True)

    async def _write_with_ancestors(self, entry: BlockEntry) -> bool:
        """Write the block's ancestors that are in memory only, root first, then the block.

        A demotion frees the block's memory copy, so under write-back a crash loses
        exactly the blocks only in memory: if a child reached SSD before its parent, the
        crash would lose the parent and, with it, the child (recovery drops orphans).
        """
        pool = self._pool
        for ancestor in _ancestors_not_on_ssd(entry):
            if not await pool.write_to_ssd(ancestor):
                pool.refresh(entry)
                return False
        return await pool.write_to_ssd(entry)

    async def _write_through(self, entry: BlockEntry) -> bool:
        """Write-through: the block's ancestors that are not on SSD first (an SSD copy of
        a chain tail may have been evicted before the chain grew under it), then the
        block, whose write was claimed at commit and must run whatever happened to its
        ancestors (its claim pins it, and `wait_durable` waits for it; that then reports
        the put durable in memory only, if an ancestor is still not on SSD)."""
        pool = self._pool
        for ancestor in _ancestors_not_on_ssd(entry):
            if not await pool.write_to_ssd(ancestor):
                break
        return await pool.write_to_ssd(entry)

    async def ensure_room(
        self, kind: TierKind, nbytes: int, usage: TenantUsage | None = None
    ) -> None:
        """Wait until an allocation of `nbytes` in a memory tier by the tenant of `usage`
        (None: one without a quota) will succeed.

        Dropping redundant copies and chain tails is immediate; when only demotions
        (SSD writes) can make room, this starts them and waits for them, so a put under
        pressure slows down instead of failing. Raises CapacityExhausted when nothing
        can make room. Only blocks `pool.eviction_needs` names may move: the tenant's
        own past its quota, or a group's past its limit.
        """
        pool = self._pool
        tier = pool.memory_tier(kind)
        for _ in range(64):
            fits = pool.fits(kind, nbytes, usage)
            if not fits and self._writes_back(kind):
                # Write-back: blocks leave DRAM for SSD in the policy's order instead of
                # being dropped; only what cannot move down (or a full SSD) is left to
                # `allocate` below.
                used_bytes = tier.used_bytes
                demotions = self._move_down_for(kind, nbytes, usage)
                if demotions:
                    await asyncio.wait(demotions)
                if tier.used_bytes < used_bytes:
                    continue
            if fits:
                return
            try:
                handle = pool.allocate(kind, nbytes, usage)
            except CapacityExhausted:
                demotions = self._start_demotions(kind, nbytes, usage)
                if not demotions:
                    # Blocks being written to SSD are pinned until their write ends;
                    # then they leave DRAM (a demotion) or may be dropped.
                    writes = list(self._tasks) if pool.num_ssd_writes else []
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
        ssd = self._pool.ssd
        return (
            kind is TierKind.DRAM
            and ssd is not None
            and self._config.write_policy == "write-back"
            and ssd.accepts_writes()
        )

    def _move_down_for(
        self, kind: TierKind, nbytes: int, usage: TenantUsage | None
    ) -> list[asyncio.Task[None]]:
        """Move victims down until `nbytes` fit or a batch of demotions is under way.

        Redundant copies go at once; returns the demotions (SSD writes) to wait for.
        """
        self._pool.release_expired_leases()
        return self._take_victims(
            kind,
            nbytes,
            usage,
            lambda victim, tasks: self._move_down(victim, kind, tasks),
            room_made=lambda: self._pool.fits(kind, nbytes, usage),
        )

    def _start_demotions(
        self, kind: TierKind, nbytes: int, usage: TenantUsage | None
    ) -> list[asyncio.Task[None]]:
        """Start writing a batch of DRAM victims to SSD; returns the writes to wait for."""

        def demote(victim: BlockEntry, tasks: list[asyncio.Task[None]]) -> bool:
            if kind is not TierKind.DRAM or not self._pool.demotable(victim):
                return False
            task = self._spawn(self.flush(victim, demote=True))
            if task is not None:
                tasks.append(task)
            return True

        return self._take_victims(kind, nbytes, usage, demote, room_made=lambda: False)

    def _take_victims(
        self,
        kind: TierKind,
        nbytes: int,
        usage: TenantUsage | None,
        move: Callable[[BlockEntry, list[asyncio.Task[None]]], bool],
        *,
        room_made: Callable[[], bool],
    ) -> list[asyncio.Task[None]]:
        """Take victims in policy order from the groups `pool.eviction_needs` names and
        `move` each, until `room_made()` or moves worth 4 × what a group needs (at least
        `nbytes`) are planned: demotions go in batches, so I/O overlaps. Victims that
        cannot move go back in the queue."""
        tasks: list[asyncio.Task[None]] = []
        needs, _ = self._pool.eviction_needs(kind, nbytes, usage)
        for group, needed_bytes in needs:
            planned = 0
            with self._pool.victims(kind, group) as victims:
                while not room_made() and planned < 4 * max(needed_bytes, nbytes):
                    victim = victims.take()
                    if victim is None:
                        break
                    if move(victim, tasks):
                        planned += victim.layout.block_bytes
                    else:
                        victims.keep(victim)
        return tasks

    # -- background watermarks ------------------------------------------------------------

    def _nudge(self) -> None:
        if (
            self._wake is not None
            and time.monotonic() >= self._quiet_until
            and self._over_high_watermark()
        ):
            self._wake.set()

    def _over_high_watermark(self) -> bool:
        high = self._config.high_watermark
        pool = self._pool
        return any(
            used > high * limit
            for kind in (TierKind.HBM, TierKind.DRAM)
            if kind in pool.tier_kinds
            for _, used, limit in pool.groups(kind)
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
        pool, config = self._pool, self._config
        pool.release_expired_leases()
        # Each eviction group (a quoted tenant, or the tenants without a quota) is kept
        # under the watermarks of its own limit: no group's blocks move for another's.
        passes = [
            (kind, group, used, limit)
            for kind in (TierKind.HBM, TierKind.DRAM)
            if kind in pool.tier_kinds
            for group, used, limit in pool.groups(kind)
        ]
        for kind, group, used, limit in passes:
            if used <= config.high_watermark * limit:
                continue
            to_free = used - config.low_watermark * limit
            if kind is TierKind.DRAM:
                # Demotions already under way will free their blocks: do not start more.
                to_free -= sum(
                    entry.layout.block_bytes
                    for entry in self._demoting
                    if entry.namespace.usage.group(kind) == group
                )
            if (
                kind is TierKind.DRAM
                and pool.hbm is None
                and (pool.ssd is None or not pool.ssd.accepts_writes())
            ):
                continue  # no block can leave DRAM without being lost: puts evict on demand
            moved = 0
            with pool.victims(kind, group) as victims:
                while to_free > 0:
                    victim = victims.take()
                    if victim is None:
                        break
                    if self._move_down(victim, kind):
                        to_free -= victim.layout.block_bytes
                        moved += 1
                    else:
                        victims.keep(victim)
            if not moved:
                # Nothing could move down (pinned, or not admitted yet). Scanning again on
                # every commit would cost O(blocks) each time: wait a while instead.
                self._quiet_until = time.monotonic() + _QUIET_AFTER_IDLE_PASS_S

    def _move_down(
        self, victim: BlockEntry, kind: TierKind, tasks: list[asyncio.Task[None]] | None = None
    ) -> bool:
        """Free the victim's copy in `kind` without losing the block; False if it cannot."""
        pool, ssd = self._pool, self._pool.ssd
        # Into DRAM where it fits as it is: a block that leaves HBM stays in memory (an
        # HBM-only block with children could not leave at all, and HBM would fill with
        # them and take no more promotions).
        if (
            kind is TierKind.HBM
            and TierKind.DRAM not in victim.copies
            and self._copy_down_to_dram(victim)
        ):
            return True
        if len(victim.copies) > 1:
            pool.drop_copy(victim, kind, demoted=True)
            return True
        if kind is TierKind.DRAM and pool.demotable(victim) and ssd is not None:
            if not ssd.accepts_writes():
                return False
            task = self._spawn(self.flush(victim, demote=True))
            if task is not None and tasks is not None:
                tasks.append(task)
            return True
        return False

    def _copy_down_to_dram(self, victim: BlockEntry) -> bool:
        """Move the victim's HBM copy into DRAM room that is free now (within its tenant's
        DRAM quota): never by evicting another block, which would lose data for the sake
        of a copy. False, and nothing changed, where there is no such room."""
        pool = self._pool
        hbm = pool.hbm
        assert hbm is not None
        nbytes = victim.layout.block_bytes
        usage = victim.namespace.usage
        needs, short = pool.eviction_needs(TierKind.DRAM, nbytes, usage)
        if needs or short > 0:
            return False
        handle = pool.allocate(TierKind.DRAM, nbytes, usage)
        for offset, view in _offsets(hbm.read(victim.copies[TierKind.HBM], 0, nbytes)):
            pool.dram.write(handle, offset, view)
        pool.add_copy(victim, TierKind.DRAM, handle, promoted=False)
        pool.drop_copy(victim, TierKind.HBM, demoted=True)
        return True

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        try:
            task = asyncio.get_running_loop().create_task(coroutine)
        except RuntimeError:  # no loop: the store is used synchronously (tests, tools)
            coroutine.close()
            return None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _loop_is_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the store is used synchronously (tests, tools)
        return False
    return True


def _ancestors_not_on_ssd(entry: BlockEntry) -> list[BlockEntry]:
    """The block's ancestors above it up to the first on SSD, root first."""
    ancestors: list[BlockEntry] = []
    node = entry.parent
    while node is not None and TierKind.SSD not in node.copies:
        ancestors.append(node)
        node = node.parent
    return ancestors[::-1]


def _in_memory(entry: BlockEntry) -> bool:
    return TierKind.DRAM in entry.copies or TierKind.HBM in entry.copies


def _offsets(views: list[memoryview]) -> list[tuple[int, memoryview]]:
    out, offset = [], 0
    for view in views:
        out.append((offset, view))
        offset += len(view)
    return out


class _BlockRead:
    """One block's SSD read: its verified layer 0 first, then the whole block."""

    def __init__(self, pool: BlockPool, entry: BlockEntry) -> None:
        self.first_layer: asyncio.Future[memoryview] = asyncio.get_running_loop().create_future()
        self.whole = asyncio.ensure_future(pool.read_from_ssd(entry, self.first_layer))
        self.whole.add_done_callback(self._fail_first_layer)
        self.first_layer.add_done_callback(_swallow)

    def _fail_first_layer(self, whole: asyncio.Future[bytearray]) -> None:
        """A read that failed (or was cancelled) before layer 0 was in fails that too."""
        if self.first_layer.done():
            return
        if whole.cancelled():
            self.first_layer.cancel()
            return
        error = whole.exception()
        if error is not None:
            self.first_layer.set_exception(error)
        else:  # the result always follows the first layer: not reached
            self.first_layer.set_exception(RuntimeError("the read ended without its first layer"))

    def cancel(self) -> None:
        for future in (self.first_layer, self.whole):
            future.cancel()
            future.add_done_callback(_swallow)


class OrderedLoad:
    """The blocks of one get, brought into memory in chain order (TierMover.load).

    Each SSD read hands out its block's layer 0, verified, as soon as that is read
    (`next_first_layer`), and the whole block once the rest is read and verified
    (`next_block`): two cursors over the chain, each in order. A block whose SSD file
    fails its checksum or cannot be read, at either step, ends the served prefix: it is
    dropped with its descendants, and no block from it on is handed out any more.
    """

    def __init__(self, mover: TierMover, entries: list[BlockEntry]) -> None:
        self._mover = mover
        self._entries = entries
        pool = mover._pool
        # The first SSD read starts alone, so that it has the disk and an I/O thread to
        # itself and the get's first bytes (its layer 0) leave after one small read;
        # every other read starts once that layer is in, and the I/O threads take them
        # in order, so the disk stays busy while the first blocks stream.
        self._reads: dict[int, _BlockRead] = {}
        self._not_started: list[int] = []  # SSD reads that wait for the first one
        self._ended = False
        self._end = len(entries)  # the served prefix: blocks from here on are not served
        self._next = 0  # the next block to hand out whole
        self._next_first = 0  # the next block whose layer 0 to hand out
        if pool.ssd is None:
            return
        on_ssd = [index for index, entry in enumerate(entries) if not _in_memory(entry)]
        if not on_ssd:
            return
        self._not_started = on_ssd[1:]
        first = self._start_read(on_ssd[0])
        if self._not_started:
            # After the get's own wake-up: starting a few dozen reads takes a while on
            # the loop, and the first block's rest is still being read meanwhile.
            first.first_layer.add_done_callback(
                lambda _: asyncio.get_running_loop().call_soon(self._start_reads)
            )

    def _start_read(self, index: int) -> _BlockRead:
        read = _BlockRead(self._mover._pool, self._entries[index])
        self._reads[index] = read
        return read

    def _start_reads(self) -> None:
        indices, self._not_started = self._not_started, []
        for index in indices:
            if not self._ended and index < self._end:
                self._start_read(index)

    @property
    def num_reads(self) -> int:
        """SSD reads this load started and has not yet handed out whole."""
        return len(self._reads)

    def reading(self) -> bool:
        return bool(self._reads or self._not_started)

    async def next_first_layer(self) -> tuple[bool, memoryview | None]:
        """Layer 0 of the next block: (True, None) when the block is in memory, (True,
        its verified bytes) from its SSD read, (False, None) once no more can be served.
        Never ahead of `next_block`'s blocks: it is called before them."""
        index = self._next_first
        if self._ended or index >= self._end:
            return False, None
        if index in self._not_started:  # taken before the first read's callback ran
            self._start_reads()
        read = self._reads.get(index)
        layer: memoryview | None = None
        if read is not None:
            try:
                layer = await read.first_layer
            except Exception as error:  # an unreadable file ends the served prefix
                self._cut(index, error)
                return False, None
        self._next_first += 1
        return True, layer

    def next_first_layer_is_ready(self) -> bool:
        return self._ready(self._next_first, whole=False)

    async def next_block(self) -> tuple[bool, bytes | bytearray | None]:
        """Bring the next block in: (True, None) when it is in memory, (True, payload)
        when it is served from the payload, (False, None) once no more can be served."""
        index = self._next
        if self._ended or index >= self._end:
            self.cancel()
            return False, None
        entry = self._entries[index]
        payload: bytes | bytearray | None = None
        if index in self._not_started:
            self._start_reads()
        read = self._reads.pop(index, None)
        if read is not None:
            try:
                data = await read.whole
            except Exception as error:  # an unreadable file ends the served prefix
                self._cut(index, error)
                self.cancel()
                return False, None
            payload = self._mover._settle_read(entry, data)
        self._next += 1
        self._next_first = max(self._next_first, self._next)
        self._mover._settle_served(entry)
        return True, payload

    def next_is_ready(self) -> bool:
        return self._ready(self._next, whole=True)

    def _ready(self, index: int, *, whole: bool) -> bool:
        """Whether block `index` (its layer 0, or with `whole` all of it) is in."""
        if self._ended or index >= self._end or index in self._not_started:
            return False
        read = self._reads.get(index)
        return read is None or (read.whole if whole else read.first_layer).done()

    def _cut(self, index: int, error: BaseException) -> None:
        """Block `index` is unreadable: drop it and its descendants, stop the reads of
        it and every block after it; the blocks before it are still served."""
        if index >= self._end:
            return
        self._end = index
        for later in [other for other in self._reads if other >= index]:
            self._reads.pop(later).cancel()
        self._mover._drop_unreadable(self._entries[index], error, self._entries[index:])

    def cancel(self) -> None:
        """Stop the reads not yet taken; their results, errors included, are dropped."""
        self._ended = True
        for read in self._reads.values():
            read.cancel()
        self._reads.clear()


def _swallow(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
