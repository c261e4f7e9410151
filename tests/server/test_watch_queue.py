"""A watcher's bounded queue (kvstore.server.watch) on a real BlockStore: the snapshot
first, numbered events, and a GAP with a fresh snapshot once it falls too far behind."""

from __future__ import annotations

import hashlib

import pytest

from kvstore.checksum import ChecksumKind, checksum
from kvstore.enums import PutOutcome, TierKind
from kvstore.errors import CapacityExhausted, InvalidRequest
from kvstore.events import BlockEventKind
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.put import PutSession
from kvstore.server.config import MAX_WATCH_EVENT_BYTES, Limits
from kvstore.server.watch import WatchHub
from kvstore.store import BlockStore, StoreConfig
from kvstore.v1 import kvstore_pb2 as pb

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
NS = Namespace(tenant="t", model_fingerprint="m", layout=LAYOUT)
OTHER_NS = Namespace(tenant="u", model_fingerprint="m", layout=LAYOUT)
K = BlockEventKind


def put(store: BlockStore, key: bytes, namespace: Namespace = NS) -> None:
    session = PutSession(store, namespace, ChecksumKind.XXH3_64)
    try:
        session.declare(key, b"")
        data = hashlib.sha256(key).digest()[: LAYOUT.layer_bytes].ljust(LAYOUT.layer_bytes, b"-")
        session.write(0, 0, 0, data, checksum(ChecksumKind.XXH3_64, data))
        assert session.finish() == [PutOutcome.COMMITTED]
    finally:
        session.abort()


@pytest.fixture
def store() -> BlockStore:
    return BlockStore(StoreConfig(dram_bytes=1 << 20, page_bytes=4096))


async def test_snapshot_then_live_events_numbered_from_one(store: BlockStore) -> None:
    put(store, b"a")
    put(store, b"b")
    hub = WatchHub(store, Limits(watch_queue_events=4))
    assert store.listener is None  # nobody watches: the store tells nobody
    with hub.watch(NS) as watcher:
        assert store.listener is hub
        put(store, b"c")
        put(store, b"x", OTHER_NS)  # another namespace's: not this watcher's
        first, events = await watcher.take(3)
        assert first == 1
        assert [(e.kind, e.key) for e in events] == [
            (K.SNAPSHOT, b"a"),
            (K.SNAPSHOT, b"b"),
            (K.SNAPSHOT_END, b""),
        ]
        first, events = await watcher.take(100)
        assert (first, [(e.kind, e.key, e.tier) for e in events]) == (
            4,
            [(K.STORED, b"c", TierKind.DRAM)],
        )
    assert store.listener is None
    assert hub.num_watchers == 0


async def test_a_snapshot_larger_than_the_queue_is_not_an_overflow(store: BlockStore) -> None:
    for index in range(10):
        put(store, b"k%d" % index)
    hub = WatchHub(store, Limits(watch_queue_events=2))
    with hub.watch(NS) as watcher:
        put(store, b"live-0")
        put(store, b"live-1")
        first, events = await watcher.take(100)
        assert first == 1
        assert [e.kind for e in events] == [K.SNAPSHOT] * 10 + [K.SNAPSHOT_END, K.STORED, K.STORED]
        assert watcher.num_gaps == 0


async def test_overflow_drops_the_queue_for_a_gap_and_a_fresh_snapshot(store: BlockStore) -> None:
    hub = WatchHub(store, Limits(watch_queue_events=3))
    with hub.watch(NS) as watcher:
        assert (await watcher.take(10))[0] == 1  # SNAPSHOT_END: number 1
        for index in range(5):  # numbers 2..6; the fourth overflows the queue of 3
            put(store, b"k%d" % index)
        assert watcher.num_gaps == 1
        first, events = await watcher.take(100)
        # Numbers 2..6 were dropped: the GAP is number 7, then the store as it is now.
        assert first == 7
        assert [(e.kind, e.key) for e in events] == [
            (K.GAP, b""),
            *[(K.SNAPSHOT, b"k%d" % index) for index in range(5)],
            (K.SNAPSHOT_END, b""),
        ]
        put(store, b"after")
        first, events = await watcher.take(100)
        assert (first, [e.key for e in events]) == (14, [b"after"])


