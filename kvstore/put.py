"""PutSession: receives the blocks of one PutBlocks stream and commits the verified ones.

A declared block reserves its DRAM pages when its first bytes arrive, not when it is
declared: declaring costs nothing, and what one put holds of DRAM is bounded by the
bytes it has sent and by `StoreConfig.max_put_reserved_bytes`. Chunks of each (block,
layer) must arrive in order; each layer's checksum is computed as its bytes arrive and
compared when the layer is complete. A block commits, and becomes visible to lookups,
when every layer has been verified and its parent is stored. Whatever is still in
flight when the session is aborted is freed.

A block declared with `parent_remote` continues a chain whose parent may live on another
node (a cluster places a chain's runs on different members): it links to its parent when
the parent is stored here, and otherwise commits as the root of a chain on this node,
rather than as PARENT_MISSING. Nothing here remembers the remote parent: every
per-node invariant (a child's parent is stored, eviction takes chain tails, a delete
takes the subtree) holds with the block as a root. Its entry's `chain_root` is False,
which tells it from a chain's true first block, put with no parent key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.census import TenantUsage
from kvstore.checksum import (
    ChecksumKind,
    Hasher,
    checksum_of_parts,
    checksums_of,
    new_hasher,
)
from kvstore.enums import PutOutcome, TierKind
from kvstore.errors import CapacityExhausted, ChecksumMismatch, InvalidRequest
from kvstore.index import BlockEntry, NamespaceState
from kvstore.keys import validate_key
from kvstore.layout import Namespace
from kvstore.store import BlockStore

MAX_BLOCKS_PER_PUT = 1 << 16


@dataclass(slots=True, eq=False)
class _PendingBlock:
    index: int
    key: bytes
    parent_key: bytes
    # The parent may be on another node: a parent not stored here at commit makes the
    # block a local root instead of PARENT_MISSING.
    parent_remote: bool
    # Its DRAM while it is being received: None before its first bytes (`start`), and
    # for a block whose bytes are verified but not kept (duplicate or orphan).
    handle: object | None
    outcome: PutOutcome | None
    layer_filled: list[int]
    layer_expected: list[int | None]
    hashers: list[Hasher | None]
    layer_checksums: list[int] = field(default_factory=list)
    layers_done: int = 0
    complete: bool = False


class PutSession:
    def __init__(
        self, store: BlockStore, namespace: Namespace, checksum_kind: ChecksumKind
    ) -> None:
        self._store = store
        self._pool = store.pool
        # Every block's bytes land here first.
        self._dram = store.pool.dram
        self._namespace = namespace
        self._layout = namespace.layout
        self._reserved_limit_bytes = store.config.put_reserved_limit_bytes
        self._num_started = 0  # blocks holding DRAM that have not committed or dropped
        dram_bytes = self._dram.capacity_bytes
        if self._layout.block_bytes > dram_bytes:
            # Refused before anything is reserved or evicted: no block could ever fit.
            raise CapacityExhausted(
                f"a block of {self._layout.block_bytes} B is larger than the whole DRAM tier "
                f"({dram_bytes} B); give the tier more memory or use smaller blocks"
            )
        self._state: NamespaceState = store.pool.open_namespace(namespace)
        self._checksum_kind = checksum_kind
        self._blocks: list[_PendingBlock] = []
        self._by_key: dict[bytes, _PendingBlock] = {}
        self._pinned_parents: list[BlockEntry] = []
        # Keys that blocks of this put name as their parent: such a block, once
        # committed, stays pinned until the put ends, so its children can commit.
        self._parent_keys: set[bytes] = set()
        # Complete blocks whose parent, declared in this put, has not settled yet.
        self._waiting: dict[bytes, list[_PendingBlock]] = {}
        # Committed since the last take_committed(): the caller hands them to the mover.
        self._committed: list[BlockEntry] = []
        self._closed = False

    @property
    def layer_bytes(self) -> int:
        return self._layout.layer_bytes

    @property
    def block_bytes(self) -> int:
        return self._layout.block_bytes

    @property
    def usage(self) -> TenantUsage:
        """The put's tenant's share of the store (what its room counts against)."""
        return self._state.usage

    @property
    def num_declared(self) -> int:
        return len(self._blocks)

    def declare(self, key: bytes, parent_key: bytes, *, parent_remote: bool = False) -> None:
        """Declare the next block; `parent_remote`: its parent may be stored on another
        node (see the module docstring)."""
        name = f"blocks[{len(self._blocks)}]"
        validate_key(key, f"{name}.key")
        if parent_key:
            validate_key(parent_key, f"{name}.parent_key")
        elif parent_remote:
            raise InvalidRequest(
                f"{name} (key {key.hex()}) sets parent_remote but has no parent_key; name the "
                f"parent the block continues, or clear parent_remote for a chain's first block"
            )
        if key in self._by_key:
            raise InvalidRequest(f"block key {key.hex()} is declared twice in one put")
        if key == parent_key:
            raise InvalidRequest(f"block key {key.hex()} names itself as its parent")
        if len(self._blocks) >= MAX_BLOCKS_PER_PUT:
            raise InvalidRequest(f"a put may declare at most {MAX_BLOCKS_PER_PUT} blocks")
        outcome = self._outcome_at_declare(key, parent_key, parent_remote)
        if parent_key:
            self._parent_keys.add(parent_key)
        num_layers = self._layout.num_layers
        block = _PendingBlock(
            index=len(self._blocks),
            key=key,
            parent_key=parent_key,
            parent_remote=parent_remote,
            handle=None,
            outcome=outcome,
            layer_filled=[0] * num_layers,
            layer_expected=[None] * num_layers,
            hashers=[None] * num_layers,
            layer_checksums=[0] * num_layers,
        )
        self._blocks.append(block)
        self._by_key[key] = block

    def _outcome_at_declare(
        self, key: bytes, parent_key: bytes, parent_remote: bool
    ) -> PutOutcome | None:
        existing = self._state.blocks.get(key)
        if existing is not None:
            # Children declared later in this put chain from it: keep it resident.
            self._pin_until_close(existing)
            return PutOutcome.ALREADY_PRESENT
        if not parent_key or parent_key in self._by_key:
            return None
        parent = self._state.blocks.get(parent_key)
        if parent is None:
            return None if parent_remote else PutOutcome.PARENT_MISSING
        self._pin_until_close(parent)
        return None

    def needs_room(self, block_index: int) -> bool:
        """Whether the declared block still needs its DRAM before its first bytes (see
        `start`); the caller may first wait for room (kvstore.mover.TierMover.ensure_room).

        Raises CapacityExhausted when starting it would take this put past its limit.
        """
        if not 0 <= block_index < len(self._blocks):
            return False  # write() answers the bad index
        block = self._blocks[block_index]
        if block.outcome is not None or block.handle is not None:
            return False
        held_bytes = self._num_started * self.block_bytes
        # One block at a time is always allowed: the namespace's layout bounds its size.
        if held_bytes and held_bytes + self.block_bytes > self._reserved_limit_bytes:
            raise CapacityExhausted(
                f"this put holds {self._num_started} blocks ({held_bytes} B) that it has "
                f"started but not completed; one put may hold at most "
                f"{self._reserved_limit_bytes} B of them (store.max_put_reserved_bytes): send "
                f"whole blocks in order, or fewer blocks per put"
            )
        return True

    def start(self, block_index: int) -> None:
        """Reserve the block's DRAM (evicting if need be), if `needs_room` says it needs it."""
        if self.needs_room(block_index):
            self._start(self._blocks[block_index])

    def _start(self, block: _PendingBlock) -> None:
        block.handle = self._pool.reserve_for_put(self.block_bytes, self._state.usage)
        self._num_started += 1

    def _pin_until_close(self, entry: BlockEntry) -> None:
        self._pool.acquire_read([entry])
        self._pinned_parents.append(entry)

    def check_chunk(self, block_index: int, layer: int, offset: int, nbytes: int) -> None:
        """What can be checked of a chunk before anything is written: InvalidRequest if it
        names an undeclared block or a layer the layout lacks, is empty, or runs past its
        layer."""
        if not 0 <= block_index < len(self._blocks):
            raise InvalidRequest(
                f"chunk names block {block_index}, but {len(self._blocks)} blocks are declared; "
                f"declare a block in `blocks` before sending its chunks"
            )
        layout = self._layout
        if not 0 <= layer < layout.num_layers:
            raise InvalidRequest(
                f"chunk names layer {layer}; the namespace's layout has {layout.num_layers} layers"
            )
        if not nbytes:
            raise InvalidRequest(f"block {block_index} layer {layer}: empty chunk")
        if offset < 0 or offset + nbytes > layout.layer_bytes:
            raise InvalidRequest(
                f"block {block_index} layer {layer}: {offset + nbytes} bytes sent but a layer "
                f"is {layout.layer_bytes} bytes in this namespace's layout "
                f"(2 x {layout.block_tokens} tokens x {layout.num_kv_heads} heads x "
                f"{layout.head_dim} dims x {layout.dtype.itemsize} B)"
            )

    def check_run(
        self, first_block: int, num_blocks: int, layer: int, nbytes: int, num_checksums: int
    ) -> None:
        """What can be checked of a run before anything is written (see check_chunk)."""
        layout = self._layout
        if num_blocks < 1 or num_checksums != num_blocks:
            raise InvalidRequest(
                f"a run must name at least one block and carry one checksum per block; it names "
                f"{num_blocks} blocks and carries {num_checksums} checksums"
            )
        if first_block < 0 or first_block + num_blocks > len(self._blocks):
            raise InvalidRequest(
                f"run names blocks {first_block}..{first_block + num_blocks - 1}, but "
                f"{len(self._blocks)} blocks are declared; declare blocks before their bytes"
            )
        if not 0 <= layer < layout.num_layers:
            raise InvalidRequest(
                f"run names layer {layer}; the namespace's layout has {layout.num_layers} layers"
            )
        if nbytes != num_blocks * layout.layer_bytes:
            raise InvalidRequest(
                f"run of {num_blocks} blocks carries {nbytes} bytes, but a layer is "
                f"{layout.layer_bytes} bytes in this namespace's layout"
            )

    def write(
        self,
        block_index: int,
        layer: int,
        offset: int,
        data: bytes | memoryview,
        layer_checksum: int,
    ) -> None:
        self.check_chunk(block_index, layer, offset, len(data))
        block = self._blocks[block_index]
        layout = self._layout
        filled = block.layer_filled[layer]
        if offset != filled:
            raise InvalidRequest(
                f"block {block_index} layer {layer}: chunk offset {offset} but {filled} bytes "
                f"were sent; send each layer's chunks in order without gaps or overlap"
            )
        if block.outcome is None and block.handle is None:
            self.start(block_index)
        hasher = block.hashers[layer]
        if offset == 0:
            block.layer_expected[layer] = layer_checksum
            hasher = block.hashers[layer] = new_hasher(self._checksum_kind)
        assert hasher is not None
        if block.handle is not None:
            # Checked where it landed: the source may be a client's shared buffer, which
            # it can change between two reads of ours; what is stored is what is checked.
            offset_in_block = layer * layout.layer_bytes + offset
            for landed in self._dram.write_landed(block.handle, offset_in_block, data):
                hasher.update(landed)
        else:  # a block the store already holds: checked, not written
            hasher.update(data)
        block.layer_filled[layer] = filled + len(data)
        if block.layer_filled[layer] == layout.layer_bytes:
            self._finish_layer(block, layer, hasher.value())

    def write_run(
        self,
        first_block: int,
        num_blocks: int,
        layer: int,
        data: bytes | memoryview,
        layer_checksums: tuple[int, ...] | list[int],
    ) -> None:
        """Whole layer `layer` of `num_blocks` declared blocks, concatenated in `data`."""
        layout = self._layout
        layer_bytes = layout.layer_bytes
        self.check_run(first_block, num_blocks, layer, len(data), len(layer_checksums))
        view = memoryview(data)
        blocks = self._run_blocks(first_block, num_blocks, layer)
        # Copy, then check where the bytes landed: they are still in the cache (one read
        # of the source, not two), and what is verified is what is stored, even where the
        # source is a client's shared buffer that it changes meanwhile. A mismatch fails
        # the put, and its blocks never commit.
        kind = self._checksum_kind
        handles = [block.handle for block in blocks if block.handle is not None]
        offset = layer * layer_bytes
        if len(handles) == num_blocks:
            stored = self._dram.write_slices(handles, offset, view, layer_bytes)
            if len(stored) == num_blocks:  # one view per block: each layer in one page
                actual = checksums_of(kind, stored)
            else:  # layers that cross a page: each block's pieces, in order
                actual = _checksums_of_pieces(kind, stored, layer_bytes)
        else:  # blocks the store already holds are checked, not written
            actual = []
            for number, block in enumerate(blocks):
                part = view[number * layer_bytes : (number + 1) * layer_bytes]
                if block.handle is not None:
                    part_views = self._dram.write_landed(block.handle, offset, part)
                    actual.append(checksum_of_parts(kind, part_views))
                else:
                    actual.append(checksum_of_parts(kind, [part]))
        self._finish_run(blocks, layer, actual, layer_checksums)

    def landing_views(
        self, first_block: int, num_blocks: int, layer: int, nbytes: int, num_checksums: int
    ) -> list[memoryview] | None:
        """Where a run's bytes go, one writable view per block, for a caller that receives
        them in place and then calls `land_run`; checked as `write_run` checks. None where
        they cannot be received in place (a block the store already holds, whose bytes
        are checked, not written; a layer that crosses a page): send them to write_run."""
        self.check_run(first_block, num_blocks, layer, nbytes, num_checksums)
        blocks = self._run_blocks(first_block, num_blocks, layer)
        handles = [block.handle for block in blocks if block.handle is not None]
        if len(handles) != num_blocks:
            return None
        layer_bytes = self._layout.layer_bytes
        return self._dram.landing_slices(handles, layer * layer_bytes, layer_bytes)

    def land_run(
        self,
        first_block: int,
        num_blocks: int,
        layer: int,
        landed: list[memoryview],
        layer_checksums: tuple[int, ...] | list[int],
    ) -> None:
        """A run whose bytes were received into `landing_views`: check them where they
        are, and finish the blocks' layer as write_run does."""
        blocks = self._blocks[first_block : first_block + num_blocks]
        self._finish_run(blocks, layer, checksums_of(self._checksum_kind, landed), layer_checksums)

    def _run_blocks(self, first_block: int, num_blocks: int, layer: int) -> list[_PendingBlock]:
        """A checked run's blocks, each started (room made) unless already stored; none
        may have had this layer already."""
        blocks = self._blocks[first_block : first_block + num_blocks]
        for block in blocks:
            if block.layer_filled[layer]:
                raise InvalidRequest(
                    f"block {block.index} layer {layer} was already sent; send each layer once"
                )
        for block in blocks:
            if block.outcome is None and block.handle is None:
                self.start(block.index)
        return blocks

    def _finish_run(
        self,
        blocks: list[_PendingBlock],
        layer: int,
        actual: list[int],
        layer_checksums: tuple[int, ...] | list[int],
    ) -> None:
        """A run's layer is in place and `actual` its checksums: a mismatch fails the
        put, and otherwise the layer is done in each block."""
        layer_bytes = self._layout.layer_bytes
        if actual != list(layer_checksums):
            for block, expected, got in zip(blocks, layer_checksums, actual, strict=True):
                block.layer_expected[layer] = expected
                block.layer_filled[layer] = layer_bytes
                self._finish_layer(block, layer, got)  # raises at the first mismatch
            raise AssertionError("unreachable: the lists differ, so one checksum does")
        # Every checksum matched: _finish_layer's work, inlined. A layer sent whole was
        # never started by a chunk (layer_filled was 0), so it has no hasher to drop.
        num_layers = self._layout.num_layers
        for block, got in zip(blocks, actual, strict=True):
            block.layer_filled[layer] = layer_bytes
            block.layer_checksums[layer] = got
            block.layers_done += 1
            if block.layers_done == num_layers:
                block.complete = True
                self._commit_ready(block)

    def _finish_layer(self, block: _PendingBlock, layer: int, actual: int) -> None:
        expected = block.layer_expected[layer]
        block.hashers[layer] = None
        if actual != expected:
            self._store.counters.checksum_failures += 1
            raise ChecksumMismatch(
                f"block {block.index} (key {block.key.hex()}) layer {layer}: checksum "
                f"{self._checksum_kind.name} is {actual:#018x} but the sender said "
                f"{expected or 0:#018x}; the block was not stored"
            )
        block.layer_checksums[layer] = actual
        block.layers_done += 1
        if block.layers_done == self._layout.num_layers:
            block.complete = True
            self._commit_ready(block)

    def _commit_ready(self, block: _PendingBlock) -> None:
        """Commit `block` once its parent is settled, then the children that waited on it."""
        ready = [block]
        while ready:
            current = ready.pop()
            if current.outcome is None:
                parent = self._resolve_parent(current)
                if parent is _WAIT:
                    self._waiting.setdefault(current.parent_key, []).append(current)
                    continue
                self._commit(current, parent)
            ready.extend(self._waiting.pop(current.key, ()))

    def _resolve_parent(self, block: _PendingBlock) -> BlockEntry | object | None:
        if not block.parent_key:
            return None
        pending_parent = self._by_key.get(block.parent_key)
        # Only a parent declared earlier is waited for: a remote-parent block may name a
        # key declared after it, and two blocks must never wait on each other.
        if (
            pending_parent is not None
            and pending_parent.outcome is None
            and pending_parent.index < block.index
        ):
            return _WAIT
        parent = self._state.blocks.get(block.parent_key)
        if parent is None:
            return None if block.parent_remote else _MISSING
        return parent

    def _commit(self, block: _PendingBlock, parent: BlockEntry | object | None) -> None:
        if parent is _MISSING:
            self._drop(block, PutOutcome.PARENT_MISSING)
            return
        existing = self._state.blocks.get(block.key)
        if existing is not None:
            # Another put committed it meanwhile: as at declare, a parent of blocks still
            # to come stays resident until this put ends.
            if block.key in self._parent_keys:
                self._pin_until_close(existing)
            self._drop(block, PutOutcome.ALREADY_PRESENT)
            return
        assert block.handle is not None
        assert parent is None or isinstance(parent, BlockEntry)
        entry = BlockEntry(
            namespace=self._state,
            key=block.key,
            parent=parent,
            layer_checksums=block.layer_checksums,
            checksum_kind_value=self._checksum_kind.value,
            chain_root=not block.parent_key,
            copies={TierKind.DRAM: block.handle},
        )
        block.handle = None
        self._num_started -= 1
        self._pool.end_put_reservation(self.block_bytes, None, self._state.usage)
        block.outcome = PutOutcome.COMMITTED
        self._store.commit(entry)
        if block.key in self._parent_keys:
            self._pin_until_close(entry)
        self._committed.append(entry)

    def _drop(self, block: _PendingBlock, outcome: PutOutcome) -> None:
        if block.handle is not None:
            self._pool.end_put_reservation(self.block_bytes, block.handle, self._state.usage)
            self._num_started -= 1
            block.handle = None
        block.outcome = outcome

    def take_committed(self) -> list[BlockEntry]:
        """The blocks committed since the last call, for the write policy to act on
        (kvstore.mover.TierMover.on_committed)."""
        committed, self._committed = self._committed, []
        return committed

    def finish(self) -> list[PutOutcome]:
        """End the put; every declared block must have been sent in full."""
        incomplete = [block for block in self._blocks if not block.complete]
        if incomplete:
            first = incomplete[0]
            missing = [
                layer
                for layer, filled in enumerate(first.layer_filled)
                if filled != self._layout.layer_bytes
            ]
            self.abort()
            raise InvalidRequest(
                f"the put ended with {len(incomplete)} incomplete blocks: block {first.index} "
                f"(key {first.key.hex()}) lacks layers {missing[:8]}"
                f"{'...' if len(missing) > 8 else ''}; blocks before it that were complete "
                f"are stored"
            )
        self._close()
        outcomes = []
        for block in self._blocks:
            assert block.outcome is not None
            outcomes.append(block.outcome)
        return outcomes

    def abort(self) -> None:
        """Free every reservation; committed blocks stay. Safe to call twice."""
        if self._closed:
            return
        if any(block.outcome is None for block in self._blocks):
            self._store.counters.puts_abandoned += 1
        for block in self._blocks:
            if block.outcome is None:
                self._drop(block, PutOutcome.PARENT_MISSING)
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.release_read(self._pinned_parents)
            self._pinned_parents = []
            self._pool.close_namespace(self._state)


_WAIT = object()
_MISSING = object()


def _checksums_of_pieces(kind: ChecksumKind, pieces: list[memoryview], nbytes: int) -> list[int]:
    """One checksum per `nbytes` of `pieces`, which hold whole slices one after another
    (PageArena.read_slices: a slice's pieces never straddle two slices)."""
    checksums: list[int] = []
    group: list[memoryview] = []
    filled = 0
    for piece in pieces:
        group.append(piece)
        filled += len(piece)
        if filled == nbytes:
            checksums.append(checksum_of_parts(kind, group))
            group, filled = [], 0
    if group:
        raise AssertionError(f"landed pieces end {filled} bytes into a {nbytes}-byte slice")
    return checksums
