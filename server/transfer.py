"""Puts and gets, whatever carries them: gRPC (kvstore.server.servicer) or the data
plane (kvstore.server.dataplane).

A put is a stream of PutBlocksRequest messages in kvstore.wire.chunks's encoding,
answered by one PutBlocksResponse; a get is one GetBlocksRequest, answered by a stream
of GetBlocksResponse messages as wire parts. Bad input raises the core's or the wire's
errors; each transport maps them to a status in its one catch-all, so validation,
status codes and the reclaiming of abandoned puts are the same on both.

A tenant with a `max_transfers` quota runs at most that many puts and gets at once
(counted by the namespace's tenant, which authorization has made the caller's own);
past it a transfer is RESOURCE_EXHAUSTED before it reserves anything, and a slot is
freed however its transfer ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from kvstore.enums import TierKind
from kvstore.errors import CapacityExhausted, InvalidRequest
from kvstore.index import BlockEntry
from kvstore.layout import Namespace
from kvstore.mover import TierMover
from kvstore.put import PutSession
from kvstore.read import ReadSession
from kvstore.server.auth import OPEN, Caller
from kvstore.server.config import Limits
from kvstore.server.decode import MalformedRequest, open_keyed_request, put_namespace_from_wire
from kvstore.server.put_floor import PutFloor
from kvstore.server.replies import put_reply
from kvstore.server.request_metrics import RequestMetrics
from kvstore.server.throttle import ReadThrottle
from kvstore.store import BlockStore
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import (
    GET_CHUNKS,
    GET_RUNS,
    MIN_PUT_PIECE_BYTES,
    PutMessage,
    WireRun,
    chunk_parts,
    decode_put_message,
    encode_get_header,
    run_parts,
    uses_runs,
)
from kvstore.wire.compression import LZ4_SHUFFLE, WireEncoder
from kvstore.wire.enums import checksum_kind_from_wire

# Blocks a put declares, reserves or writes in one step of the event loop.
BLOCKS_PER_STEP = 64

WireParts = list[bytes | memoryview]


@dataclass(frozen=True, slots=True)
class TailedMessage:
    """A put message whose last run's data, `tail_bytes` of it, is still on the
    connection (a data-plane PUT_TAIL frame): the put receives it where it is stored."""

    before_tail: memoryview
    tail_bytes: int
    # Until the tail's next byte has come.
    arriving: Callable[[], Awaitable[None]]
    # The tail's next bytes, into views (as many as their lengths add up to); or the
    # next `nbytes` into a buffer of the reader's.
    receive_into: Callable[[list[memoryview]], Awaitable[None]]
    receive: Callable[[int], Awaitable[memoryview]]


class Transfers:
    """The put and get streams over one store and its mover."""

    def __init__(self, store: BlockStore, mover: TierMover, limits: Limits) -> None:
        self._store = store
        self._mover = mover
        self._limits = limits
        self._throttle = ReadThrottle({kind: store.config.read_rate(kind) for kind in TierKind})
        # MIN_PUT_PIECE_BYTES, or a quarter of the largest chunk where messages are small.
        self._put_floor_bytes = min(MIN_PUT_PIECE_BYTES, limits.min_chunk_bytes // 4)
        # Puts and gets running per tenant with a max_transfers quota.
        self._num_running: dict[str, int] = {}
        # The put and get histograms, both transports' (None: metrics off).
        self.request_metrics: RequestMetrics | None = None

    def num_running(self, tenant: str) -> int:
        """Puts and gets of a tenant with a `max_transfers` quota running now."""
        return self._num_running.get(tenant, 0)

    def _claim_slot(self, tenant: str) -> str | None:
        """Count a transfer of `tenant` against its quota; returns what `_free_slot`
        takes (None: the tenant has no such quota). Raises CapacityExhausted past it."""
        quota = self._store.config.quotas.get(tenant)
        if quota is None or quota.max_transfers is None:
            return None
        running = self._num_running.get(tenant, 0)
        if running >= quota.max_transfers:
            raise CapacityExhausted(
                f"tenant {tenant!r} is at its max_transfers quota ({quota.max_transfers} puts "
                f"and gets at once, {running} running); wait for one to end, or raise "
                f"quotas.{tenant}.max_transfers"
            )
        self._num_running[tenant] = running + 1
        return tenant

    def _free_slot(self, slot: str | None) -> None:
        if slot is None:
            return
        running = self._num_running[slot] - 1
        if running:
            self._num_running[slot] = running
        else:
            del self._num_running[slot]

    async def put(
        self, messages: AsyncIterator[bytes | memoryview | TailedMessage], caller: Caller = OPEN
    ) -> pb.PutBlocksResponse:
        """A whole put by `caller`; raises on bad input or a namespace not the caller's.

        Each message is applied before the next is read, so it may be a view into a
        buffer that the transport reuses. A TailedMessage's tail is received once the
        rest of the message has been checked and its room made.
        """
        started_s = time.perf_counter()
        session: PutSession | None = None
        floor: PutFloor | None = None
        slot: str | None = None
        committed: list[BlockEntry] = []
        try:
            async for raw in messages:
                tail = raw if isinstance(raw, TailedMessage) else None
                if tail is not None:
                    message = decode_put_message(tail.before_tail, tail.tail_bytes)
                else:
                    message = decode_put_message(cast(bytes | memoryview, raw))
                if session is None:
                    namespace = put_namespace_from_wire(message.namespace)
                    caller.authorize(namespace.tenant)
                    slot = self._claim_slot(namespace.tenant)
                    session, floor = self._open_put(message, namespace)
                elif message.namespace is not None:
                    raise InvalidRequest("namespace belongs in the first message of a put only")
                assert floor is not None
                # Checked before it is applied: a refused message costs no copy and
                # commits no block.
                floor.admit(message)
                floor.check_pieces(message, session.num_declared + len(message.blocks))
                await self._apply_put_message(session, message, committed, tail)
            if session is None:
                raise InvalidRequest("the put stream was empty; send a namespace and blocks")
            outcomes = session.finish()
            # COMMITTED means what the write policy promises: under write-through, the
            # blocks' files are in place before the reply goes (and puts slow down to
            # the disk's pace).
            durability = await self._store.wait_durable(committed)
            if self.request_metrics is not None:
                self.request_metrics.observe_put(
                    time.perf_counter() - started_s, session.num_declared * session.block_bytes
                )
            return put_reply(outcomes, durability)
        finally:
            # A cancelled or failed stream frees whatever it had reserved. Blocks that it
            # committed before it failed stay stored: the write policy gets them too (a
            # write-through block must reach SSD whatever came after it).
            if session is not None:
                self._take_committed(session, committed)
                session.abort()
            self._free_slot(slot)

    def _open_put(self, message: PutMessage, namespace: Namespace) -> tuple[PutSession, PutFloor]:
        kind = checksum_kind_from_wire(message.checksum_kind)
        session = PutSession(self._store, namespace, kind)
        return session, PutFloor(namespace.layout, self._put_floor_bytes)

    async def _apply_put_message(
        self,
        session: PutSession,
        message: PutMessage,
        committed: list[BlockEntry],
        tail: TailedMessage | None = None,
    ) -> None:
        """Apply one message, letting the loop run other requests (lookups) after each
        BLOCKS_PER_STEP blocks: a megabyte of small blocks is a thousand commits, tens
        of milliseconds of the loop in one step otherwise."""
        for count, header in enumerate(message.blocks, 1):
            session.declare(header.key, header.parent_key, parent_remote=header.parent_remote)
            if not count % BLOCKS_PER_STEP:
                await asyncio.sleep(0)
        # Every piece is checked before any room is made for it: a malformed one must not
        # evict others' blocks for a put that then fails.
        for chunk in message.chunks:
            session.check_chunk(chunk.block_index, chunk.layer, chunk.offset, len(chunk.data))
        for run in message.runs:
            session.check_run(
                run.first_block,
                run.num_blocks,
                run.layer,
                message.data_bytes(run),
                len(run.layer_checksums),
            )
        # Room is reserved as a block's first bytes arrive (a tail's, as it comes: in
        # _receive_tail). Under pressure, wait for demotions to SSD (or write-through
        # writes) rather than fail the put.
        tail_run = message.runs[-1] if tail is not None else None
        written = _blocks_written(message, session.num_declared, tail_run)
        for count, block_index in enumerate(written, 1):
            await self._make_room(session, block_index)
            if not count % BLOCKS_PER_STEP:
                await asyncio.sleep(0)
        for count, chunk in enumerate(message.chunks, 1):
            session.write(
                chunk.block_index, chunk.layer, chunk.offset, chunk.data, chunk.layer_checksum
            )
            if not count % BLOCKS_PER_STEP:
                self._take_committed(session, committed)
                await asyncio.sleep(0)
        for run in message.runs:
            if run is tail_run:
                assert tail is not None
                await self._receive_tail(session, run, tail, committed)
                continue
            layer_bytes = session.layer_bytes
            whole = (
                run.num_blocks <= BLOCKS_PER_STEP
                or len(run.layer_checksums) != run.num_blocks
                or len(run.data) != run.num_blocks * layer_bytes
                or not 0 <= run.first_block <= session.num_declared - run.num_blocks
            )
            if whole:  # small, or malformed: write_run answers it as sent
                session.write_run(
                    run.first_block, run.num_blocks, run.layer, run.data, run.layer_checksums
                )
                continue
            async for first, stop in self._steps(session, committed, run.num_blocks):
                session.write_run(
                    run.first_block + first,
                    stop - first,
                    run.layer,
                    run.data[first * layer_bytes : stop * layer_bytes],
                    run.layer_checksums[first:stop],
                )
        self._take_committed(session, committed)

    async def _make_room(self, session: PutSession, block_index: int) -> None:
        if session.needs_room(block_index):
            await self._mover.ensure_room(TierKind.DRAM, session.block_bytes, session.usage)
            session.start(block_index)

    async def _receive_tail(
        self,
        session: PutSession,
        run: WireRun,
        tail: TailedMessage,
        committed: list[BlockEntry],
    ) -> None:
        """Receive a message's tail, `run`'s data (checked whole by the caller), a step of
        blocks at a time. A step's room is made once its first byte has come, so a
        client that stops sending holds room for one step at most. Its bytes land where
        the blocks store them when each block's layer is one slice of the arena, and
        otherwise go through a buffer, as any run's."""
        layer_bytes = session.layer_bytes
        async for first, stop in self._steps(session, committed, run.num_blocks):
            first_block, num_blocks = run.first_block + first, stop - first
            await tail.arriving()
            for block_index in range(first_block, first_block + num_blocks):
                await self._make_room(session, block_index)
            checksums = run.layer_checksums[first:stop]
            nbytes = num_blocks * layer_bytes
            views = session.landing_views(first_block, num_blocks, run.layer, nbytes, num_blocks)
            if views is None:
                data = await tail.receive(nbytes)
                session.write_run(first_block, num_blocks, run.layer, data, checksums)
            else:
                await tail.receive_into(views)
                session.land_run(first_block, num_blocks, run.layer, views, checksums)

    async def _steps(
        self, session: PutSession, committed: list[BlockEntry], num_blocks: int
    ) -> AsyncIterator[tuple[int, int]]:
        """(first, stop) of each BLOCKS_PER_STEP blocks of a run; between them, the blocks
        committed so far go to the write policy and the loop runs other requests."""
        for first in range(0, num_blocks, BLOCKS_PER_STEP):
            if first:
                self._take_committed(session, committed)
                await asyncio.sleep(0)
            yield first, min(first + BLOCKS_PER_STEP, num_blocks)

    def _take_committed(self, session: PutSession, committed: list[BlockEntry]) -> None:
        """Hand the blocks committed so far to the write policy (write-through starts
        their files now), and keep them for the reply's durability."""
        newly_committed = session.take_committed()
        self._mover.on_committed(newly_committed)
        committed.extend(newly_committed)

    async def get(
        self,
        request: pb.GetBlocksRequest | MalformedRequest,
        caller: Caller = OPEN,
        *,
        may_compress: bool = True,
    ) -> AsyncGenerator[WireParts, None]:
        """A whole get by `caller` as wire parts, one list a message; raises on bad input
        or a namespace not the caller's. Where the request asks for LZ4_SHUFFLE (and
        `may_compress`: not through shared memory), chunks and runs that shrink travel
        compressed, encoded on a thread.

        The blocks stay pinned, and the arena views valid, until the generator is
        closed: the transport sends each message before it asks for the next.
        """
        started_s = time.perf_counter()
        session: ReadSession | None = None
        slot: str | None = None
        try:
            request, namespace, keys = open_keyed_request(request, self._limits.max_keys)
            caller.authorize(namespace.tenant)
            slot = self._claim_slot(namespace.tenant)
            chunk_bytes = self._chunk_bytes_for(request.max_chunk_bytes)
            session = ReadSession(self._store, namespace, keys)
            await session.load(self._mover)
            kind = session.entries[0].checksum_kind_value if session.entries else 0
            header = encode_get_header(
                checksum_kind=kind,
                block_bytes=namespace.layout.block_bytes,
                num_blocks=session.num_blocks,
                tiers=[tier.value for tier in session.tiers],
            )
            encoder = None
            if may_compress and request.wire_compression == LZ4_SHUFFLE:
                encoder = WireEncoder(namespace.layout.dtype.itemsize)
            if uses_runs(namespace.layout, chunk_bytes):
                messages = _run_messages(session, chunk_bytes, header, encoder)
            else:
                messages = _chunk_messages(session, chunk_bytes, header, kind, encoder)
            tiers = session.tiers
            async for parts in messages:
                # Paced before it is sent, on both transports (`[store] read_bytes_per_s`).
                await self._throttle.pace(tiers, _payload_bytes(parts))
                yield parts
            if self.request_metrics is not None:
                self.request_metrics.observe_get(
                    time.perf_counter() - started_s,
                    len(session.entries) * namespace.layout.block_bytes,
                )
        finally:
            if session is not None:
                session.close()
            self._free_slot(slot)

    def _chunk_bytes_for(self, requested_bytes: int) -> int:
        """The bytes of layer data in one get message: what the client asked for
        (0: the server's default), clamped into [min_chunk_bytes, max_chunk_bytes]: a
        message stays inside the limit, and a tiny request cannot make the server
        spend a message, and its fixed cost, on every few bytes."""
        limits = self._limits
        requested_bytes = requested_bytes or limits.default_chunk_bytes
        return min(max(requested_bytes, limits.min_chunk_bytes), limits.max_chunk_bytes)


