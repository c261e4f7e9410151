"""Restart from block file headers, rebuilding while serving, and what `ssd_fsync` fsyncs.

Block files are written with the SSD tier's own writer (real headers, real checksums);
the server tests run the real server in-process and talk to it with the real client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

import kvstore.recovery as recovery
from kvstore.checksum import ChecksumKind, checksum
from kvstore.client import ClientOptions, KVClient, KVForm
from kvstore.config import StoreConfig
from kvstore.enums import PutOutcome, TierKind
from kvstore.errors import CapacityExhausted
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.pool import BlockPool
from kvstore.put import PutSession
from kvstore.recovery import IndexRebuild, read_headers, recover_index
from kvstore.server import build_server, load_config
from kvstore.store import BlockStore
from kvstore.tiers.blockfile import BlockFileHeader, CorruptBlockFile
from kvstore.tiers.ssd import RecoveredBlock, SsdLocation, SsdTier

KiB = 1 << 10
MiB = 1 << 20
LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, dtype=DType.FLOAT16, block_tokens=16)
BLOCK = LAYOUT.block_bytes  # 16 KiB
NS = Namespace(tenant="recovery", model_fingerprint="toy", layout=LAYOUT)
KIND = ChecksumKind.XXH3_64


def payload(key: bytes) -> bytes:
    seed = hashlib.sha256(key).digest()
    return (seed * (BLOCK // len(seed) + 1))[:BLOCK]


def header_for(key: bytes, parent: bytes) -> BlockFileHeader:
    data = payload(key)
    layers = [data[i * LAYOUT.layer_bytes : (i + 1) * LAYOUT.layer_bytes] for i in range(4)]
    return BlockFileHeader(NS, key, parent, KIND, tuple(checksum(KIND, part) for part in layers))


def write_block_file(ssd: SsdTier, key: bytes, parent: bytes = b"") -> SsdLocation:
    """A block file as the tier writes it, without claiming its path."""
    header = header_for(key, parent)
    location = SsdLocation(ssd.path_for(NS, key), ssd.file_bytes(header))
    ssd.write_block(location, header, [payload(key)])
    return location


def make_pool(tmp_path: Path) -> BlockPool:
    return BlockPool(StoreConfig(dram_bytes=MiB, page_bytes=16 * KiB, ssd_dir=str(tmp_path)))


def ssd_of(pool: BlockPool) -> SsdTier:
    assert pool.ssd is not None
    return pool.ssd


def all_headers(ssd: SsdTier) -> list[recovery.HeaderResult]:
    listing = ssd.list_files()
    return [
        result
        for directory, names in listing.block_files
        for result in read_headers(ssd, directory, sorted(names))
    ]


def chain_of(pool: BlockPool, keys: list[bytes]) -> list[bytes]:
    return [entry.key for entry in pool.find_prefix(NS, keys)]


# -- ssd_fsync: what is fsynced, and in which order ------------------------------------------


class RecordingSyscalls:
    """The real calls, recorded by the path each one acts on (fds resolved through /proc)."""

    def __init__(self, fail_fsync_of_directories: bool = False) -> None:
        self.calls: list[tuple[str, ...]] = []
        self._fail_directories = fail_fsync_of_directories

    def open(self, path: Path, flags: int, /) -> int:
        return os.open(path, flags)

    def fsync(self, fd: int, /) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        self.calls.append(("fsync", target))
        if self._fail_directories and os.path.isdir(target):
            raise OSError(errno.EIO, "injected EIO")
        os.fsync(fd)

    def close(self, fd: int, /) -> None:
        os.close(fd)

    def replace(self, source: Path, target: Path, /) -> None:
        self.calls.append(("replace", str(source), str(target)))
        os.replace(source, target)


async def write(ssd: SsdTier, key: bytes) -> Path:
    header = header_for(key, b"")
    location = SsdLocation(ssd.path_for(NS, key), ssd.file_bytes(header))
    await ssd.write(location, header, [payload(key)])
    return location.path


async def test_fsync_covers_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path,
) -> None:
    syscalls = RecordingSyscalls()
    ssd = SsdTier(tmp_path / "ssd", 64 * MiB, fsync=True, syscalls=syscalls)
    try:
        first = await write(ssd, b"first")
        # When write returns, every call has happened: the file is durable.
        namespace_dir, root = str(first.parent), str(tmp_path / "ssd")
        temporary = str(first.with_name(f".{first.name}.tmp"))
        assert syscalls.calls == [
            ("fsync", root),  # the namespace directory was created in it
            ("fsync", temporary),
            ("replace", temporary, str(first)),
            ("fsync", namespace_dir),
        ]
        syscalls.calls.clear()
        second = await write(ssd, b"second")
        temporary = str(second.with_name(f".{second.name}.tmp"))
        assert syscalls.calls == [
            ("fsync", temporary),
            ("replace", temporary, str(second)),
            ("fsync", namespace_dir),
        ]
    finally:
        ssd.close()


async def test_the_namespace_directory_entry_is_fsynced_until_once_it_succeeds(
    tmp_path: Path,
) -> None:
    # The write that made the namespace directory failed to fsync its parent: the next
    # write into it (which finds the directory there) must not skip that fsync.
    syscalls = RecordingSyscalls(fail_fsync_of_directories=True)
    ssd = SsdTier(tmp_path / "ssd", 64 * MiB, fsync=True, syscalls=syscalls)
    root = str(tmp_path / "ssd")
    try:
        with pytest.raises(OSError, match="injected EIO"):
            await write(ssd, b"first")
        syscalls._fail_directories = False
        syscalls.calls.clear()
        second = await write(ssd, b"second")
        assert syscalls.calls[0] == ("fsync", root)
        assert syscalls.calls[-1] == ("fsync", str(second.parent))
        syscalls.calls.clear()
        await write(ssd, b"third")
        assert ("fsync", root) not in syscalls.calls  # once durable, not again
    finally:
        ssd.close()


async def test_without_fsync_a_write_only_renames(tmp_path: Path) -> None:
    syscalls = RecordingSyscalls()
    ssd = SsdTier(tmp_path / "ssd", 64 * MiB, fsync=False, syscalls=syscalls)
    try:
        path = await write(ssd, b"only")
        assert [call[0] for call in syscalls.calls] == ["replace"]
        assert path.read_bytes()[-BLOCK:] == payload(b"only")
    finally:
        ssd.close()


def held_unlinks(ssd: SsdTier) -> threading.Event:
    """Make the tier's unlinks wait (on its I/O threads) until the returned event is set."""
    may_run = threading.Event()
    plain_remove = ssd.remove

    def held_remove(location: SsdLocation) -> None:
        may_run.wait(10)
        plain_remove(location)

    ssd.remove = held_remove  # type: ignore[method-assign]
    return may_run


