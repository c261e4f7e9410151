"""The block index: namespaces, their committed blocks and the chain links between them.

Every entry also sits on a `ChainPath`: the keys and entries from its chain's root down
to it, shared with the other entries of an unbranched run of the chain (a branch refers
to the stretch above it, so siblings under a deep block cost no copy of the chain). A
lookup of a whole chain then checks one entry's path against the request with a list
comparison per stretch (one for an unbranched chain) instead of probing the dict once
per key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice, takewhile
from typing import cast

from kvstore.census import BlockCensus, TenantUsage
from kvstore.enums import TierKind
from kvstore.layout import KVLayout, Namespace


@dataclass(slots=True, eq=False)
class BlockEntry:
    """One committed block. Identity, not value, makes two entries equal."""

    namespace: NamespaceState
    key: bytes
    parent: BlockEntry | None
    layer_checksums: list[int]
    checksum_kind_value: int
    # Put as a chain's first block (no parent key). False for a block put under a
    # parent, whether linked here or continuing one on another node (`parent` is None
    # then too), and for one restored from a block file that predates the mark: a
    # cluster client places what follows a chain's first block differently.
    chain_root: bool = False
    # Handles of the copies this block has, per tier. A block is findable while
    # it has at least one copy. Change it only through add_copy/take_copy, which
    # keep `fastest` right (lookups read that once per block) and the census's counts.
    copies: dict[TierKind, object] = field(default_factory=dict)
    fastest: TierKind = field(init=False, default=TierKind.DRAM)
    depth: int = 0
    num_children: int = 0
    # The indexed blocks that name this one as their parent (None while it has none):
    # a delete walks them instead of the whole namespace. A dict (insertion-ordered, by
    # identity) so that a child leaves in O(1): deleting a wide subtree stays linear.
    children: dict[BlockEntry, None] | None = field(default=None, repr=False)
    # Change these two only through BlockPool, which tells the census.
    read_pins: int = 0
    lease_expiry: float = 0.0  # monotonic seconds; 0 when never leased
    last_access: int = 0  # store-wide tick, larger is more recent
    num_hits: int = 0
    num_seen: int = 1  # the put, then every hit: what the SSD admission filter counts
    # Set by BlockIndex.insert, cleared by remove: the path's first depth + 1 keys are this
    # block's chain, root first.
    path: ChainPath | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.copies:
            self.fastest = min(self.copies)

    def add_copy(self, kind: TierKind, handle: object) -> None:
        copies = self.copies
        had = kind in copies
        copies[kind] = handle
        if not had:
            self.namespace.census.copy_added(self, kind, handle)
        self.fastest = min(copies)  # TierKind orders fastest first

    def take_copy(self, kind: TierKind) -> object:
        """Remove and return the copy in `kind`'s tier."""
        handle = self.copies.pop(kind)
        self.namespace.census.copy_taken(self, kind, handle)
        if self.copies:
            self.fastest = min(self.copies)
        return handle

    def is_pinned(self, now: float) -> bool:
        return self.read_pins > 0 or self.lease_expiry > now

    def is_indexed(self) -> bool:
        return self.namespace.blocks.get(self.key) is self

    @property
    def layout(self) -> KVLayout:
        """The layout of the block's namespace (its size, its layers)."""
        return self.namespace.namespace.layout


# A stretch of a chain held by another path's lists: (keys, entries, start, stop), list
# element i at depth start + i, depths [start, stop) of the chain.
_Segment = tuple[list[bytes], list["BlockEntry"], int, int]
# Branches off branches nest segments; past this many a new branch copies its chain
# instead, so a comparison never walks more than this many slices.
_MAX_SEGMENTS = 16


