"""A daemon remembers which blocks were put as a chain's first block, and says so.

A block put with no parent key is a chain's root. One put with `parent_remote` whose
parent is not here is a root on this node too, but not a chain's: a cluster client tells
the two apart by the lookup reply's `first_is_chain_root`, over gRPC and over the data
plane alike. The mark is in the block file, so it survives a restart; a file from before
the mark recovers as a block that is not known to be a chain's root. Real servers.
"""

from __future__ import annotations

import json
import struct
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from write_through import write_through_daemon  # tests/write_through.py

from kvstore.client import ClientOptions, DType, KVClient, KVForm, KVLayout, Namespace
from kvstore.codec import expected_shape
from kvstore.server import RunningServer

KiB = 1 << 10
MiB = 1 << 20
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=16)
NS = Namespace(tenant="acme", model_fingerprint="toy", layout=LAYOUT)
ROOT, CHILD = b"root", b"child"  # a chain put whole: ROOT is its first block
ELSEWHERE, REMOTE = b"on-another-node", b"remote-run-start"  # REMOTE continues ELSEWHERE


def blocks_kv(num_blocks: int, seed: int) -> torch.Tensor:
    shape = expected_shape(LAYOUT, KVForm.BLOCKS, num_blocks)
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (*shape, 2), dtype=torch.uint8, generator=generator)
    return raw.view(torch.float16).reshape(shape)


async def put_both(client: KVClient) -> None:
    assert (await client.put_blocks([ROOT, CHILD], blocks_kv(2, 1))).num_committed == 2
    result = await client.put_blocks(
        [REMOTE], blocks_kv(1, 2), parent_key=ELSEWHERE, parent_remote=True
    )
    assert result.num_committed == 1


async def flags(client: KVClient) -> dict[str, tuple[int, bool]]:
    """(num_matched, first_is_chain_root) of each lookup that tells the blocks apart."""
    asked = {
        "root": [ROOT],
        "chain": [ROOT, CHILD],
        "child": [CHILD],
        "remote": [REMOTE],
        "miss": [b"absent", ROOT],
        "none": [],
    }
    found = {}
    for name, keys in asked.items():
        match = await client.lookup_keys(keys)
        found[name] = (match.num_matched, match.first_is_chain_root)
    return found


EXPECTED = {
    "root": (1, True),
    "chain": (2, True),
    "child": (1, False),  # put under ROOT, linked here
    "remote": (1, False),  # a root here, but its chain began on another node
    "miss": (0, False),
    "none": (0, False),
}


def client_for(running: RunningServer, **options: Any) -> KVClient:
    return KVClient(f"127.0.0.1:{running.port}", NS, options=ClientOptions(**options))


async def test_the_lookup_reply_says_whether_the_first_match_is_a_chain_root(
    server: RunningServer,
) -> None:
    async with (
        client_for(server) as data_plane,
        client_for(server, data_plane=False) as grpc_stream,
        client_for(server, data_plane=False, lookup_streams=0) as grpc_unary,
    ):
        await put_both(data_plane)
        assert server.data_plane is not None
        before = server.data_plane.lookups
        assert await flags(data_plane) == EXPECTED
        assert server.data_plane.lookups == before + len(EXPECTED)
        assert await flags(grpc_stream) == EXPECTED
        assert await flags(grpc_unary) == EXPECTED
        assert server.data_plane.lookups == before + len(EXPECTED)  # gRPC ones not counted


# -- restart -------------------------------------------------------------------------------


def serving(ssd_dir: Path, data_plane: bool) -> AbstractAsyncContextManager[KVClient]:
    return write_through_daemon(ssd_dir, NS, data_plane=data_plane, dram_bytes=8 * MiB)


def block_files(ssd_dir: Path) -> dict[bytes, Path]:
    """Each block file under `ssd_dir`, by the key its header names."""
    found = {}
    for path in ssd_dir.rglob("*.kvb"):
        key = bytes.fromhex(header_body(path)["key"])
        found[key] = path
    return found


def header_body(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    (length,) = struct.unpack_from("<I", data, 8)
    body: dict[str, Any] = json.loads(data[12 : 12 + length])
    return body


def rewrite_header(path: Path, body: dict[str, Any]) -> None:
    """The file with its header replaced by `body`, checksummed as the tier does."""
    data = path.read_bytes()
    (length,) = struct.unpack_from("<I", data, 8)
    new_body = json.dumps(body, sort_keys=True).encode()
    prefix = data[:8] + struct.pack("<I", len(new_body))
    digest = struct.pack("<Q", xxhash.xxh3_64_intdigest(new_body))
    path.write_bytes(prefix + new_body + digest + data[12 + length + 8 :])


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
async def test_the_mark_survives_a_restart_on_the_ssd_directory(
    tmp_path: Path, data_plane: bool
) -> None:
    ssd_dir = tmp_path / "ssd"
    async with serving(ssd_dir, data_plane) as client:
        await put_both(client)
    files = block_files(ssd_dir)
    assert {key: header_body(path)["chain_root"] for key, path in files.items()} == {
        ROOT: True,
        CHILD: False,
        REMOTE: False,
    }
    async with serving(ssd_dir, data_plane) as client:
        assert await flags(client) == EXPECTED


async def test_a_block_file_from_before_the_mark_recovers_as_not_a_chain_root(
    tmp_path: Path,
) -> None:
    ssd_dir = tmp_path / "ssd"
    kv = blocks_kv(2, 1)
    async with serving(ssd_dir, data_plane=True) as client:
        await put_both(client)
    for path in block_files(ssd_dir).values():  # as a daemon before the mark wrote them
        body = header_body(path)
        del body["chain_root"]
        rewrite_header(path, body)
    async with serving(ssd_dir, data_plane=True) as client:
        assert await flags(client) == {**EXPECTED, "root": (1, False), "chain": (2, False)}
        dest = torch.zeros_like(kv)
        assert await client.get_into([ROOT, CHILD], dest, form=KVForm.BLOCKS) == 2
        assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))
        # A put of the chain's root now finds it stored; the mark stays as recovered.
        again = await client.put_blocks([ROOT], kv[:1])
        assert again.num_committed == 0
        assert (await client.lookup_keys([ROOT])).first_is_chain_root is False