async def test_a_rewrite_waits_for_a_queued_unlink_of_its_path(tmp_path: Path) -> None:
    # With two I/O threads, an unlink queued before a write of the same path could run
    # after the write's rename and take the new (acknowledged) file with it.
    ssd = SsdTier(tmp_path / "ssd", 64 * MiB, fsync=False)
    try:
        path = await write(ssd, b"again")
        unlinks_may_run = held_unlinks(ssd)
        ssd.discard_file(SsdLocation(path, 0))
        rewrite = asyncio.create_task(write(ssd, b"again"))
        await asyncio.sleep(0.2)
        assert not rewrite.done(), "the rewrite went ahead of the unlink queued before it"
        unlinks_may_run.set()
        assert await rewrite == path
        assert path.read_bytes()[-BLOCK:] == payload(b"again")
    finally:
        ssd.close()
    assert path.exists()


async def test_settle_removals_waits_for_the_unlinks_and_fsyncs_their_directory(
    tmp_path: Path,
) -> None:
    syscalls = RecordingSyscalls()
    ssd = SsdTier(tmp_path / "ssd", 64 * MiB, fsync=True, syscalls=syscalls)
    try:
        paths = [await write(ssd, key) for key in (b"one", b"two")]
        unlinks_may_run = held_unlinks(ssd)
        for path in paths:
            ssd.discard_file(SsdLocation(path, 0))
        settle = asyncio.create_task(ssd.settle_removals())
        await asyncio.sleep(0.2)
        assert not settle.done()
        syscalls.calls.clear()
        unlinks_may_run.set()
        await settle
        assert not any(path.exists() for path in paths)
        assert syscalls.calls == [("fsync", str(paths[0].parent))]
        syscalls.calls.clear()
        await ssd.settle_removals()  # nothing new to make durable
        assert syscalls.calls == []
    finally:
        ssd.close()


