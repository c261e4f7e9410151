"""A block file is read layer 0 first: the SSD tier hands layer 0 on, verified, before it
reads the rest of the file, and never hands on a layer that failed, raw or lz4."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from kvstore.checksum import ChecksumKind, checksum
from kvstore.config import StoreConfig
from kvstore.enums import PutOutcome, TierKind
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.put import PutSession
from kvstore.store import BlockStore
from kvstore.tiers.blockfile import (
    BlockFileHeader,
    CorruptBlockFile,
    decode_header,
    header_bytes,
    stored_layer_bytes,
)
from kvstore.tiers.ssd import SsdLocation, SsdTier

KiB = 1 << 10
KIND = ChecksumKind.XXH3_64
LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype=DType.FLOAT16, block_tokens=64)
NS = Namespace(tenant="t", model_fingerprint="m", layout=LAYOUT)
PAGE_BYTES = 16 * KiB


COMPRESSIONS = ["off", "lz4"]


def block_layers() -> list[bytes]:
    """Layers 0, 2 and 3 of a narrow range (lz4 stores them smaller), layer 1 noise."""
    generator = torch.Generator().manual_seed(5)
    layers = [
        (torch.rand(LAYOUT.layer_bytes // 2, generator=generator) * 0.2 + 1.0).to(torch.float16)
        for _ in range(LAYOUT.num_layers)
    ]
    data = [layer.view(torch.uint8).numpy().tobytes() for layer in layers]
    data[1] = np.random.default_rng(5).integers(0, 256, LAYOUT.layer_bytes, np.uint8).tobytes()
    return data


def ssd_of(store: BlockStore) -> SsdTier:
    ssd = store.pool.ssd
    assert ssd is not None
    return ssd


async def stored_file(
    tmp_path: Path, compression: str
) -> tuple[SsdLocation, list[bytes], BlockStore]:
    store = BlockStore(
        StoreConfig(
            dram_bytes=64 * PAGE_BYTES,
            page_bytes=PAGE_BYTES,
            ssd_dir=str(tmp_path / "ssd"),
            ssd_compression=compression,
        )
    )
    layers = block_layers()
    session = PutSession(store, NS, KIND)
    try:
        session.declare(b"A", b"")
        for layer, data in enumerate(layers):
            session.write(0, layer, 0, data, checksum(KIND, data))
        assert session.finish() == [PutOutcome.COMMITTED]
    finally:
        session.abort()
    (entry,) = store.find_prefix(NS, [b"A"])
    assert await store.pool.write_to_ssd(entry)
    location = entry.copies[TierKind.SSD]
    assert isinstance(location, SsdLocation)
    if compression == "lz4":
        header, _ = decode_header(location.path.read_bytes()[:4096])
        assert header.compressed
        assert header.layer_encodings[1].value == "raw"
    return location, layers, store


def damage(path: Path, layer: int) -> None:
    data = bytearray(path.read_bytes())
    header, offset = decode_header(bytes(data[: header_bytes(bytes(data))]))
    start = offset + sum(stored_layer_bytes(header, index) for index in range(layer))
    data[start + stored_layer_bytes(header, layer) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("compression", COMPRESSIONS)
async def test_layer_0_is_handed_on_verified_before_the_rest_of_the_file_is_read(
    tmp_path: Path, compression: str
) -> None:
    location, layers, store = await stored_file(tmp_path, compression)
    ssd = ssd_of(store)
    seen: list[bytes] = []
    offsets_read: list[int] = []
    original_preadv = os.preadv

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        offsets_read.append(offset)
        return original_preadv(fd, buffers, offset)

    def on_first_layer(header: BlockFileHeader, layer: memoryview) -> None:
        assert threading.current_thread() is threading.main_thread()
        assert not offsets_read  # nothing of the rest is read yet
        seen.append(bytes(layer))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "preadv", preadv)
        header, payload = ssd.read_block(location, on_first_layer, LAYOUT.layer_bytes)
    assert seen == [layers[0]]
    assert offsets_read  # the rest came after, in its own read
    assert bytes(payload) == b"".join(layers)
    assert header.compressed == (compression == "lz4")
    store.pool.close()


@pytest.mark.parametrize("compression", COMPRESSIONS)
async def test_a_damaged_layer_0_is_never_handed_on(tmp_path: Path, compression: str) -> None:
    location, _, store = await stored_file(tmp_path, compression)
    damage(location.path, 0)
    seen: list[memoryview] = []
    with pytest.raises(CorruptBlockFile, match="layer 0"):
        ssd_of(store).read_block(location, lambda _, layer: seen.append(layer), LAYOUT.layer_bytes)
    assert not seen
    store.pool.close()


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("layer", [1, 3])
async def test_a_damaged_later_layer_fails_the_read_after_layer_0_went_on(
    tmp_path: Path, compression: str, layer: int
) -> None:
    location, layers, store = await stored_file(tmp_path, compression)
    damage(location.path, layer)
    seen: list[bytes] = []
    with pytest.raises(CorruptBlockFile, match=f"layer {layer}"):
        ssd_of(store).read_block(
            location, lambda _, view: seen.append(bytes(view)), LAYOUT.layer_bytes
        )
    assert seen == [layers[0]]
    store.pool.close()


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("cut", [1, LAYOUT.layer_bytes + 100])
async def test_a_torn_file_fails_before_layer_0_is_handed_on(
    tmp_path: Path, compression: str, cut: int
) -> None:
    location, _, store = await stored_file(tmp_path, compression)
    data = location.path.read_bytes()
    location.path.write_bytes(data[: len(data) - cut])
    seen: list[memoryview] = []
    with pytest.raises(CorruptBlockFile):
        ssd_of(store).read_block(location, lambda _, layer: seen.append(layer), LAYOUT.layer_bytes)
    assert not seen
    store.pool.close()


@pytest.mark.parametrize("hint", [0, 100, LAYOUT.layer_bytes, 4 * LAYOUT.layer_bytes])
async def test_any_size_hint_reads_the_same_block(tmp_path: Path, hint: int) -> None:
    location, layers, store = await stored_file(tmp_path, "lz4")
    _, payload = ssd_of(store).read_block(location, None, hint)
    assert bytes(payload) == b"".join(layers)
    store.pool.close()