@dataclass(slots=True, eq=False)
class ChainPath:
    """Keys and entries of a chain from its root, shared by the entries along it.

    A path holds its own stretch of the chain, from depth `start` (its first entry's),
    and refers for the depths above it to stretches of the paths it branched from
    (`above`), so a branch costs what it adds, not a copy of the chain above it.

    Invariant: every element is an indexed entry, and the element at depth i is the
    parent of the one at i + 1. An entry at depth d whose path is P is P's element at
    depth d, so P's first d + 1 keys are its chain. Own stretches only grow at their end
    (a child of the last entry) and shrink at their end (that entry leaving, which
    eviction allows only for chain tails); a child of any other entry starts a new path.
    A stretch another path refers to ends at that path's first entry's parent, which
    keeps a child while the referring path has entries, so no element ever changes
    under an entry that relies on it.
    """

    keys: list[bytes]
    entries: list[BlockEntry]
    start: int = 0
    above: tuple[_Segment, ...] = ()

    @property
    def end(self) -> int:
        """The depth just past this path's last element."""
        return self.start + len(self.keys)

    def entry_at(self, depth: int) -> BlockEntry:
        if depth >= self.start:
            return self.entries[depth - self.start]
        for _, entries, start, stop in self.above:
            if depth < stop:
                return entries[depth - start]
        raise IndexError(depth)

    def segments(self, length: int) -> tuple[_Segment, ...]:
        """The stretches holding depths [0, length), root first."""
        found: list[_Segment] = []
        for keys, entries, start, stop in self.above:
            if start >= length:
                break
            found.append((keys, entries, start, min(stop, length)))
        if self.start < length:
            found.append((self.keys, self.entries, self.start, min(self.end, length)))
        return tuple(found)

    def keys_match(self, head: list[bytes], length: int) -> bool:
        """Whether the first `length` keys of this path are `head` (`length` long)."""
        if not self.above:
            return self.keys[:length] == head
        return all(
            keys[: stop - start] == head[start:stop]
            for keys, _, start, stop in self.segments(length)
        )

    def entries_to(self, length: int) -> list[BlockEntry]:
        """The entries at depths [0, length)."""
        if not self.above:
            return self.entries[:length]
        found: list[BlockEntry] = []
        for _, entries, start, stop in self.segments(length):
            found += entries[: stop - start]
        return found

    def branch(self, entry: BlockEntry) -> ChainPath:
        """A new path for `entry`, a child of this path's element at `entry.depth - 1`
        that is not its last."""
        above = self.segments(entry.depth)
        if len(above) < _MAX_SEGMENTS:
            return ChainPath([entry.key], [entry], entry.depth, above)
        keys: list[bytes] = []
        entries: list[BlockEntry] = []
        for segment_keys, segment_entries, start, stop in above:
            keys += segment_keys[: stop - start]
            entries += segment_entries[: stop - start]
        return ChainPath([*keys, entry.key], [*entries, entry])


@dataclass(slots=True, eq=False)
class NamespaceState:
    namespace: Namespace
    blocks: dict[bytes, BlockEntry] = field(default_factory=dict)
    # Puts open in the namespace: it is freed once this is 0 and `blocks` is empty.
    num_puts: int = 0
    # The index's census (shared by all its namespaces), which counts this one's blocks.
    census: BlockCensus = field(default_factory=BlockCensus, repr=False)
    # Its tenant's share of the store, which the census keeps.
    usage: TenantUsage = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.usage = self.census.open_tenant(self.namespace.tenant)