async def test_a_failed_directory_fsync_fails_the_write_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    ssd_dir = tmp_path / "ssd"
    ssd = SsdTier(ssd_dir, 64 * MiB, fsync=True, syscalls=RecordingSyscalls(True))
    try:
        with pytest.raises(OSError, match="injected EIO"):
            await write(ssd, b"lost")
        assert not [path for path in ssd_dir.rglob("*") if path.is_file()]
    finally:
        ssd.close()


def test_the_store_setting_reaches_the_tier(tmp_path: Path) -> None:
    for fsync in (False, True):
        pool = BlockPool(
            StoreConfig(dram_bytes=MiB, ssd_dir=str(tmp_path / str(fsync)), ssd_fsync=fsync)
        )
        assert ssd_of(pool).fsync is fsync
        pool.close()


# -- the rebuild --------------------------------------------------------------------------------


def test_chains_come_back_whatever_order_their_files_are_read_in(tmp_path: Path) -> None:
    writer = SsdTier(tmp_path, 64 * MiB, fsync=False)
    for key, parent in (
        (b"a0", b""),
        (b"a1", b"a0"),
        (b"a2", b"a1"),
        (b"b1", b"b0"),
        (b"b2", b"b1"),
    ):
        write_block_file(writer, key, parent)
    writer.close()
    pool = make_pool(tmp_path)
    ssd = ssd_of(pool)
    rebuild = IndexRebuild(pool, ssd)
    results = all_headers(ssd)
    assert len(results) == 5
    for result in reversed(results):  # children before their parents
        rebuild.apply([result])
    assert rebuild.finish() == 3
    assert chain_of(pool, [b"a0", b"a1", b"a2"]) == [b"a0", b"a1", b"a2"]
    assert [entry.depth for entry in pool.find_prefix(NS, [b"a0", b"a1", b"a2"])] == [0, 1, 2]
    # b0 never came back: its descendants are deleted, not indexed.
    assert chain_of(pool, [b"b1"]) == []
    assert sorted(path.name for path in tmp_path.glob("*/*.kvb")) == [
        f"{key.hex()}.kvb" for key in (b"a0", b"a1", b"a2")
    ]
    assert ssd.used_bytes == sum(path.stat().st_size for path in tmp_path.glob("*/*.kvb"))
    pool.close()


async def test_reads_verify_what_the_restart_did_not(tmp_path: Path) -> None:
    writer = SsdTier(tmp_path, 64 * MiB, fsync=False)
    for key in (b"rot", b"swapped", b"other"):
        write_block_file(writer, key)
    writer.close()
    pool = make_pool(tmp_path)
    assert recover_index(pool) == 3
    entries = {key: pool.find_prefix(NS, [key])[0] for key in (b"rot", b"swapped", b"other")}
    assert await pool.read_from_ssd(entries[b"other"]) == payload(b"other")
    rot = ssd_of(pool).path_for(NS, b"rot")
    data = bytearray(rot.read_bytes())
    data[-1] ^= 0xFF  # the last layer's last byte
    rot.write_bytes(bytes(data))
    with pytest.raises(CorruptBlockFile, match="layer 3 checksum mismatch"):
        await pool.read_from_ssd(entries[b"rot"])
    # A whole, valid file of another block in its place is caught too.
    swapped = ssd_of(pool).path_for(NS, b"swapped")
    swapped.write_bytes(ssd_of(pool).path_for(NS, b"other").read_bytes())
    with pytest.raises(CorruptBlockFile, match="holds a different block"):
        await pool.read_from_ssd(entries[b"swapped"])
    pool.close()


