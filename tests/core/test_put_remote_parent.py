"""PutSession with `parent_remote`: a run whose parent may be stored on another node.

Every block of LAYOUT is one 512 B arena page; blocks are put whole through a real
PutSession on a real BlockStore.
"""

from __future__ import annotations

import hashlib

import pytest

from kvstore.checksum import ChecksumKind, checksum
from kvstore.enums import PutOutcome
from kvstore.errors import InvalidRequest
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.put import PutSession
from kvstore.store import BlockStore, StoreConfig

PAGE_BYTES = 512
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
NS = Namespace(tenant="t", model_fingerprint="m", layout=LAYOUT)
KIND = ChecksumKind.XXH3_64
# A chain's runs: P lives on another node; R0, R1 are this node's run after it.
P, R0, R1 = b"P", b"R0", b"R1"

Block = tuple[bytes, bytes, bool]  # key, parent_key, parent_remote


def make_store(num_pages: int = 8) -> BlockStore:
    assert LAYOUT.block_bytes == PAGE_BYTES
    return BlockStore(StoreConfig(dram_bytes=num_pages * PAGE_BYTES, page_bytes=PAGE_BYTES))


def layer_data(key: bytes, layer: int) -> bytes:
    seed = hashlib.sha256(key + bytes([layer])).digest()
    return (seed * (LAYOUT.layer_bytes // len(seed) + 1))[: LAYOUT.layer_bytes]


def send(session: PutSession, index: int, key: bytes) -> None:
    for layer in range(LAYOUT.num_layers):
        data = layer_data(key, layer)
        session.write(index, layer, 0, data, checksum(KIND, data))


def put(store: BlockStore, blocks: list[Block], order: list[int] | None = None) -> list[PutOutcome]:
    """Declare every block, send them whole in `order` (declaration order by default)."""
    session = PutSession(store, NS, KIND)
    try:
        for key, parent, remote in blocks:
            session.declare(key, parent, parent_remote=remote)
        for index in order if order is not None else range(len(blocks)):
            send(session, index, blocks[index][0])
        return session.finish()
    finally:
        session.abort()


def parent_of(store: BlockStore, key: bytes) -> bytes | None:
    """The key of the stored block's parent entry; None for a root."""
    (entry,) = store.find_prefix(NS, [key])
    return entry.parent.key if entry.parent is not None else None


def test_an_absent_remote_parent_makes_the_run_a_local_chain() -> None:
    store = make_store()
    outcomes = put(store, [(R0, P, True), (R1, R0, False)])
    assert outcomes == [PutOutcome.COMMITTED] * 2
    assert parent_of(store, R0) is None
    assert parent_of(store, R1) == R0
    assert store.lookup(NS, [R0, R1]).num_matched == 2
    assert store.lookup(NS, [P, R0, R1]).num_matched == 0  # P is not here


def test_without_parent_remote_an_absent_parent_is_still_missing() -> None:
    store = make_store()
    outcomes = put(store, [(R0, P, False), (R1, R0, False)])
    assert outcomes == [PutOutcome.PARENT_MISSING] * 2
    assert store.lookup(NS, [R0]).num_matched == 0
    assert store.dram.used_bytes == 0


def test_a_remote_parent_stored_here_is_linked_and_its_delete_takes_the_run() -> None:
    store = make_store()
    assert put(store, [(P, b"", False)]) == [PutOutcome.COMMITTED]
    assert put(store, [(R0, P, True), (R1, R0, False)]) == [PutOutcome.COMMITTED] * 2
    assert parent_of(store, R0) == P
    assert store.lookup(NS, [P, R0, R1]).num_matched == 3
    result = store.delete(NS, [P])
    assert (result.num_deleted, result.num_busy) == (3, 0)
    assert store.lookup(NS, [R0]).num_matched == 0


def test_a_remote_parent_present_at_declare_cannot_go_before_the_commit() -> None:
    store = make_store()
    put(store, [(P, b"", False)])
    session = PutSession(store, NS, KIND)
    try:
        session.declare(R0, P, parent_remote=True)
        # The parent is pinned from the declaration on: a delete meanwhile leaves it.
        assert store.delete(NS, [P]).num_busy == 1
        send(session, 0, R0)
        assert session.finish() == [PutOutcome.COMMITTED]
    finally:
        session.abort()
    assert parent_of(store, R0) == P
    # Unpinned once the put ended: now the delete takes the parent and the run.
    assert store.delete(NS, [P]).num_deleted == 2


def test_a_remote_rooted_block_is_deleted_by_its_own_key() -> None:
    store = make_store()
    put(store, [(R0, P, True), (R1, R0, False)])
    assert store.delete(NS, [P]).num_deleted == 0
    assert store.delete(NS, [R0]).num_deleted == 2
    assert store.dram.used_bytes == 0


def test_parent_remote_without_a_parent_key_is_refused() -> None:
    store = make_store()
    session = PutSession(store, NS, KIND)
    try:
        with pytest.raises(InvalidRequest, match=r"blocks\[0\].*parent_remote.*no parent_key"):
            session.declare(R0, b"", parent_remote=True)
        assert session.num_declared == 0
    finally:
        session.abort()


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_two_blocks_naming_each_other_commit_without_waiting_forever(order: list[int]) -> None:
    # R0 names R1, declared after it, as its remote parent; R1 names R0. Only a parent
    # declared earlier is waited for, so R0 commits as a root and R1 under it, in
    # whichever order their bytes arrive.
    store = make_store()
    outcomes = put(store, [(R0, R1, True), (R1, R0, False)], order)
    assert outcomes == [PutOutcome.COMMITTED] * 2
    assert parent_of(store, R0) is None
    assert parent_of(store, R1) == R0


def test_a_remote_parent_dropped_earlier_in_the_put_leaves_a_root() -> None:
    store = make_store()
    outcomes = put(store, [(P, b"absent", False), (R0, P, True)])
    assert outcomes == [PutOutcome.PARENT_MISSING, PutOutcome.COMMITTED]
    assert parent_of(store, R0) is None


def test_a_remote_parent_committed_earlier_in_the_put_is_linked() -> None:
    store = make_store()
    outcomes = put(store, [(P, b"", False), (R0, P, True)], order=[1, 0])
    assert outcomes == [PutOutcome.COMMITTED] * 2
    assert parent_of(store, R0) == P  # R0 waited for P, declared before it


def test_only_a_block_put_without_a_parent_key_is_a_chains_root() -> None:
    store = make_store()
    put(store, [(b"C0", b"", False), (b"C1", b"C0", False)])
    put(store, [(R0, P, True), (R1, R0, False)])
    (c0, c1, r0, r1) = (store.find_prefix(NS, [key])[0] for key in (b"C0", b"C1", R0, R1))
    assert [c0.chain_root, c1.chain_root, r0.chain_root, r1.chain_root] == [True] + [False] * 3
    assert r0.parent is None  # a root on this node all the same
    assert store.lookup(NS, [b"C0", b"C1"]).first_is_chain_root
    assert not store.lookup(NS, [R0, R1]).first_is_chain_root
    assert not store.lookup(NS, [b"C1"]).first_is_chain_root
    assert not store.lookup(NS, [b"absent"]).first_is_chain_root
