"""The counts Stats reports (kvstore.census), kept as blocks change, against a brute-force
count over every indexed entry after each step of a seeded random run: puts (some left
open across steps, some abandoned), reads holding their pins across steps, lookups, pins
and unpins with short leases under a clock the test advances, deletes, eviction and
demotion under DRAM pressure, promotion to DRAM and HBM, SSD files that fail their read,
namespaces freed and restarts that recover the SSD's blocks.

The clock: kvstore.store, kvstore.pool and kvstore.mover read `time.monotonic` through
their module's `time`, which the test swaps for a clock that moves only when told, so a
lease expires exactly when a step says, and the brute-force count sees the same `now`
as the report.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import kvstore.mover
import kvstore.pool
import kvstore.store
from kvstore.checksum import ChecksumKind, checksum
from kvstore.config import StoreConfig
from kvstore.enums import TierKind
from kvstore.errors import CapacityExhausted
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.mover import TierMover
from kvstore.put import PutSession
from kvstore.read import ReadSession
from kvstore.store import BlockStore
from kvstore.tiers.ssd import SsdLocation

PAGE_BYTES = 512
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
NAMESPACES = [
    Namespace(tenant=f"t{number}", model_fingerprint="m", layout=LAYOUT) for number in range(3)
]
CHECKSUM = ChecksumKind.XXH3_64
# Reads and puts a run keeps open at once: more would pin most of the store.
MAX_OPEN = 3


class FrozenClock:
    """`time` for the store's modules: monotonic time moves only by `advance`."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FrozenClock:
    frozen = FrozenClock()
    for module in (kvstore.store, kvstore.pool, kvstore.mover):
        monkeypatch.setattr(module, "time", frozen)
    return frozen


# -- the brute-force count: the definition the census must keep --------------------------------


def brute_force_counts(store: BlockStore, now: float) -> tuple[dict[TierKind, int], int]:
    """(indexed blocks with a copy in each tier, indexed blocks pinned at `now`)."""
    entries = store.pool.entries()
    num_blocks = {
        kind: sum(1 for entry in entries if kind in entry.copies) for kind in store.tier_kinds
    }
    return num_blocks, sum(1 for entry in entries if entry.is_pinned(now))


def reported_counts(store: BlockStore) -> tuple[dict[TierKind, int], int]:
    report = store.report()
    return {tier.kind: tier.num_blocks for tier in report.tiers}, report.num_pinned


# -- the model run ---------------------------------------------------------------------------


