"""The block index: namespaces, their committed blocks and the chain links between them."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import takewhile
from typing import cast

from kvstore.layout import Namespace
from kvstore.tiers.base import TierKind


@dataclass(slots=True, eq=False)
class BlockEntry:
    """One committed block. Identity, not value, makes two entries equal."""

    namespace: NamespaceState
    key: bytes
    parent: BlockEntry | None
    layer_checksums: list[int]
    checksum_kind_value: int
    # Handles of the copies this block has, per tier. A block is findable while
    # it has at least one copy. Change it only through add_copy/take_copy, which
    # keep `fastest` right: lookups read that once per block.
    copies: dict[TierKind, object] = field(default_factory=dict)
    fastest: TierKind = field(init=False, default=TierKind.DRAM)
    depth: int = 0
    num_children: int = 0
    read_pins: int = 0
    lease_expiry: float = 0.0  # monotonic seconds; 0 when never leased
    last_access: int = 0  # store-wide tick, larger is more recent
    num_hits: int = 0
    num_seen: int = 1  # the put, then every hit: what the SSD admission filter counts

    def __post_init__(self) -> None:
        if self.copies:
            self.fastest = min(self.copies)

    def add_copy(self, kind: TierKind, handle: object) -> None:
        self.copies[kind] = handle
        self.fastest = min(self.copies)  # TierKind orders fastest first

    def take_copy(self, kind: TierKind) -> object:
        """Remove and return the copy in `kind`'s tier."""
        handle = self.copies.pop(kind)
        if self.copies:
            self.fastest = min(self.copies)
        return handle

    def is_pinned(self, now: float) -> bool:
        return self.read_pins > 0 or self.lease_expiry > now

    def is_indexed(self) -> bool:
        return self.namespace.blocks.get(self.key) is self


@dataclass(slots=True, eq=False)
class NamespaceState:
    namespace: Namespace
    blocks: dict[bytes, BlockEntry] = field(default_factory=dict)


class BlockIndex:
    """Namespaces and their blocks. Holds no bytes; tiers do."""

    def __init__(self) -> None:
        self._namespaces: dict[Namespace, NamespaceState] = {}

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
            state = self._namespaces[namespace] = NamespaceState(namespace)
        return state

    def present_prefix(self, state: NamespaceState | None, keys: list[bytes]) -> list[BlockEntry]:
        """Entries of the longest prefix of `keys` that is stored, in order."""
        if state is None:
            return []
        # Entries are always truthy, so takewhile stops at the first missing key;
        # map and takewhile keep the per-key loop in C.
        present = takewhile(bool, map(state.blocks.get, keys))
        return cast(list[BlockEntry], list(present))

    def insert(self, entry: BlockEntry) -> None:
        entry.namespace.blocks[entry.key] = entry
        if entry.parent is not None:
            entry.parent.num_children += 1
            entry.depth = entry.parent.depth + 1

    def remove(self, entry: BlockEntry) -> BlockEntry | None:
        """Unlink a leaf; returns its parent when that parent just became a leaf."""
        if entry.num_children:
            raise AssertionError("only chain tails may leave the index")
        del entry.namespace.blocks[entry.key]
        parent = entry.parent
        if parent is None:
            return None
        parent.num_children -= 1
        return parent if parent.num_children == 0 else None

    def entries(self) -> list[BlockEntry]:
        return [entry for state in self._namespaces.values() for entry in state.blocks.values()]