def test_a_misplaced_file_is_dropped(tmp_path: Path) -> None:
    writer = SsdTier(tmp_path, 64 * MiB, fsync=False)
    location = write_block_file(writer, b"here")
    writer.close()
    moved = location.path.with_name(f"{b'there'.hex()}.kvb")
    location.path.rename(moved)
    pool = make_pool(tmp_path)
    assert recover_index(pool) == 0
    assert ssd_of(pool).counters.errors == 1
    assert not moved.exists()
    pool.close()


def test_a_header_with_a_valid_checksum_and_impossible_values_is_dropped(tmp_path: Path) -> None:
    writer = SsdTier(tmp_path, 64 * MiB, fsync=False)
    location = write_block_file(writer, b"odd")
    writer.close()
    data = location.path.read_bytes()
    (length,) = struct.unpack_from("<I", data, 8)
    body = json.loads(data[12 : 12 + length])
    body["namespace"]["tp_rank"] = 7  # of tp_size 1
    new_body = json.dumps(body, sort_keys=True).encode()
    prefix = data[:8] + struct.pack("<I", len(new_body))
    digest = struct.pack("<Q", xxhash.xxh3_64_intdigest(new_body))
    location.path.write_bytes(prefix + new_body + digest + data[12 + length + 8 :])
    pool = make_pool(tmp_path)
    assert recover_index(pool) == 0
    assert ssd_of(pool).counters.errors == 1
    assert not location.path.exists()
    pool.close()


def test_the_rebuild_leaves_paths_claimed_by_writes_alone(tmp_path: Path) -> None:
    writer = SsdTier(tmp_path, 64 * MiB, fsync=False)
    kept = write_block_file(writer, b"kept")
    damaged = write_block_file(writer, b"damaged")
    writer.close()
    damaged.path.write_bytes(b"torn")
    pool = make_pool(tmp_path)
    ssd = ssd_of(pool)
    ssd.begin_recovery()
    assert ssd.name == "ssd (recovering)"
    # Writes of these keys started after the restart: their paths are theirs now.
    for key in (b"kept", b"damaged"):
        ssd.location_for(NS, key, 0)
    claimed_leftover = kept.path.with_name(f".{kept.path.name}.tmp")
    unclaimed_leftover = kept.path.with_name(f".{b'other'.hex()}.kvb.tmp")
    for path in (claimed_leftover, unclaimed_leftover):
        path.write_bytes(b"partial")
    rebuild = IndexRebuild(pool, ssd)
    rebuild.discard_temporary(ssd.list_files().temporary_files)
    results = all_headers(ssd)
    assert sorted(type(result).__name__ for result in results) == ["DamagedFile", "RecoveredBlock"]
    rebuild.apply(results)
    assert rebuild.finish() == 0
    ssd.end_recovery()
    assert ssd.name == "ssd"
    assert chain_of(pool, [b"kept"]) == []
    assert kept.path.exists()
    assert damaged.path.exists()
    assert claimed_leftover.exists()
    assert not unclaimed_leftover.exists()
    pool.close()


def put(store: BlockStore, key: bytes, parent: bytes = b"") -> None:
    session = PutSession(store, NS, KIND)
    try:
        session.declare(key, parent)
        data = payload(key)
        for layer in range(LAYOUT.num_layers):
            part = data[layer * LAYOUT.layer_bytes : (layer + 1) * LAYOUT.layer_bytes]
            session.write(0, layer, 0, part, checksum(KIND, part))
        assert session.finish() == [PutOutcome.COMMITTED]
    finally:
        session.abort()


