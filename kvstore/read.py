"""ReadSession: the blocks of one GetBlocks stream, pinned until the stream ends.

The session serves the longest stored prefix of the requested keys, from whichever
tier holds each block fastest; SSD-only blocks are brought into memory by a
`BlockLoader` (kvstore.mover.TierMover is one). Chunks come out layer-major: every
chunk of layer 0 of every block, then layer 1, and so on, so a decode worker can start
on layer 0 while later layers are still in flight.

SSD reads stream: `load` waits only for layer 0 of the first block, and layer 0 of each
block goes out as soon as it is read and verified, while the rest of that block and
later blocks are still being read; layer 1 starts once every block is in whole. If a
block turns out unreadable (its layer 0, or a later layer after its layer 0 went out),
the served prefix ends before it: `num_blocks` shrinks, and the transport tells the
client before any byte of layer 1 (no layer is complete before every block of it has
arrived, so the client has used nothing of the blocks dropped). If that is the first
block, the get serves none: the transport says so (`served_none`), and the get is a
miss, as a retry is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Protocol

from kvstore.enums import TierKind
from kvstore.errors import InvalidRequest
from kvstore.index import BlockEntry
from kvstore.keys import validate_keys
from kvstore.layout import Namespace
from kvstore.store import BlockStore


class BlockLoad(Protocol):
    async def next_first_layer(self) -> tuple[bool, memoryview | None]:
        """Layer 0 of the chain's next block, ahead of the whole block: (True, None) when
        the block is in memory, (True, its verified bytes), or (False, None) when no more
        blocks can be served (this one was unreadable, or the chain ended)."""
        ...

    def next_first_layer_is_ready(self) -> bool:
        """Whether `next_first_layer` would answer without waiting."""
        ...

    async def next_block(self) -> tuple[bool, bytes | bytearray | None]:
        """Bring the chain's next block in: (True, None) once it is in memory, (True,
        payload) when it is served from its verified payload, (False, None) when no more
        blocks can be served (this one was unreadable, or the chain ended)."""
        ...

    def cancel(self) -> None:
        """Stop reads still in flight; the session will take no more blocks."""
        ...

    def next_is_ready(self) -> bool:
        """Whether `next_block` would answer without waiting (the block is in memory,
        its read is done, or nothing more can be served)."""
        ...

    def reading(self) -> bool:
        """Whether a block of this load is still to come off the SSD."""
        ...


class BlockLoader(Protocol):
    def load(self, entries: list[BlockEntry]) -> BlockLoad:
        """Start bringing SSD-only blocks of a pinned chain into memory, in order."""
        ...


@dataclass(frozen=True, slots=True)
class ReadChunk:
    block_index: int
    layer: int
    offset: int
    views: list[memoryview]  # valid until the session closes
    nbytes: int
    layer_checksum: int
    checksum_kind_value: int


@dataclass(frozen=True, slots=True)
class ReadRun:
    """Layer `layer` of blocks first_block.. (one checksum each), whole and in order."""

    layer: int
    first_block: int
    views: list[memoryview]  # valid until the session closes
    layer_checksums: list[int]
    checksum_kind_value: int


class ReadSession:
    def __init__(self, store: BlockStore, namespace: Namespace, keys: list[bytes]) -> None:
        validate_keys(keys)
        self._store = store
        self._pool = pool = store.pool
        self._layout = namespace.layout
        self.entries: list[BlockEntry] = pool.find_prefix(namespace, keys)
        self._pinned = list(self.entries)
        pool.acquire_read(self._pinned)
        tiers = store.tiers_of(self.entries)
        # Where each block is read from: `load` may bring an SSD-only block into DRAM
        # first, but its bytes still came off the SSD.
        self._source_tiers = tiers
        store.record_hits(
            Counter(tiers).items(), len(self.entries), missed=len(self.entries) < len(keys)
        )
        pool.touch(self.entries)
        for entry in self.entries:
            entry.num_hits += 1
        self._payloads: dict[BlockEntry, bytes | bytearray] = {}
        self._first_layers: dict[BlockEntry, memoryview] = {}  # layer 0 ahead of the rest
        self._load: BlockLoad | None = None
        self._num_loaded = len(self.entries)  # leading entries in memory or in _payloads
        # Leading entries whose layer 0 is in memory, in _payloads or in _first_layers.
        self._num_first = len(self.entries)
        self._closed = False

    async def load(self, loader: BlockLoader | None) -> None:
        """Start bringing SSD-only blocks into memory and wait for layer 0 of the first
        block: the rest come in while `stream_chunks` or `stream_runs` send layer 0. If
        the first block's layer 0 is unreadable, nothing is served."""
        if loader is not None and self.entries:
            self._load = loader.load(self.entries)
            self._num_loaded = self._num_first = 0
            await self._first_layers_through(0)

    @property
    def num_blocks(self) -> int:
        """Blocks served: shrinks if a block read while streaming was unreadable."""
        return len(self.entries)

    @property
    def in_memory(self) -> bool:
        """Every block still to be streamed is at hand: the next run comes without
        waiting for the SSD (and the served prefix can no longer shrink)."""
        return self._load is None or not self._load.reading()

    async def _load_through(self, block_index: int) -> bool:
        """Until block `block_index` is in, and every later block that is in already
        (so runs stay as long as they can); False if the served prefix ends before it."""
        while self._num_loaded <= block_index or (
            self._load is not None and self._load.next_is_ready()
        ):
            if self._load is None:
                return False
            servable, payload = await self._load.next_block()
            if not servable:
                self._load = None
                del self.entries[self._num_loaded :]
                break
            if payload is not None:
                self._payloads[self.entries[self._num_loaded]] = payload
            self._num_loaded += 1
        return block_index < min(self._num_loaded, len(self.entries))

    async def _first_layers_through(self, block_index: int) -> bool:
        """Until layer 0 of block `block_index` is in, and that of every later block that
        is in already; False if the served prefix ends before it."""
        while self._num_first <= block_index or (
            self._load is not None and self._load.next_first_layer_is_ready()
        ):
            if self._load is None:
                return False
            servable, layer = await self._load.next_first_layer()
            if not servable:
                del self.entries[self._num_first :]
                break
            if layer is not None:
                self._first_layers[self.entries[self._num_first]] = layer
            self._num_first += 1
        return block_index < min(self._num_first, len(self.entries))

    async def _load_all(self) -> None:
        """Every served block in whole, once layer 0 went out: a block that fails now is
        dropped from the served prefix, with the blocks after it (the transport tells
        the client before layer 1). If that is the first, the get serves no block."""
        # Layer 0 is handed out (its views hold their buffers while they are sent): the
        # session need not keep the payloads of blocks promoted into DRAM alive.
        self._first_layers.clear()
        if not self.entries:  # nothing was served: nothing went out
            return
        if self._num_loaded < len(self.entries):
            await self._load_through(len(self.entries) - 1)

    @property
    def tiers(self) -> list[TierKind]:
        """The fastest tier of each served block, as the session opened (before `load`)."""
        return self._source_tiers[: len(self.entries)]

    async def stream_chunks(self, max_chunk_bytes: int) -> AsyncIterator[ReadChunk]:
        """`chunks`, with layer 0 of each block sent as soon as it is in."""
        block_index = 0
        while await self._first_layers_through(block_index):
            for chunk in self._block_chunks(block_index, 0, max_chunk_bytes):
                yield chunk
            block_index += 1
        await self._load_all()
        for chunk in self.chunks(max_chunk_bytes, first_layer=1):
            yield chunk

    def chunks(self, max_chunk_bytes: int, first_layer: int = 0) -> Iterator[ReadChunk]:
        """Every block-layer in chunks of at most `max_chunk_bytes`, layer-major, from
        `first_layer` on; every block must be in (no load, or `stream_chunks`)."""
        if max_chunk_bytes < 1:
            raise InvalidRequest(f"max_chunk_bytes must be >= 1, got {max_chunk_bytes}")
        assert self._num_loaded >= len(self.entries), "blocks still loading: stream_chunks"
        for layer in range(first_layer, self._layout.num_layers):
            for block_index in range(len(self.entries)):
                yield from self._block_chunks(block_index, layer, max_chunk_bytes)
        self._count_served()

    def _block_chunks(
        self, block_index: int, layer: int, max_chunk_bytes: int
    ) -> Iterator[ReadChunk]:
        if max_chunk_bytes < 1:
            raise InvalidRequest(f"max_chunk_bytes must be >= 1, got {max_chunk_bytes}")
        layer_bytes = self._layout.layer_bytes
        base = layer * layer_bytes
        entry = self.entries[block_index]
        for offset in range(0, layer_bytes, max_chunk_bytes):
            nbytes = min(max_chunk_bytes, layer_bytes - offset)
            yield ReadChunk(
                block_index=block_index,
                layer=layer,
                offset=offset,
                views=self._read(entry, base + offset, nbytes),
                nbytes=nbytes,
                layer_checksum=entry.layer_checksums[layer],
                checksum_kind_value=entry.checksum_kind_value,
            )

    async def stream_runs(self, max_run_bytes: int) -> AsyncIterator[ReadRun]:
        """`runs`, where a run of layer 0 holds only blocks whose layer 0 is in: the
        first goes out as soon as the first block's is, while the rest of it and later
        blocks are still being read."""
        per_run = self._per_run(max_run_bytes)
        start = 0
        while await self._first_layers_through(start):
            end = self._run_end(start, min(self._num_first, start + per_run))
            yield self._run(0, start, end)
            start = end
        await self._load_all()
        for run in self.runs(max_run_bytes, first_layer=1):
            yield run

    def runs(self, max_run_bytes: int, first_layer: int = 0) -> Iterator[ReadRun]:
        """Whole layers of consecutive blocks, at most `max_run_bytes` each, layer-major,
        from `first_layer` on; every block must be in (no load, or `stream_runs`).

        For layers much smaller than a message: one run costs one header for many
        blocks, where chunks would cost one each.
        """
        per_run = self._per_run(max_run_bytes)
        assert self._num_loaded >= len(self.entries), "blocks still loading: stream_runs"
        groups: list[tuple[int, int]] = []
        start = 0
        while start < len(self.entries):
            end = self._run_end(start, start + per_run)
            groups.append((start, end))
            start = end
        # Where each group's blocks are is the same for every layer: looked up once.
        handles = [self._dram_handles(start, end) for start, end in groups]
        for layer in range(first_layer, self._layout.num_layers):
            for (start, end), group_handles in zip(groups, handles, strict=True):
                yield self._run(layer, start, end, group_handles)
        self._count_served()

    def _per_run(self, max_run_bytes: int) -> int:
        layer_bytes = self._layout.layer_bytes
        if layer_bytes > max_run_bytes:
            raise InvalidRequest(
                f"a layer ({layer_bytes} B) does not fit a run of {max_run_bytes} B"
            )
        return max_run_bytes // layer_bytes

    def _run_end(self, start: int, limit: int) -> int:
        """The end of a run from `start`: blocks before `limit` that share its checksum
        kind (a run carries one kind)."""
        entries = self.entries
        kind = entries[start].checksum_kind_value
        end = start + 1
        while end < min(limit, len(entries)) and entries[end].checksum_kind_value == kind:
            end += 1
        return end

    def _dram_handles(self, start: int, end: int) -> list[object | None]:
        """The DRAM copies of blocks start..end-1, None for a block read from elsewhere.
        A DRAM copy stays put while the session pins its block."""
        return [
            None
            if entry in self._payloads or entry in self._first_layers
            else entry.copies.get(TierKind.DRAM)
            for entry in self.entries[start:end]
        ]

    def _run(
        self, layer: int, start: int, end: int, handles: list[object | None] | None = None
    ) -> ReadRun:
        layer_bytes = self._layout.layer_bytes
        base = layer * layer_bytes
        entries = self.entries[start:end]
        if handles is None:
            handles = self._dram_handles(start, end)
        if None in handles:
            views = [view for entry in entries for view in self._read(entry, base, layer_bytes)]
        else:
            views = self._pool.dram.read_slices(handles, base, layer_bytes)
        return ReadRun(
            layer=layer,
            first_block=start,
            views=views,
            layer_checksums=[entry.layer_checksums[layer] for entry in entries],
            checksum_kind_value=entries[0].checksum_kind_value,
        )

    def _count_served(self) -> None:
        counters = self._store.counters
        counters.blocks_got += len(self.entries)
        counters.bytes_got += len(self.entries) * self._layout.block_bytes

    def _read(self, entry: BlockEntry, offset: int, nbytes: int) -> list[memoryview]:
        layer = self._first_layers.get(entry)
        if layer is not None and offset + nbytes <= len(layer):
            return [layer[offset : offset + nbytes]]
        payload = self._payloads.get(entry)
        if payload is not None:
            return [memoryview(payload)[offset : offset + nbytes]]
        # DRAM first: its reads are views, HBM's are device-to-host copies.
        for kind in (TierKind.DRAM, TierKind.HBM):
            handle = entry.copies.get(kind)
            if handle is not None:
                return self._pool.memory_tier(kind).read(handle, offset, nbytes)
        raise AssertionError(f"block {entry.key.hex()} has no copy in memory")

    def close(self) -> None:
        if self._load is not None:
            self._load.cancel()
            self._load = None
        if not self._closed:
            self._closed = True
            self._pool.release_read(self._pinned)