def _payload_bytes(parts: WireParts) -> int:
    return sum(part.nbytes if isinstance(part, memoryview) else len(part) for part in parts)


def _blocks_written(
    message: PutMessage, num_declared: int, but: WireRun | None = None
) -> Iterator[int]:
    """The declared blocks the message's chunks and runs (but `but`) write to, each run
    clipped to the declared blocks (a bad index is answered when the chunk is applied)."""
    for chunk in message.chunks:
        yield chunk.block_index
    for run in message.runs:
        if run is not but:
            yield from range(run.first_block, min(run.first_block + run.num_blocks, num_declared))


async def _encoded(
    encoder: WireEncoder | None, views: list[memoryview]
) -> tuple[int, int, list[memoryview | bytes]]:
    """(compression, raw bytes, data parts) of one chunk or run: compressed on a thread
    (lz4 and numpy release the GIL), so lookups are not held up meanwhile."""
    if encoder is None:
        return 0, 0, list(views)
    return await asyncio.to_thread(encoder.encode, views)


async def _run_messages(
    session: ReadSession, chunk_bytes: int, header: bytes, encoder: WireEncoder | None
) -> AsyncIterator[WireParts]:
    """Runs of whole small layers, the first message carrying the stream header. Once
    every block is in memory, as many runs go in a message as fit `chunk_bytes` (a get
    of a few blocks is a few messages, not one per layer); while blocks still come off
    the SSD, a run goes out as soon as it is made, so that none waits for the next."""
    sent = False
    declared = session.num_blocks
    message: WireParts = []
    message_bytes = message_kind = 0
    async for run in session.stream_runs(chunk_bytes):
        data: Sequence[memoryview | bytes]
        if encoder is None:  # the common case, a run per layer: no coroutine for it
            compression, raw_bytes, data = 0, 0, run.views
        else:
            compression, raw_bytes, data = await _encoded(encoder, list(run.views))
        parts = run_parts(
            GET_RUNS,
            run.layer,
            run.first_block,
            run.layer_checksums,
            data,
            compression=compression,
            raw_bytes=raw_bytes,
        )
        parts_bytes = _payload_bytes(parts)
        if message and (
            run.checksum_kind_value != message_kind or message_bytes + parts_bytes > chunk_bytes
        ):
            yield message
            message = []
        if not message:
            # A message carries the kind of the checksums in it, and says so.
            if not sent:
                prefix = header
            elif session.num_blocks != declared:
                declared = session.num_blocks
                prefix = _shortened_header(run.checksum_kind_value, declared)
            else:
                prefix = encode_get_header(checksum_kind=run.checksum_kind_value)
            sent = True
            message, message_bytes = [prefix], len(prefix)
            message_kind = run.checksum_kind_value
        message.extend(parts)
        message_bytes += parts_bytes
        if not session.in_memory:
            yield message
            message = []
    if message:
        yield message
    if not sent:
        yield [header]
    elif session.num_blocks != declared:
        yield [_shortened_header(0, session.num_blocks)]


