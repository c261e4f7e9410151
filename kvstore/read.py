"""ReadSession: the blocks of one GetBlocks stream, pinned until the stream ends.

The session serves the longest stored prefix of the requested keys, from whichever
tier holds each block fastest; SSD-only blocks are first brought into memory by a
`BlockLoader` (kvstore.mover.TierMover is one). Chunks come out layer-major: every
chunk of layer 0 of every block, then layer 1, and so on, so a decode worker can start
on layer 0 while later layers are still in flight.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from kvstore.enums import TierKind
from kvstore.errors import InvalidRequest
from kvstore.index import BlockEntry
from kvstore.keys import validate_keys
from kvstore.layout import Namespace
from kvstore.store import BlockStore


class BlockLoader(Protocol):
    async def load(self, entries: list[BlockEntry]) -> tuple[int, dict[BlockEntry, bytes]]:
        """Bring SSD-only blocks of a pinned chain into memory: returns how many leading
        entries can be served and the verified payloads of blocks left out of memory."""
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
        self._payloads: dict[BlockEntry, bytes] = {}
        self._closed = False

    async def load(self, loader: BlockLoader | None) -> None:
        """Bring SSD-only blocks into memory; the served prefix ends at a block that fails."""
        if loader is None:
            return
        served, self._payloads = await loader.load(self.entries)
        del self.entries[served:]

    @property
    def tiers(self) -> list[TierKind]:
        """The fastest tier of each served block, as the session opened (before `load`)."""
        return self._source_tiers[: len(self.entries)]

    def chunks(self, max_chunk_bytes: int) -> Iterator[ReadChunk]:
        if max_chunk_bytes < 1:
            raise InvalidRequest(f"max_chunk_bytes must be >= 1, got {max_chunk_bytes}")
        layer_bytes = self._layout.layer_bytes
        for layer in range(self._layout.num_layers):
            base = layer * layer_bytes
            for block_index, entry in enumerate(self.entries):
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
        self._count_served()

    def runs(self, max_run_bytes: int) -> Iterator[ReadRun]:
        """Whole layers of consecutive blocks, at most `max_run_bytes` each, layer-major.

        For layers much smaller than a message: one run costs one header for many
        blocks, where chunks would cost one each.
        """
        layer_bytes = self._layout.layer_bytes
        if layer_bytes > max_run_bytes:
            raise InvalidRequest(
                f"a layer ({layer_bytes} B) does not fit a run of {max_run_bytes} B"
            )
        per_run = max_run_bytes // layer_bytes
        entries = self.entries
        groups = self._run_groups(per_run)
        # A DRAM copy stays put while the session pins its block: look handles up once.
        dram = self._pool.dram
        handles = [
            None if entry in self._payloads else entry.copies.get(TierKind.DRAM)
            for entry in entries
        ]
        for layer in range(self._layout.num_layers):
            base = layer * layer_bytes
            for start, end, kind in groups:
                group_handles = handles[start:end]
                if None in group_handles:
                    views = [
                        view
                        for entry in entries[start:end]
                        for view in self._read(entry, base, layer_bytes)
                    ]
                else:
                    views = dram.read_slices(group_handles, base, layer_bytes)
                yield ReadRun(
                    layer=layer,
                    first_block=start,
                    views=views,
                    layer_checksums=[entry.layer_checksums[layer] for entry in entries[start:end]],
                    checksum_kind_value=kind,
                )
        self._count_served()

    def _run_groups(self, per_run: int) -> list[tuple[int, int, int]]:
        """(start, end, checksum kind) of each run: at most `per_run` consecutive blocks
        that share a checksum kind (a run carries one kind)."""
        entries = self.entries
        groups = []
        start = 0
        while start < len(entries):
            kind = entries[start].checksum_kind_value
            end = start + 1
            while (
                end < len(entries)
                and end - start < per_run
                and entries[end].checksum_kind_value == kind
            ):
                end += 1
            groups.append((start, end, kind))
            start = end
        return groups

    def _count_served(self) -> None:
        counters = self._store.counters
        counters.blocks_got += len(self.entries)
        counters.bytes_got += len(self.entries) * self._layout.block_bytes

    def _read(self, entry: BlockEntry, offset: int, nbytes: int) -> list[memoryview]:
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
        if not self._closed:
            self._closed = True
            self._pool.release_read(self._pinned)