@pytest.mark.parametrize("put_first", [True, False])
def test_a_block_put_during_the_rebuild_keeps_its_entry_and_takes_its_children(
    tmp_path: Path, put_first: bool
) -> None:
    writer = SsdTier(tmp_path / "ssd", 64 * MiB, fsync=False)
    write_block_file(writer, b"P")
    write_block_file(writer, b"C", b"P")
    writer.close()
    store = BlockStore(
        StoreConfig(dram_bytes=MiB, page_bytes=16 * KiB, ssd_dir=str(tmp_path / "ssd"))
    )
    pool = store.pool
    ssd = ssd_of(pool)
    ssd.begin_recovery()
    rebuild = IndexRebuild(pool, ssd)
    by_key = {
        result.header.key: result
        for result in all_headers(ssd)
        if isinstance(result, RecoveredBlock)
    }
    if put_first:
        put(store, b"P")
        rebuild.apply([by_key[b"P"], by_key[b"C"]])
    else:
        rebuild.apply([by_key[b"C"]])  # waits for P
        put(store, b"P")
        rebuild.apply([by_key[b"P"]])
    assert rebuild.finish() == 1  # C, under the P the put indexed
    ssd.end_recovery()
    (parent, child) = pool.find_prefix(NS, [b"P", b"C"])
    assert child.parent is parent
    # The put's entry, with the file (the same bytes) as its SSD copy, accounted.
    assert set(parent.copies) == {TierKind.DRAM, TierKind.SSD}
    assert ssd.used_bytes == sum(path.stat().st_size for path in ssd.directory.glob("*/*.kvb"))
    assert rebuild.num_left_alone == 1
    pool.close()


def test_a_file_a_put_replaced_with_other_bytes_is_deleted(tmp_path: Path) -> None:
    writer = SsdTier(tmp_path / "ssd", 64 * MiB, fsync=False)
    # P's file from before the restart held other bytes than the put stores now.
    header = dataclasses.replace(
        header_for(b"P", b""), layer_checksums=header_for(b"Q", b"").layer_checksums
    )
    stale = SsdLocation(writer.path_for(NS, b"P"), writer.file_bytes(header))
    writer.write_block(stale, header, [payload(b"Q")])
    writer.close()
    store = BlockStore(
        StoreConfig(dram_bytes=MiB, page_bytes=16 * KiB, ssd_dir=str(tmp_path / "ssd"))
    )
    pool = store.pool
    ssd = ssd_of(pool)
    put(store, b"P")
    rebuild = IndexRebuild(pool, ssd)
    rebuild.apply(all_headers(ssd))
    assert rebuild.finish() == 0
    (entry,) = pool.find_prefix(NS, [b"P"])
    assert set(entry.copies) == {TierKind.DRAM}
    assert not stale.path.exists()
    assert ssd.used_bytes == 0
    pool.close()


# -- serving while the rebuild runs ----------------------------------------------------------


def blocks_tensor(keys: list[bytes]) -> torch.Tensor:
    raw = bytearray(b"".join(payload(key) for key in keys))
    flat = torch.frombuffer(raw, dtype=torch.uint8)
    return flat.view(torch.float16).reshape(len(keys), LAYOUT.num_layers, *LAYOUT.layer_shape)


async def get_chain(client: KVClient, keys: list[bytes]) -> list[bytes]:
    dest = torch.zeros((len(keys), LAYOUT.num_layers, *LAYOUT.layer_shape), dtype=torch.float16)
    served = await client.get_into(keys, dest, form=KVForm.BLOCKS)
    return [dest[index].view(torch.uint8).numpy().tobytes() for index in range(served)]


