"""lz4 on the SSD tier: the byte-shuffle codec, the block file's optional encodings,
exact accounting of compressed files, and recovery and reads that still refuse damage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from kvstore.checksum import ChecksumKind, checksum
from kvstore.config import StoreConfig
from kvstore.enums import PutOutcome, TierKind
from kvstore.errors import InvalidRequest
from kvstore.index import BlockEntry
from kvstore.layer_codec import (
    LayerCodec,
    LayerEncoding,
    decode_layer,
    shuffle,
    unshuffle_into,
)
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.mover import TierMover
from kvstore.put import PutSession
from kvstore.store import BlockStore
from kvstore.tiers.blockfile import (
    BlockFileHeader,
    CorruptBlockFile,
    decode_header,
    decode_payload,
    encode_header,
    header_bytes,
)
from kvstore.tiers.ssd import SUFFIX, SsdTier

KiB = 1 << 10
KIND = ChecksumKind.XXH3_64
LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype=DType.FLOAT16, block_tokens=64)
NS = Namespace(tenant="t", model_fingerprint="m", layout=LAYOUT)
PAGE_BYTES = 16 * KiB


def smooth(nbytes: int, dtype: torch.dtype, seed: int) -> bytes:
    """Values of a narrow range: the bytes holding sign and exponent repeat."""
    generator = torch.Generator().manual_seed(seed)
    count = nbytes // torch.empty((), dtype=dtype).element_size()
    values = torch.rand(count, generator=generator) * 0.2 + 1.0
    return values.to(dtype).view(torch.uint8).numpy().tobytes()


def noise(nbytes: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def block_layers(seed: int, *, compressible: tuple[bool, ...] = (True,) * 4) -> list[bytes]:
    return [
        smooth(LAYOUT.layer_bytes, torch.float16, seed * 10 + layer)
        if squeezes
        else noise(LAYOUT.layer_bytes, seed * 10 + layer)
        for layer, squeezes in enumerate(compressible)
    ]


# -- the codec --------------------------------------------------------------------------------


@pytest.mark.parametrize("element_bytes", [2, 4])
def test_shuffle_groups_each_byte_position_and_unshuffle_inverts_it(element_bytes: int) -> None:
    data = noise(element_bytes * 1000, seed=1)
    shuffled = shuffle(data, element_bytes)
    expected = np.frombuffer(data, np.uint8).reshape(-1, element_bytes).T.reshape(-1)
    assert np.array_equal(shuffled, expected)
    out = bytearray(len(data))
    unshuffle_into(shuffled.tobytes(), element_bytes, memoryview(out))
    assert bytes(out) == data


@pytest.mark.parametrize(
    ("dtype", "encoding"),
    [
        (torch.float16, LayerEncoding.SHUFFLE_LZ4),
        (torch.bfloat16, LayerEncoding.SHUFFLE_LZ4),
        (torch.float8_e4m3fn, LayerEncoding.LZ4),
    ],
)
def test_a_compressible_layer_is_stored_smaller_and_decodes_exactly(
    dtype: torch.dtype, encoding: LayerEncoding
) -> None:
    element_bytes = torch.empty((), dtype=dtype).element_size()
    layer = smooth(256 * KiB, dtype, seed=2)
    encoded = LayerCodec(element_bytes, min_saving=0.1).encode(layer)
    assert encoded.encoding is encoding
    assert len(encoded.data) <= 0.9 * len(layer)
    out = bytearray(len(layer))
    decode_layer(encoded.encoding, encoded.data, element_bytes, memoryview(out))
    assert bytes(out) == layer


def test_the_shuffle_is_what_makes_16_bit_floats_compress() -> None:
    layer = smooth(256 * KiB, torch.float16, seed=3)
    shuffled = len(LayerCodec(2, min_saving=0.0).encode(layer).data)
    unshuffled = len(LayerCodec(1, min_saving=0.0).encode(layer).data)
    assert shuffled < 0.8 * unshuffled


def test_random_bytes_stay_raw_and_the_raw_layer_is_the_input_itself() -> None:
    layer = noise(256 * KiB, seed=4)
    encoded = LayerCodec(2, min_saving=0.1).encode(layer)
    assert encoded.encoding is LayerEncoding.RAW
    assert bytes(encoded.data) == layer


def test_the_probe_decides_a_layer_whose_start_does_not_compress() -> None:
    # The first 64 KiB are noise, the rest zeros: the whole would compress, the probe
    # says no, so the layer is kept raw without compressing all of it.
    layer = noise(64 * KiB, seed=5) + bytes(192 * KiB)
    assert LayerCodec(2, min_saving=0.1).encode(layer).encoding is LayerEncoding.RAW
    assert LayerCodec(2, 0.1, probe_bytes=512 * KiB).encode(layer).encoding is not (
        LayerEncoding.RAW
    )


def test_min_saving_is_the_threshold() -> None:
    layer = smooth(128 * KiB, torch.float16, seed=6)
    saved = 1 - len(LayerCodec(2, min_saving=0.0).encode(layer).data) / len(layer)
    assert LayerCodec(2, min_saving=saved - 0.01).encode(layer).encoding is not (LayerEncoding.RAW)
    assert LayerCodec(2, min_saving=saved + 0.01).encode(layer).encoding is LayerEncoding.RAW


def test_bad_codec_settings_and_undecodable_data_are_refused() -> None:
    with pytest.raises(ValueError, match="min_saving"):
        LayerCodec(2, min_saving=1.0)
    with pytest.raises(ValueError, match="element_bytes"):
        LayerCodec(0, min_saving=0.1)
    with pytest.raises(ValueError, match="lz4"):
        decode_layer(LayerEncoding.SHUFFLE_LZ4, b"\xff" * 64, 2, memoryview(bytearray(1024)))
    encoded = LayerCodec(2, 0.1).encode(bytes(4096))
    with pytest.raises(ValueError, match="lz4 data"):  # fewer bytes than the layer has
        decode_layer(encoded.encoding, encoded.data, 2, memoryview(bytearray(8192)))


def test_config_rejects_unknown_compression_and_bad_saving() -> None:
    with pytest.raises(InvalidRequest, match="ssd_compression"):
        StoreConfig(ssd_compression="zstd")
    with pytest.raises(InvalidRequest, match="ssd_compress_min_saving"):
        StoreConfig(ssd_compress_min_saving=-0.1)


# -- block files ------------------------------------------------------------------------------


def make_store(tmp_path: Path, **config: object) -> BlockStore:
    settings: dict[str, object] = {
        "dram_bytes": 64 * PAGE_BYTES,
        "page_bytes": PAGE_BYTES,
        "ssd_dir": str(tmp_path / "ssd"),
        "ssd_compression": "lz4",
    }
    return BlockStore(StoreConfig(**{**settings, **config}))  # type: ignore[arg-type]


def put(store: BlockStore, key: bytes, layers: list[bytes]) -> BlockEntry:
    session = PutSession(store, NS, KIND)
    try:
        session.declare(key, b"")
        for layer, data in enumerate(layers):
            session.write(0, layer, 0, data, checksum(KIND, data))
        assert session.finish() == [PutOutcome.COMMITTED]
    finally:
        session.abort()
    (entry,) = store.find_prefix(NS, [key])
    return entry


def ssd_of(store: BlockStore) -> SsdTier:
    ssd = store.pool.ssd
    assert ssd is not None
    return ssd


def file_of(store: BlockStore, key: bytes) -> Path:
    return ssd_of(store).path_for(NS, key)


def header_json(path: Path) -> dict[str, object]:
    data = path.read_bytes()
    body = data[12 : header_bytes(data) - 8]
    parsed = json.loads(body)
    assert isinstance(parsed, dict)
    return parsed


async def test_mixed_layers_are_encoded_each_on_its_own_and_read_back(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    layers = block_layers(1, compressible=(True, False, True, False))
    assert await store.pool.write_to_ssd(put(store, b"A", layers))
    fields = header_json(file_of(store, b"A"))
    assert fields["layer_encodings"] == ["shuffle+lz4", "raw", "shuffle+lz4", "raw"]
    stored = fields["layer_stored_bytes"]
    assert isinstance(stored, list)
    assert stored[1] == stored[3] == LAYOUT.layer_bytes
    assert stored[0] < 0.9 * LAYOUT.layer_bytes
    header, payload = ssd_of(store).read_block(
        store.find_prefix(NS, [b"A"])[0].copies[TierKind.SSD]
    )  # type: ignore[arg-type]
    assert header.compressed
    assert bytes(payload) == b"".join(layers)
    store.pool.close()


async def test_with_compression_off_the_file_keeps_the_original_format(tmp_path: Path) -> None:
    store = make_store(tmp_path, ssd_compression="off")
    layers = block_layers(2)
    assert await store.pool.write_to_ssd(put(store, b"A", layers))
    path = file_of(store, b"A")
    assert "layer_encodings" not in header_json(path)
    assert path.stat().st_size == header_bytes(path.read_bytes()) + LAYOUT.block_bytes
    store.pool.close()
    # A tier with lz4 on reads (and recovers) the raw file as it is.
    restarted = make_store(tmp_path)
    assert TierMover(restarted).recover() == 1
    (entry,) = restarted.find_prefix(NS, [b"A"])
    assert bytes(await restarted.pool.read_from_ssd(entry)) == b"".join(layers)
    restarted.pool.close()


async def test_accounting_counts_the_stored_size_exactly(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    ssd = ssd_of(store)
    sizes = []
    for index, key in enumerate((b"A", b"B", b"C")):
        compressible = (True, True, index != 1, True)
        assert await store.pool.write_to_ssd(
            put(store, key, block_layers(index, compressible=compressible))
        )
        sizes.append(file_of(store, key).stat().st_size)
    assert (ssd.used_bytes, ssd.reserved_bytes) == (sum(sizes), 0)
    assert all(size < LAYOUT.block_bytes for size in sizes)
    store.pool.drop_copy(store.find_prefix(NS, [b"B"])[0], TierKind.SSD)
    assert ssd.used_bytes == sizes[0] + sizes[2]
    store.pool.close()
    restarted = make_store(tmp_path)
    assert TierMover(restarted).recover() == 2
    assert ssd_of(restarted).used_bytes == sizes[0] + sizes[2]
    restarted.pool.close()


@pytest.mark.parametrize(("compression", "blocks_kept"), [("off", 4), ("lz4", 7)])
async def test_capacity_holds_more_blocks_when_they_compress(
    tmp_path: Path, compression: str, blocks_kept: int
) -> None:
    # Room for four raw block files: stored at about half their size, all seven fit.
    raw_file_bytes = 4 * KiB + LAYOUT.block_bytes
    store = make_store(tmp_path, ssd_compression=compression, ssd_bytes=4 * raw_file_bytes)
    for index in range(7):
        await store.pool.write_to_ssd(put(store, bytes([65 + index]), block_layers(index)))
    assert store.pool.num_blocks(TierKind.SSD) == blocks_kept
    ssd = ssd_of(store)
    on_disk = sum(path.stat().st_size for path in ssd.directory.glob(f"*/*{SUFFIX}"))
    assert ssd.used_bytes == on_disk <= ssd.capacity_bytes
    store.pool.close()


async def test_a_flipped_byte_in_a_compressed_layer_is_never_served(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    entry = put(store, b"A", block_layers(3))
    assert await store.pool.write_to_ssd(entry)
    path = file_of(store, b"A")
    data = bytearray(path.read_bytes())
    data[header_bytes(bytes(data)) + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlockFile, match="layer 0 stored checksum"):
        await store.pool.read_from_ssd(entry)
    store.pool.close()


def test_a_header_whose_encodings_do_not_match_the_layout_is_corrupt() -> None:
    header = BlockFileHeader(
        NS,
        b"A",
        b"",
        KIND,
        (1, 2, 3, 4),
        layer_encodings=(LayerEncoding.RAW,) * 3,
        layer_stored_bytes=(1, 2, 3),
        stored_checksums=(0, 0, 0),
    )
    with pytest.raises(CorruptBlockFile, match="encoding counts"):
        decode_header(encode_header(header))


def test_a_stored_layer_that_decodes_to_other_bytes_fails_its_layer_checksum() -> None:
    layers = block_layers(4)
    codec = LayerCodec(2, 0.1)
    encoded = [codec.encode(layer) for layer in layers]
    header = BlockFileHeader(
        NS,
        b"A",
        b"",
        KIND,
        (0, *(checksum(KIND, layer) for layer in layers[1:])),  # layer 0's is wrong
        layer_encodings=tuple(layer.encoding for layer in encoded),
        layer_stored_bytes=tuple(len(layer.data) for layer in encoded),
        stored_checksums=tuple(xxhash.xxh3_64_intdigest(layer.data) for layer in encoded),
    )
    with pytest.raises(CorruptBlockFile, match="layer 0 checksum mismatch"):
        decode_payload(header, b"".join(bytes(layer.data) for layer in encoded))


async def test_recovery_drops_a_torn_compressed_file_and_keeps_the_whole_one(
    tmp_path: Path,
) -> None:
    store = make_store(tmp_path)
    for key in (b"A", b"B"):
        assert await store.pool.write_to_ssd(put(store, key, block_layers(key[0])))
    store.pool.close()
    torn = file_of(store, b"B")
    whole_size = torn.stat().st_size
    os.truncate(torn, whole_size - 1)
    restarted = make_store(tmp_path)
    assert TierMover(restarted).recover() == 1
    assert restarted.find_prefix(NS, [b"A"])
    assert not restarted.find_prefix(NS, [b"B"])
    assert not torn.exists()
    assert ssd_of(restarted).used_bytes == file_of(store, b"A").stat().st_size
    restarted.pool.close()
