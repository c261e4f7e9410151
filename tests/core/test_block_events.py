"""The core's event seam (kvstore.events): BlockPool tells its listener of every change to
what lookups find, in order, so replaying the events gives exactly the stored set.

Every block of LAYOUT is one 512 B page: a store of N pages holds N blocks, and each new
block past that evicts exactly one chain tail.
"""

from __future__ import annotations

import hashlib

from kvstore.checksum import ChecksumKind, checksum
from kvstore.enums import PutOutcome, TierKind
from kvstore.events import BlockEvent, BlockEventKind
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.put import PutSession
from kvstore.store import BlockStore, StoreConfig

PAGE_BYTES = 512
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
NS = Namespace(tenant="t", model_fingerprint="m", layout=LAYOUT)
OTHER_NS = Namespace(tenant="t", model_fingerprint="other", layout=LAYOUT)
STORED, REMOVED = BlockEventKind.STORED, BlockEventKind.REMOVED


class Recorder:
    """A listener that keeps what it is told, per namespace."""

    def __init__(self) -> None:
        self.events: list[tuple[Namespace, BlockEvent]] = []

    def block_changed(
        self,
        namespace: Namespace,
        kind: BlockEventKind,
        key: bytes,
        parent_key: bytes,
        tier: TierKind | None,
    ) -> None:
        self.events.append((namespace, BlockEvent(kind, key, parent_key, tier)))

    def of(self, namespace: Namespace) -> list[BlockEvent]:
        return [event for where, event in self.events if where == namespace]


def make_store(num_pages: int) -> BlockStore:
    return BlockStore(StoreConfig(dram_bytes=num_pages * PAGE_BYTES, page_bytes=PAGE_BYTES))


def put(store: BlockStore, blocks: list[tuple[bytes, bytes]], namespace: Namespace = NS) -> None:
    session = PutSession(store, namespace, ChecksumKind.XXH3_64)
    try:
        for key, parent in blocks:
            session.declare(key, parent)
        for index, (key, _) in enumerate(blocks):
            for layer in range(LAYOUT.num_layers):
                seed = hashlib.sha256(key + bytes([layer])).digest()
                data = (seed * (LAYOUT.layer_bytes // len(seed) + 1))[: LAYOUT.layer_bytes]
                session.write(index, layer, 0, data, checksum(ChecksumKind.XXH3_64, data))
        assert session.finish() == [PutOutcome.COMMITTED] * len(blocks)
    finally:
        session.abort()


def replay(events: list[BlockEvent]) -> dict[bytes, tuple[bytes, TierKind | None]]:
    view: dict[bytes, tuple[bytes, TierKind | None]] = {}
    for event in events:
        if event.kind is STORED:
            view[event.key] = (event.parent_key, event.tier)
        elif event.kind is REMOVED:
            del view[event.key]  # a REMOVED always names a block the events stored
        else:
            view[event.key] = (view[event.key][0], event.tier)
    return view


def stored(store: BlockStore, namespace: Namespace = NS) -> dict[bytes, tuple[bytes, TierKind]]:
    return {
        event.key: (event.parent_key, event.tier)
        for event in store.snapshot(namespace)
        if event.tier is not None
    }


def test_commits_evictions_and_deletes_are_told_in_order() -> None:
    store = make_store(4)
    recorder = Recorder()
    store.listener = recorder
    put(store, [(b"A", b""), (b"B", b"A"), (b"C", b"B")])
    put(store, [(b"X", b"")])
    assert recorder.of(NS) == [
        BlockEvent(STORED, b"A", b"", TierKind.DRAM),
        BlockEvent(STORED, b"B", b"A", TierKind.DRAM),
        BlockEvent(STORED, b"C", b"B", TierKind.DRAM),
        BlockEvent(STORED, b"X", b"", TierKind.DRAM),
    ]
    # Full: the next block evicts the coldest chain tail, C, before it is stored.
    put(store, [(b"Y", b"X")])
    assert recorder.of(NS)[4:] == [
        BlockEvent(REMOVED, b"C"),
        BlockEvent(STORED, b"Y", b"X", TierKind.DRAM),
    ]
    # A delete takes the subtree deepest first.
    assert store.delete(NS, [b"X"]).num_deleted == 2
    assert recorder.of(NS)[6:] == [BlockEvent(REMOVED, b"Y"), BlockEvent(REMOVED, b"X")]
    assert (
        replay(recorder.of(NS))
        == stored(store)
        == {
            b"A": (b"", TierKind.DRAM),
            b"B": (b"A", TierKind.DRAM),
        }
    )


def test_each_event_names_its_namespace_and_a_detached_listener_hears_nothing() -> None:
    store = make_store(8)
    recorder = Recorder()
    store.listener = recorder
    put(store, [(b"A", b"")])
    put(store, [(b"A", b"")], namespace=OTHER_NS)
    assert [where for where, _ in recorder.events] == [NS, OTHER_NS]
    store.listener = None
    put(store, [(b"B", b"A")])
    assert len(recorder.events) == 2


def test_a_long_churn_replays_to_the_stored_set() -> None:
    store = make_store(6)
    recorder = Recorder()
    store.listener = recorder
    for index in range(40):
        parent = f"k{index - 1}".encode() if index % 3 else b""
        if parent and not store.lookup(NS, [parent]).num_matched:
            parent = b""
        put(store, [(f"k{index}".encode(), parent)])
        if index % 7 == 0:
            store.lookup(NS, [b"k0", b"k1"])
    assert replay(recorder.of(NS)) == stored(store)
    assert sum(event.kind is REMOVED for event in recorder.of(NS)) == 40 - len(stored(store))