class BlockIndex:
    """Namespaces and their blocks. Holds no bytes; tiers do."""

    def __init__(self, census: BlockCensus | None = None) -> None:
        self._namespaces: dict[Namespace, NamespaceState] = {}
        self.census = census if census is not None else BlockCensus()

    def __len__(self) -> int:
        return sum(len(state.blocks) for state in self._namespaces.values())

    @property
    def num_namespaces(self) -> int:
        return len(self._namespaces)

    def find_namespace(self, namespace: Namespace) -> NamespaceState | None:
        return self._namespaces.get(namespace)

    def namespace(self, namespace: Namespace) -> NamespaceState:
        state = self._namespaces.get(namespace)
        if state is None:
            state = self._namespaces[namespace] = NamespaceState(namespace, census=self.census)
        return state

    def drop_namespace(self, state: NamespaceState) -> None:
        """Forget a namespace that holds nothing (no blocks, no puts)."""
        assert not state.blocks, "the namespace holds blocks"
        assert not state.num_puts, "the namespace has puts open"
        if self._namespaces.get(state.namespace) is state:
            del self._namespaces[state.namespace]
            self.census.close_tenant(state.usage)

    def present_prefix(self, state: NamespaceState | None, keys: list[bytes]) -> list[BlockEntry]:
        """Entries of the longest prefix of `keys` that is stored, in order."""
        if state is None or not keys:
            return []
        blocks = state.blocks
        found = _stored_chain_prefix(blocks, keys)
        if len(found) == len(keys):
            return found
        # Keys stored but not chained as the request chains them (blocks put under
        # caller-chosen parents) still count: probe the rest one by one. Entries are
        # always truthy, so takewhile stops at the first missing key; map and takewhile
        # keep the per-key loop in C.
        rest = takewhile(bool, map(blocks.get, islice(keys, len(found), None)))
        return found + cast(list[BlockEntry], list(rest))

    def insert(self, entry: BlockEntry) -> None:
        """Index an entry under a key its namespace does not hold yet."""
        blocks = entry.namespace.blocks
        # Replacing an entry would leave it counted by the census: callers check first.
        assert entry.key not in blocks, "the key is indexed already"
        blocks[entry.key] = entry
        parent = entry.parent
        if parent is None:
            entry.path = ChainPath([entry.key], [entry])
            entry.namespace.census.entered(entry)
            return
        parent.num_children += 1
        if parent.children is None:
            parent.children = {entry: None}
        else:
            parent.children[entry] = None
        entry.depth = parent.depth + 1
        path = parent.path
        assert path is not None, "the parent is not indexed"
        assert path.entry_at(parent.depth) is parent, "the parent is not indexed"
        if path.end == entry.depth:  # the parent ends its path: extend it
            path.keys.append(entry.key)
            path.entries.append(entry)
            entry.path = path
        else:
            entry.path = path.branch(entry)
        entry.namespace.census.entered(entry)

    def remove(self, entry: BlockEntry) -> BlockEntry | None:
        """Unlink a leaf; returns its parent when that parent just became a leaf."""
        if entry.num_children:
            raise AssertionError("only chain tails may leave the index")
        del entry.namespace.blocks[entry.key]
        path = entry.path
        assert path is not None, "the entry is not indexed"
        assert path.entries, "a chain tail ends its path"
        assert path.entries[-1] is entry, "a chain tail ends its path"
        path.keys.pop()
        path.entries.pop()
        entry.path = None
        entry.namespace.census.left(entry)
        parent = entry.parent
        if parent is None:
            return None
        parent.num_children -= 1
        assert parent.children is not None
        del parent.children[entry]
        if not parent.children:
            parent.children = None
        return parent if parent.num_children == 0 else None

    def entries(self) -> list[BlockEntry]:
        return [entry for state in self._namespaces.values() for entry in state.blocks.values()]


def _stored_chain_prefix(blocks: dict[bytes, BlockEntry], keys: list[bytes]) -> list[BlockEntry]:
    """Entries of the longest prefix of `keys` stored as one chain, root first.

    `keys[:n]` qualifies when the entry stored under `keys[n - 1]` has exactly that
    chain; then every shorter prefix qualifies too (its entries are that entry's
    ancestors), so a binary search finds the longest. A whole-chain hit costs one dict
    probe and one list comparison, both in C.
    """

    def chain_of(length: int) -> list[BlockEntry] | None:
        entry = blocks.get(keys[length - 1])
        if entry is None or entry.depth != length - 1:
            return None
        path = entry.path
        assert path is not None
        head = keys if length == len(keys) else keys[:length]
        if not path.keys_match(head, length):
            return None
        return path.entries_to(length)

    whole = chain_of(len(keys))
    if whole is not None:
        return whole
    found: list[BlockEntry] = []
    low, high = 0, len(keys) - 1  # the answer's length lies in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        chain = chain_of(middle)
        if chain is None:
            high = middle - 1
        else:
            low, found = middle, chain
    return found