@asynccontextmanager
async def serving(ssd_dir: Path, **store: Any) -> AsyncIterator[KVClient]:
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "log_level": "warning",
        "store.dram_bytes": 4 * MiB,
        "store.page_bytes": 16 * KiB,
        "store.ssd_dir": str(ssd_dir),
        "store.write_policy": "write-through",
        "limits.drain_grace_s": 2.0,
    }
    settings.update({f"store.{name}": value for name, value in store.items()})
    running = await build_server(load_config(None, settings))
    try:
        options = ClientOptions(verify_checksums=False)
        async with KVClient(f"127.0.0.1:{running.port}", NS, options=options) as client:
            yield client
    finally:
        await running.drain()


async def ssd_tier_name(client: KVClient) -> tuple[str, int]:
    (tier,) = [tier for tier in (await client.stats()).tiers if tier.tier.name == "SSD"]
    return tier.name, tier.num_blocks


async def test_lookups_during_a_background_rebuild_are_honest_misses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ssd_dir = tmp_path / "ssd"
    stored = [f"stored/{index}".encode() for index in range(6)]
    async with serving(ssd_dir) as client:
        assert (await client.put_blocks(stored, blocks_tensor(stored))).num_committed == 6
        await _until(client, lambda name, num_blocks: num_blocks == 6)

    # The next start finds the rebuild unfinished at once: header reads wait for a gate.
    gate = threading.Event()
    real_read_headers = recovery.read_headers

    def gated(ssd: SsdTier, directory: Path, names: list[str]) -> list[recovery.HeaderResult]:
        assert gate.wait(timeout=60)
        return real_read_headers(ssd, directory, names)

    monkeypatch.setattr(recovery, "read_headers", gated)
    monkeypatch.setattr(recovery, "SERVE_AFTER_S", 0.0)
    fresh = [f"fresh/{index}".encode() for index in range(3)]
    with caplog.at_level(logging.WARNING, logger="kvstore"):
        try:
            async with serving(ssd_dir) as client:
                assert await ssd_tier_name(client) == ("ssd (recovering)", 0)
                assert (await client.lookup_keys(stored)).num_matched == 0
                assert await get_chain(client, stored) == []
                # Puts are taken meanwhile, and a block put again owns its file.
                assert (await client.put_blocks(fresh, blocks_tensor(fresh))).num_committed == 3
                again = await client.put_blocks(stored[:2], blocks_tensor(stored[:2]))
                assert again.num_committed == 2
                gate.set()
                await _until(client, lambda name, num_blocks: name == "ssd")
                for keys in (stored, fresh):
                    assert (await client.lookup_keys(keys)).num_matched == len(keys)
                    assert await get_chain(client, keys) == [payload(key) for key in keys]
        finally:
            gate.set()
    assert "serving now" in caplog.text