def payload(key: bytes) -> bytes:
    seed = hashlib.sha256(key).digest()
    return (seed * (LAYOUT.block_bytes // len(seed) + 1))[: LAYOUT.block_bytes]


@dataclass
class OpenPut:
    namespace: Namespace
    session: PutSession
    keys: list[bytes]
    num_sent: int = 0


@dataclass
class OpenRead:
    namespace: Namespace
    session: ReadSession


@dataclass
class Model:
    rng: random.Random
    clock: FrozenClock
    ssd_dir: Path
    settings: dict[str, Any]
    store: BlockStore = field(init=False)
    mover: TierMover = field(init=False)
    reads: list[OpenRead] = field(default_factory=list)
    puts: list[OpenPut] = field(default_factory=list)
    num_keys: int = 0
    # What the run did, so the test can show it reached every path it means to check.
    seen: Counter[str] = field(default_factory=Counter)

    def start(self) -> None:
        self.store = BlockStore(StoreConfig(**self.settings))
        self.mover = TierMover(self.store)
        self.seen["restored"] += self.mover.recover()

    async def settle(self) -> None:
        while self.mover._tasks:
            await asyncio.gather(*list(self.mover._tasks))

    def namespace(self) -> Namespace:
        return self.rng.choice(NAMESPACES)

    def stored_keys(self, namespace: Namespace) -> list[bytes]:
        state = self.store.pool.find_namespace(namespace)
        return list(state.blocks) if state is not None else []

    def some_keys(self, namespace: Namespace) -> list[bytes]:
        """A few stored keys (and now and then one that is not)."""
        stored = self.stored_keys(namespace)
        keys = self.rng.sample(stored, min(len(stored), self.rng.randint(1, 4)))
        if self.rng.random() < 0.2:
            keys.append(b"absent")
        return keys

    def a_chain(self, namespace: Namespace) -> list[bytes]:
        """The keys of a stored block's chain, root first."""
        state = self.store.pool.find_namespace(namespace)
        if state is None or not state.blocks:
            return []
        entry = state.blocks[self.rng.choice(list(state.blocks))]
        assert entry.path is not None
        return entry.path.keys[: entry.depth + 1]

    # -- steps ---------------------------------------------------------------------------

    async def open_put(self) -> None:
        if len(self.puts) >= MAX_OPEN:
            await self.send_put(self.puts[0], len(self.puts[0].keys))
        namespace = self.namespace()
        stored = self.stored_keys(namespace)
        roll = self.rng.random()
        parent = (
            self.rng.choice(stored) if stored and roll < 0.6 else b"gone" if roll < 0.65 else b""
        )
        keys = []
        for _ in range(self.rng.randint(1, 4)):
            self.num_keys += 1
            keys.append(b"k%d" % self.num_keys)
        present = self.rng.choice(stored) if stored else parent
        if present != parent and self.rng.random() < 0.1:
            keys[0] = present  # ALREADY_PRESENT
        session = PutSession(self.store, namespace, CHECKSUM)
        previous = parent
        for key in keys:
            session.declare(key, previous)
            previous = key
        self.puts.append(OpenPut(namespace, session, keys))
        await self.send_put(self.puts[-1], self.rng.randint(0, len(keys)))

    async def send_put(self, put: OpenPut, num_blocks: int) -> None:
        """Send the put's next `num_blocks` blocks as the server does; close it when done."""
        try:
            for index in range(put.num_sent, min(put.num_sent + num_blocks, len(put.keys))):
                await self.mover.ensure_room(TierKind.DRAM, LAYOUT.block_bytes)
                data = payload(put.keys[index])
                for layer in range(LAYOUT.num_layers):
                    part = data[layer * LAYOUT.layer_bytes : (layer + 1) * LAYOUT.layer_bytes]
                    put.session.write(index, layer, 0, part, checksum(CHECKSUM, part))
                put.num_sent += 1
                self.mover.on_committed(put.session.take_committed())
        except CapacityExhausted:
            self.seen["put_exhausted"] += 1
            put.num_sent = len(put.keys) + 1  # abort below
        if put.num_sent == len(put.keys):
            put.session.finish()
            self.puts.remove(put)
        elif put.num_sent > len(put.keys):
            put.session.abort()
            self.puts.remove(put)
        await self.settle()

    async def continue_put(self) -> None:
        if self.puts:
            put = self.rng.choice(self.puts)
            if self.rng.random() < 0.15:
                put.session.abort()
                self.puts.remove(put)
                self.seen["put_abandoned"] += 1
            else:
                await self.send_put(put, self.rng.randint(1, 3))

    async def open_read(self) -> None:
        namespace = self.namespace()
        chain = self.a_chain(namespace)
        await self.read(namespace, chain + [b"absent"] * (self.rng.random() < 0.2))

    async def read(self, namespace: Namespace, keys: list[bytes]) -> None:
        """A get whose pins stay until a later step closes it."""
        if len(self.reads) >= MAX_OPEN:
            self.reads.pop(0).session.close()
        session = ReadSession(self.store, namespace, keys)
        await session.load(self.mover)
        # Sent as a transport sends it: SSD blocks come in whole (and are promoted) as
        # the stream goes on, not at load, which waits for the first layer 0 only.
        async for _ in session.stream_chunks(1 << 20):
            pass
        self.reads.append(OpenRead(namespace, session))
        await self.settle()

    async def close_read(self) -> None:
        if self.reads:
            self.reads.pop(self.rng.randrange(len(self.reads))).session.close()
            await self.settle()

    async def lookup(self) -> None:
        namespace = self.namespace()
        self.store.lookup(namespace, self.a_chain(namespace) or [b"absent"])

    async def pin(self) -> None:
        namespace = self.namespace()
        count, _ = self.store.pin(namespace, self.some_keys(namespace), self.rng.uniform(0.5, 4.0))
        self.seen["pinned"] += count

    async def unpin(self) -> None:
        namespace = self.namespace()
        self.seen["unpinned"] += self.store.unpin(namespace, self.some_keys(namespace))

    async def advance(self) -> None:
        self.clock.advance(self.rng.uniform(0.0, 2.0))

    async def delete(self) -> None:
        namespace = self.namespace()
        chain = self.a_chain(namespace)
        keys = chain[self.rng.randrange(len(chain)) :] if chain else [b"absent"]
        self.seen["deleted"] += self.store.delete(namespace, keys).num_deleted

    async def delete_namespace(self) -> None:
        """End the namespace's reads, puts and leases, then delete all its blocks."""
        namespace = self.namespace()
        for read in [read for read in self.reads if read.namespace == namespace]:
            read.session.close()
            self.reads.remove(read)
        for put in [put for put in self.puts if put.namespace == namespace]:
            put.session.abort()
            self.puts.remove(put)
        await self.settle()
        keys = self.stored_keys(namespace)
        self.store.unpin(namespace, keys)
        before = self.store.pool.num_namespaces
        self.store.delete(namespace, keys)
        self.seen["namespace_freed"] += before - self.store.pool.num_namespaces

    async def make_room(self) -> None:
        self.mover.make_room()
        await self.settle()

    async def corrupt_ssd_file(self) -> None:
        """Damage an SSD-only block's file; a read of its chain then drops the block."""
        namespace = self.namespace()
        state = self.store.pool.find_namespace(namespace)
        if state is None:
            return
        ssd_only = [
            entry for entry in state.blocks.values() if list(entry.copies) == [TierKind.SSD]
        ]
        if not ssd_only:
            return
        entry = self.rng.choice(ssd_only)
        location = entry.copies[TierKind.SSD]
        assert isinstance(location, SsdLocation)
        assert entry.path is not None
        with location.path.open("r+b") as file:
            file.seek(location.nbytes - 1)
            file.write(bytes([file.read(1)[0] ^ 0xFF]))
        self.seen["corrupted"] += 1
        await self.read(namespace, entry.path.keys[: entry.depth + 1])

    async def restart(self) -> None:
        await self.close()
        self.start()

    async def close(self) -> None:
        for read in self.reads:
            read.session.close()
        for put in self.puts:
            put.session.abort()
        self.reads, self.puts = [], []
        await self.settle()
        await self.mover.close()
        for kind in self.store.tier_kinds:
            counters = self.store.pool.counters_of(kind)
            self.seen[f"{kind.name}_evictions"] += counters.evictions
            self.seen[f"{kind.name}_demotions"] += counters.demotions
            self.seen[f"{kind.name}_promotions"] += counters.promotions


STEPS = {
    "open_put": 8,
    "continue_put": 4,
    "open_read": 5,
    "close_read": 5,
    "lookup": 3,
    "pin": 4,
    "unpin": 2,
    "advance": 4,
    "delete": 2,
    "delete_namespace": 0.3,
    "make_room": 2,
    "corrupt_ssd_file": 0.3,
    "restart": 0.1,
}


@pytest.mark.parametrize(
    ("seed", "policy"),
    [
        (1, {"write_policy": "write-back", "hbm_bytes": 4 * PAGE_BYTES, "hbm_device": "cpu"}),
        (2, {"write_policy": "write-through", "eviction_policy": "session"}),
    ],
)
async def test_reported_counts_match_a_brute_force_count_after_every_step(
    tmp_path: Path, clock: FrozenClock, seed: int, policy: dict[str, Any]
) -> None:
    settings: dict[str, Any] = {
        "dram_bytes": 12 * PAGE_BYTES,
        "page_bytes": PAGE_BYTES,
        "ssd_dir": str(tmp_path / "ssd"),
        "ssd_bytes": 40 * 1024,
        "max_lease_s": 5.0,
        "high_watermark": 0.8,
        "low_watermark": 0.5,
        **policy,
    }
    model = Model(random.Random(seed), clock, tmp_path / "ssd", settings)
    model.start()
    names, weights = list(STEPS), list(STEPS.values())
    try:
        for number in range(2000):
            step = model.rng.choices(names, weights)[0]
            await getattr(model, step)()
            model.seen[step] += 1
            expected = brute_force_counts(model.store, clock.now)
            assert reported_counts(model.store) == expected, f"step {number}: {step}"
            model.seen["pinned_seen"] += expected[1] > 0
    finally:
        await model.close()
    # The run reached every path it means to check.
    print(dict(model.seen))
    assert all(model.seen[step] for step in STEPS), model.seen
    reached = ["restored", "unpinned", "deleted", "namespace_freed", "put_abandoned", "corrupted"]
    reached += ["DRAM_evictions", "SSD_evictions", "DRAM_promotions"]
    reached += ["DRAM_demotions", "HBM_promotions"] if "hbm_bytes" in policy else []
    assert all(model.seen[name] for name in reached), model.seen