def test_the_limits_refuse_a_watcher_with_a_clear_reason(store: BlockStore) -> None:
    hub = WatchHub(store, Limits(max_watchers=2, max_watchers_per_tenant=1))
    with hub.watch(NS):
        with pytest.raises(CapacityExhausted, match="max_watchers_per_tenant"), hub.watch(NS):
            pass
        third = Namespace(tenant="v", model_fingerprint="m", layout=LAYOUT)
        with (
            hub.watch(OTHER_NS),
            pytest.raises(CapacityExhausted, match=r"limits\.max_watchers\)"),
            hub.watch(third),
        ):
            pass
    assert hub.num_watchers == 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"watch_queue_events": 0}, "watch_queue_events must be >= 1"),
        ({"max_watchers": 0}, "max_watchers must be >= 1"),
        ({"max_watchers_per_tenant": 0}, "max_watchers_per_tenant must be >= 1"),
        ({"watch_batch_events": 0}, "watch_batch_events must be >= 1"),
    ],
)
def test_bad_watch_limits_are_refused_at_start_up(settings: dict[str, int], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        Limits(**settings)  # type: ignore[arg-type]


def test_a_message_never_holds_more_events_than_fit_in_the_message_limit() -> None:
    assert Limits().watch_message_events == 1024
    tight = Limits(max_message_bytes=64 << 10, default_chunk_bytes=60 << 10)
    assert tight.watch_message_events == (64 << 10) // MAX_WATCH_EVENT_BYTES
    # Two 64-byte keys, the largest kind and tier numbers, and every byte of framing.
    event = pb.BlockEvent(
        kind=pb.GAP, key=b"k" * 64, parent_key=b"p" * 64, tier=pb.SSD
    ).SerializeToString()
    reply = pb.WatchBlocksResponse(
        first_sequence=(1 << 64) - 1,
        events=[pb.BlockEvent.FromString(event)] * tight.watch_message_events,
    )
    assert reply.ByteSize() + 5 <= tight.max_message_bytes  # + gRPC's message header


async def test_a_snapshot_is_built_as_it_is_taken_and_ends_in_the_stores_view() -> None:
    # A watcher takes the namespace's entries at once but builds each SNAPSHOT event only
    # when it is taken: a block that moved meanwhile is sent where it is then, and the
    # live events behind the snapshot leave the view equal to the store either way.
    store = BlockStore(
        StoreConfig(dram_bytes=1 << 20, page_bytes=4096, hbm_bytes=1 << 16, hbm_device="cpu")
    )
    keys = [b"k%03d" % index for index in range(40)]
    for key in keys:
        put(store, key)
    hub = WatchHub(store, Limits(watch_queue_events=16))
    with hub.watch(NS) as watcher:
        first, head = await watcher.take(10)
        assert (first, [e.key for e in head]) == (1, keys[:10])
        # Promoted into HBM after the snapshot was taken, before its event was built.
        [promoted] = store.find_prefix(NS, [keys[30]])
        pool = store.pool
        pool.add_copy(promoted, TierKind.HBM, pool.allocate(TierKind.HBM, LAYOUT.block_bytes))
        store.delete(NS, [keys[20]])  # gone before its event was built
        put(store, b"late")
        first, rest = await watcher.take(100)
        assert first == 11
        events = head + rest
        assert [e.kind for e in events] == (
            [K.SNAPSHOT] * 40 + [K.SNAPSHOT_END, K.TIER_CHANGED, K.REMOVED, K.STORED]
        )
        assert (events[30].key, events[30].tier) == (keys[30], TierKind.HBM)
        assert (events[20].key, events[20].tier) == (keys[20], TierKind.DRAM)
        view: dict[bytes, TierKind | None] = {}
        for event in events:
            if event.kind in (K.SNAPSHOT, K.STORED, K.TIER_CHANGED):
                view[event.key] = event.tier
            elif event.kind is K.REMOVED:
                del view[event.key]
        assert view == {entry.key: entry.fastest for entry in store.snapshot_entries(NS)}
        assert len(view) == 40  # 40 put, one deleted, one late