async def _until(client: KVClient, condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition(*await ssd_tier_name(client)):
        assert time.monotonic() < deadline, await ssd_tier_name(client)
        await asyncio.sleep(0.02)


async def test_closing_during_a_background_rebuild_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = SsdTier(tmp_path / "ssd", 64 * MiB, fsync=False)
    write_block_file(writer, b"head")
    writer.close()
    gate = threading.Event()
    real_list_files = SsdTier.list_files

    def gated(ssd: SsdTier) -> Any:
        gate.wait(timeout=60)
        return real_list_files(ssd)

    monkeypatch.setattr(SsdTier, "list_files", gated)
    pool = make_pool(tmp_path / "ssd")
    task = await recovery.recover_while_serving(pool, serve_after_s=0.0)
    assert task is not None
    assert not task.done()
    assert ssd_of(pool).recovering
    task.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not ssd_of(pool).recovering
    pool.close()


def test_the_chain_root_mark_comes_back_and_a_bad_one_is_damage(tmp_path: Path) -> None:
    writer = SsdTier(tmp_path, 64 * MiB, fsync=False)
    for key, mark in ((b"marked", True), (b"plain", False), (b"odd", True)):
        header = dataclasses.replace(header_for(key, b""), chain_root=mark)
        location = SsdLocation(writer.path_for(NS, key), writer.file_bytes(header))
        writer.write_block(location, header, [payload(key)])
    writer.close()
    odd = writer.path_for(NS, b"odd")
    data = odd.read_bytes()
    (length,) = struct.unpack_from("<I", data, 8)
    body = json.loads(data[12 : 12 + length])
    body["chain_root"] = "yes"
    new_body = json.dumps(body, sort_keys=True).encode()
    prefix = data[:8] + struct.pack("<I", len(new_body))
    digest = struct.pack("<Q", xxhash.xxh3_64_intdigest(new_body))
    odd.write_bytes(prefix + new_body + digest + data[12 + length + 8 :])
    pool = make_pool(tmp_path)
    assert recover_index(pool) == 2
    assert ssd_of(pool).counters.errors == 1
    assert [entry.chain_root for entry in pool.find_prefix(NS, [b"marked"])] == [True]
    assert [entry.chain_root for entry in pool.find_prefix(NS, [b"plain"])] == [False]
    pool.close()


# -- hostile files in the SSD directory ----------------------------------------------------------


def rewrite_header(path: Path, body: bytes) -> None:
    """Replace the file's header body, re-signed: only its content is hostile."""
    data = path.read_bytes()
    (length,) = struct.unpack_from("<I", data, 8)
    payload_start = 12 + length + 8
    path.write_bytes(
        data[:8]
        + struct.pack("<I", len(body))
        + body
        + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
        + data[payload_start:]
    )


def _with(path: Path, change: Any) -> bytes:
    (length,) = struct.unpack_from("<I", path.read_bytes(), 8)
    body = json.loads(path.read_bytes()[12 : 12 + length])
    change(body)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    "hostile",
    [
        "infinite checksum",
        "infinite layer count",
        "nesting past the parser",
        "a header of gigabytes",
    ],
)
def test_a_hostile_header_is_dropped_and_recovery_goes_on(tmp_path: Path, hostile: str) -> None:
    writer = SsdTier(tmp_path, 64 * MiB, fsync=False)
    good = write_block_file(writer, b"good")
    bad = write_block_file(writer, b"bad")
    writer.close()
    if hostile == "infinite checksum":
        rewrite_header(
            bad.path, _with(bad.path, lambda b: b["layer_checksums"].__setitem__(0, float("inf")))
        )
    elif hostile == "infinite layer count":
        rewrite_header(
            bad.path,
            _with(
                bad.path, lambda b: b["namespace"]["layout"].__setitem__("num_layers", float("inf"))
            ),
        )
    elif hostile == "nesting past the parser":
        rewrite_header(bad.path, b"[" * 200_000 + b"]" * 200_000)
    else:  # announces 4 GiB of header: never read, never allocated
        data = bytearray(bad.path.read_bytes())
        struct.pack_into("<I", data, 8, 0xFFFF_FF00)
        bad.path.write_bytes(bytes(data))
    pool = make_pool(tmp_path)
    try:
        assert recover_index(pool) == 1
        state = pool.find_namespace(NS)
        assert state is not None
        assert set(state.blocks) == {b"good"}
        assert good.path.exists()
    finally:
        pool.close()


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_fifo_or_link_named_as_a_block_file_neither_hangs_nor_is_followed(
    tmp_path: Path, kind: str
) -> None:
    writer = SsdTier(tmp_path, 64 * MiB, fsync=False)
    good = write_block_file(writer, b"good")
    writer.close()
    odd = good.path.parent / ("ab" * 4 + ".kvb")
    if kind == "fifo":
        os.mkfifo(odd)  # an open for reading would wait for a writer for ever
    else:
        os.symlink(good.path, odd)  # a block file elsewhere, under another name
    pool = make_pool(tmp_path)
    done: list[int] = []
    worker = threading.Thread(target=lambda: done.append(recover_index(pool)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    try:
        assert done == [1], "recovery hung or failed"
        state = pool.find_namespace(NS)
        assert state is not None
        assert set(state.blocks) == {b"good"}
    finally:
        pool.close()


def test_a_file_declaring_more_than_its_bytes_decode_to_is_refused_before_allocating(
    tmp_path: Path,
) -> None:
    # A few hundred bytes claiming a 1.5 GiB block of lz4 layers: the header is refused
    # as it is read, so neither recovery nor a read allocates what it declares.
    import lz4.block

    from kvstore.layer_codec import LayerEncoding
    from kvstore.tiers.blockfile import decode_header, encode_header

    layout = KVLayout(
        num_layers=2, num_kv_heads=1024, head_dim=4096, dtype=DType.FLOAT32, block_tokens=24
    )
    stored = lz4.block.compress(b"\0" * 1000, store_size=False)
    header = BlockFileHeader(
        Namespace(tenant="t", model_fingerprint="m", layout=layout),
        b"bomb",
        b"",
        ChecksumKind.XXH3_64,
        (0, 0),
        layer_encodings=(LayerEncoding.LZ4, LayerEncoding.LZ4),
        layer_stored_bytes=(len(stored), len(stored)),
        stored_checksums=(xxhash.xxh3_64_intdigest(stored),) * 2,
    )
    with pytest.raises(CorruptBlockFile, match=r"stores .* for"):
        decode_header(encode_header(header) + stored + stored)


def test_a_restart_with_a_smaller_ssd_drops_the_excess_tails_first(tmp_path: Path) -> None:
    writer = SsdTier(tmp_path, 64 * MiB, fsync=False)
    chain = [f"c{index}".encode() for index in range(6)]
    file_bytes = 0
    for index, key in enumerate(chain):
        file_bytes = write_block_file(writer, key, chain[index - 1] if index else b"").nbytes
    writer.close()
    pool = BlockPool(
        StoreConfig(
            # Four files fit (a file's size varies by a few bytes with its keys).
            dram_bytes=MiB,
            page_bytes=16 * KiB,
            ssd_dir=str(tmp_path),
            ssd_bytes=4 * file_bytes + 64,
        )
    )
    ssd = ssd_of(pool)
    assert recover_index(pool) == 6
    assert ssd.used_bytes <= ssd.capacity_bytes
    assert chain_of(pool, chain) == chain[:4]  # a whole prefix: the tails went
    pool.close()
    assert sorted(path.name for path in tmp_path.glob("*/*.kvb")) == sorted(
        f"{key.hex()}.kvb" for key in chain[:4]
    )


def test_a_restart_with_fewer_namespaces_allowed_serves_them_all_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Recovery brings back every namespace on disk, past a lowered store.max_namespaces,
    logs how many must empty before a new one is taken, and refuses new ones till then."""
    writer = SsdTier(tmp_path, 64 * MiB, fsync=False)
    namespaces = [
        Namespace(tenant=f"t{index}", model_fingerprint="toy", layout=LAYOUT) for index in range(3)
    ]
    for namespace in namespaces:
        key = namespace.tenant.encode()
        header = BlockFileHeader(namespace, key, b"", KIND, header_for(key, b"").layer_checksums)
        location = SsdLocation(writer.path_for(namespace, key), writer.file_bytes(header))
        writer.write_block(location, header, [payload(key)])
    writer.close()
    pool = BlockPool(
        StoreConfig(dram_bytes=MiB, page_bytes=16 * KiB, ssd_dir=str(tmp_path), max_namespaces=2)
    )
    with caplog.at_level(logging.WARNING, logger="kvstore"):
        assert recover_index(pool) == 3
    assert "blocks of 3 namespaces, more than store.max_namespaces (2)" in caplog.text
    assert "refused until 2 of them have no block left" in caplog.text
    for namespace in namespaces:
        assert pool.find_prefix(namespace, [namespace.tenant.encode()])
    with pytest.raises(CapacityExhausted, match=r"store\.max_namespaces"):
        pool.open_namespace(Namespace(tenant="new", model_fingerprint="toy", layout=LAYOUT))
    pool.close()
