"""`kvstore-bench watch-snapshot`: what starting a WatchBlocks watch holds the loop for.

A watcher's snapshot is taken in one step on the daemon's event loop, so no change falls
between it and the live events. This fills a BlockStore in this process with
`--blocks` small blocks in chains and times that step (`BlockStore.snapshot_entries`,
references to the entries, which the watcher turns into events as it sends them)
against building every SNAPSHOT event at once (`BlockStore.snapshot`), in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from kvstore.checksum import ChecksumKind, checksum
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.put import PutSession
from kvstore.store import BlockStore, StoreConfig

_LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
_NAMESPACE = Namespace(tenant="bench", model_fingerprint="watch-snapshot", layout=_LAYOUT)
_CHAIN_BLOCKS = 64
_PAGE_BYTES = 4096


def add_watch_snapshot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--blocks", type=int, default=200_000, help="blocks in the namespace (default 200000)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timings of each; the best is kept")
    parser.add_argument("--json", action="store_true", help="print JSON")


def filled_store(num_blocks: int) -> BlockStore:
    store = BlockStore(StoreConfig(dram_bytes=num_blocks * _PAGE_BYTES, page_bytes=_PAGE_BYTES))
    data = bytes(_LAYOUT.layer_bytes)
    digest = checksum(ChecksumKind.XXH3_64, data)
    for first in range(0, num_blocks, _CHAIN_BLOCKS):
        session = PutSession(store, _NAMESPACE, ChecksumKind.XXH3_64)
        try:
            parent = b""
            for index in range(first, min(first + _CHAIN_BLOCKS, num_blocks)):
                key = index.to_bytes(32, "little")
                session.declare(key, parent)
                session.write(index - first, 0, 0, data, digest)
                parent = key
            session.finish()
        finally:
            session.abort()
    return store


def best_seconds(step: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best


def run_watch_snapshot(args: argparse.Namespace) -> int:
    if args.blocks < 1 or args.repeats < 1:
        raise SystemExit("--blocks and --repeats must be at least 1")
    store = filled_store(args.blocks)
    held = len(store.snapshot_entries(_NAMESPACE))
    entries_s = best_seconds(lambda: store.snapshot_entries(_NAMESPACE), args.repeats)
    events_s = best_seconds(lambda: store.snapshot(_NAMESPACE), args.repeats)
    report = {
        "blocks": held,
        "entries_ms": entries_s * 1000,
        "events_ms": events_s * 1000,
        "events_over_entries": events_s / entries_s,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"snapshot of {held} blocks, the loop held (best of {args.repeats}): "
            f"taking the entries {entries_s * 1000:.2f} ms (what a watch start does now), "
            f"building every event {events_s * 1000:.2f} ms ({events_s / entries_s:.0f}x)"
        )
    return 0
