"""kvstore.server.gc_policy on a real store and a real daemon: what survives young
collections leaves the full collection's walk, a cycle that died frozen is found by the
policy's full collection, and a daemon runs the policy from its settings."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from kvstore.checksum import ChecksumKind, checksum
from kvstore.errors import InvalidRequest
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.put import PutSession
from kvstore.server import build_server, load_config
from kvstore.server.gc_policy import GcPolicy
from kvstore.store import BlockStore, StoreConfig

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
NS = Namespace(tenant="t", model_fingerprint="gc", layout=LAYOUT)
NUM_BLOCKS = 5000


def filled_store(num_blocks: int) -> BlockStore:
    store = BlockStore(StoreConfig(dram_bytes=num_blocks * 4096, page_bytes=4096))
    data = bytes(LAYOUT.layer_bytes)
    digest = checksum(ChecksumKind.XXH3_64, data)
    session = PutSession(store, NS, ChecksumKind.XXH3_64)
    try:
        parent = b""
        for index in range(num_blocks):
            key = b"block-%d" % index
            session.declare(key, parent)
            session.write(index, 0, 0, data, digest)
            parent = key
        session.finish()
    finally:
        session.abort()
    return store


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_a_freeze_takes_the_index_out_of_the_full_collections_walk(unfrozen: None) -> None:
    store = filled_store(NUM_BLOCKS)
    gc.collect()
    assert len(gc.get_objects(generation=2)) > NUM_BLOCKS  # every entry is walked
    GcPolicy(freeze_interval_s=1, full_interval_s=0).freeze()
    assert gc.get_freeze_count() > NUM_BLOCKS
    assert len(gc.get_objects(generation=2)) < NUM_BLOCKS // 10
    assert len(store.snapshot_entries(NS)) == NUM_BLOCKS


def test_a_cycle_that_dies_frozen_waits_for_the_full_collection(unfrozen: None) -> None:
    policy = GcPolicy(freeze_interval_s=1, full_interval_s=0)
    cycle = Cycle()
    alive = weakref.ref(cycle)
    policy.freeze()
    del cycle
    gc.collect()
    assert alive() is not None  # frozen: the collector does not walk it
    assert policy.collect_all() >= 1
    assert alive() is None
    assert gc.get_freeze_count() > 0  # frozen again after the full collection


async def test_a_daemon_freezes_on_its_interval_and_thaws_when_it_drains(
    unfrozen: None,
) -> None:
    settings = {"listen": "127.0.0.1:0", "log_level": "warning", "shm_socket": "off"}
    thresholds = gc.get_threshold()
    timing = {"gc_freeze_interval_s": 0.05, "gc_full_interval_s": 0.2, "metrics_port": 0}
    running = await build_server(load_config(None, {**settings, **timing}))
    try:
        policy = running.gc_policy
        assert policy is not None
        assert gc.get_freeze_count() > 0  # start-up's objects, at once
        assert gc.get_threshold()[:2] == thresholds[:2]  # young collections as before
        assert gc.get_threshold()[2] > 10**9  # no automatic full collection
        for _ in range(200):
            if policy.num_full_collections >= 1 and policy.num_freezes >= 3:
                break
            await asyncio.sleep(0.02)
        assert policy.num_freezes >= 3
        assert policy.num_full_collections >= 1
        assert running.metrics is not None  # the policy's figures reach /metrics
        families = {family.name: family for family in running.metrics.collector.collect()}
        [full] = families["kvstore_gc_full_collections"].samples[:1]
        assert full.value == policy.num_full_collections
        assert families["kvstore_gc_frozen_objects"].samples[0].value > 0
        pause = families["kvstore_gc_last_full_collection_seconds"].samples[0].value
        assert pause == policy.last_full_collection_s > 0
    finally:
        await running.drain()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == thresholds
    off = await build_server(load_config(None, {**settings, "gc_freeze_interval_s": 0}))
    try:
        assert off.gc_policy is None
    finally:
        await off.drain()


@pytest.mark.parametrize("name", ["gc_freeze_interval_s", "gc_full_interval_s"])
def test_negative_intervals_are_refused(name: str) -> None:
    with pytest.raises(InvalidRequest, match=f"{name} must be 0"):
        load_config(None, {name: -1})


async def test_two_daemons_in_one_process_give_cpythons_settings_back_when_both_stop(
    unfrozen: None,
) -> None:
    thresholds = gc.get_threshold()
    settings = {"listen": "127.0.0.1:0", "log_level": "warning", "shm_socket": "off"}
    first = await build_server(load_config(None, settings))
    second = await build_server(load_config(None, settings))
    await first.drain()
    assert gc.get_threshold()[2] > 10**9  # the second still runs its policy
    assert gc.get_freeze_count() > 0
    await second.drain()
    assert gc.get_threshold() == thresholds
    assert gc.get_freeze_count() == 0