async def _chunk_messages(
    session: ReadSession,
    chunk_bytes: int,
    header: bytes,
    kind: int,
    encoder: WireEncoder | None,
) -> AsyncIterator[WireParts]:
    """Messages of about `chunk_bytes` of layer chunks; the first carries the stream header.

    A chunk whose checksum kind differs from the message's starts a new message: each
    message carries the kind of the checksums in it; so does a shorter served prefix.
    """
    parts: WireParts = [header]
    message_bytes = 0
    declared = session.num_blocks
    async for chunk in session.stream_chunks(chunk_bytes):
        shortened = session.num_blocks != declared
        if shortened or (
            message_bytes
            and (message_bytes + chunk.nbytes > chunk_bytes or chunk.checksum_kind_value != kind)
        ):
            yield parts
            kind = chunk.checksum_kind_value
            if shortened:
                declared = session.num_blocks
                parts = [_shortened_header(kind, declared)]
            else:
                parts = [encode_get_header(checksum_kind=kind)]
            message_bytes = 0
        compression, raw_bytes, data = await _encoded(encoder, list(chunk.views))
        parts.extend(
            chunk_parts(
                GET_CHUNKS,
                chunk.block_index,
                chunk.layer,
                chunk.offset,
                chunk.layer_checksum,
                data,
                compression=compression,
                raw_bytes=raw_bytes,
            )
        )
        message_bytes += chunk.nbytes
    yield parts
    if session.num_blocks != declared:
        yield [_shortened_header(kind, session.num_blocks)]


def _shortened_header(checksum_kind: int, num_blocks: int) -> bytes:
    """A block was found unreadable while layer 0 streamed: from this message on, the
    get serves only its first `num_blocks` blocks (the client has completed no layer);
    none at all when the first block was the one."""
    return encode_get_header(
        checksum_kind=checksum_kind, num_blocks=num_blocks, served_none=num_blocks == 0
    )
