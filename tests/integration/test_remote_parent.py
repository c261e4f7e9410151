"""Runs that continue a parent stored on another node (`parent_remote`), end to end.

A cluster cuts a chain into runs on different members; a run's first block names the
previous run's last block, which this server may not hold. The real server and client,
over the data plane and over gRPC (the `connect` fixture runs each test on both).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import torch
from write_through import write_through_daemon  # tests/write_through.py

from kvstore.client import (
    InvalidArgument,
    KVClient,
    KVForm,
    PutOutcome,
    PutResult,
)
from kvstore.codec import expected_shape
from kvstore.layout import DType, KVLayout, Namespace

KiB = 1 << 10
MiB = 1 << 20
Connect = Callable[..., KVClient]

# The previous run's tail, on another node: never stored here unless a test puts it.
ELSEWHERE = b"previous-run-tail"
RUN = [b"run-%d" % index for index in range(4)]


def toy_namespace(num_kv_heads: int, head_dim: int) -> Namespace:
    layout = KVLayout(
        num_layers=2,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=DType.FLOAT16,
        block_tokens=16,
    )
    return Namespace(tenant="tenant-a", model_fingerprint=f"toy-{head_dim}", layout=layout)


SMALL = toy_namespace(2, 8)  # 1 KiB layers: the client sends LayerRuns
# 64 KiB layers, more than half a message: the client sends LayerChunks.
LARGE = toy_namespace(8, 128)


def blocks_kv(layout: KVLayout, num_blocks: int, seed: int) -> torch.Tensor:
    """Random bytes as `num_blocks` blocks in the `blocks` form."""
    shape = expected_shape(layout, KVForm.BLOCKS, num_blocks)
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (*shape, 2), dtype=torch.uint8, generator=generator)
    return raw.view(torch.float16).reshape(shape)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


async def read_back(client: KVClient, keys: list[bytes]) -> torch.Tensor:
    shape = expected_shape(client.namespace.layout, KVForm.BLOCKS, len(keys))
    dest = torch.zeros(shape, dtype=torch.float16)
    assert await client.get_into(keys, dest, form=KVForm.BLOCKS) == len(keys)
    return dest


async def layer_put(
    client: KVClient, keys: list[bytes], kv: torch.Tensor, **parent: Any
) -> PutResult:
    async with client.layer_put(keys, **parent) as put:
        for layer in range(client.namespace.layout.num_layers):
            await put.send_layer(layer, kv[:, layer])
    assert put.result is not None
    return put.result


@pytest.mark.parametrize("namespace", [SMALL, LARGE], ids=["runs", "chunks"])
async def test_a_run_whose_parent_is_elsewhere_is_stored_and_found(
    connect: Connect, namespace: Namespace
) -> None:
    client = connect(namespace)
    kv = blocks_kv(namespace.layout, len(RUN), 1)
    result = await client.put_blocks(RUN, kv, parent_key=ELSEWHERE, parent_remote=True)
    assert result.outcomes == (PutOutcome.COMMITTED,) * len(RUN)
    assert (await client.lookup_keys(RUN)).num_matched == len(RUN)
    assert (await client.lookup_keys([ELSEWHERE, *RUN])).num_matched == 0
    assert same_bytes(await read_back(client, RUN), kv)


async def test_a_layer_put_whose_parent_is_elsewhere_is_stored(connect: Connect) -> None:
    client = connect()
    layout = client.namespace.layout
    kv = blocks_kv(layout, len(RUN), 2)
    result = await layer_put(client, RUN, kv, parent_key=ELSEWHERE, parent_remote=True)
    assert result.num_committed == len(RUN)
    assert (await client.lookup_keys(RUN)).num_matched == len(RUN)
    assert same_bytes(await read_back(client, RUN), kv)


async def test_without_parent_remote_an_absent_parent_is_still_missing(
    connect: Connect,
) -> None:
    client = connect()
    kv = blocks_kv(client.namespace.layout, len(RUN), 3)
    result = await client.put_blocks(RUN, kv, parent_key=ELSEWHERE)
    assert result.outcomes == (PutOutcome.PARENT_MISSING,) * len(RUN)
    assert (await client.lookup_keys(RUN)).num_matched == 0


async def test_a_parent_stored_here_is_linked_and_deleting_it_takes_the_run(
    connect: Connect,
) -> None:
    client = connect()
    layout = client.namespace.layout
    parent_kv = blocks_kv(layout, 1, 4)
    assert (await client.put_blocks([ELSEWHERE], parent_kv)).num_committed == 1
    kv = blocks_kv(layout, len(RUN), 5)
    result = await client.put_blocks(RUN, kv, parent_key=ELSEWHERE, parent_remote=True)
    assert result.num_committed == len(RUN)
    assert (await client.lookup_keys([ELSEWHERE, *RUN])).num_matched == 1 + len(RUN)
    # One chain now: the parent's delete takes its descendants, as for a local chain.
    assert await client.delete([ELSEWHERE]) == (1 + len(RUN), 0)
    assert (await client.lookup_keys(RUN)).num_matched == 0


async def test_a_remote_rooted_run_is_deleted_by_its_first_key(connect: Connect) -> None:
    client = connect()
    kv = blocks_kv(client.namespace.layout, len(RUN), 6)
    await client.put_blocks(RUN, kv, parent_key=ELSEWHERE, parent_remote=True)
    assert await client.delete([ELSEWHERE]) == (0, 0)
    assert await client.delete(RUN[:1]) == (len(RUN), 0)


async def test_parent_remote_without_a_parent_key_is_invalid(connect: Connect) -> None:
    client = connect()
    kv = blocks_kv(client.namespace.layout, len(RUN), 7)
    with pytest.raises(InvalidArgument, match=r"parent_remote but has no parent_key"):
        await client.put_blocks(RUN, kv, parent_remote=True)
    assert (await client.lookup_keys(RUN)).num_matched == 0
    with pytest.raises(InvalidArgument, match=r"parent_remote but has no parent_key"):
        await layer_put(client, RUN, kv, parent_remote=True)
    # The server keeps serving: the same put without the flag is stored.
    assert (await client.put_blocks(RUN, kv)).num_committed == len(RUN)


# -- restart -------------------------------------------------------------------------------


def serving(ssd_dir: Path, data_plane: bool) -> AbstractAsyncContextManager[KVClient]:
    return write_through_daemon(ssd_dir, SMALL, data_plane=data_plane, dram_bytes=32 * MiB)


async def ssd_recovered(client: KVClient, timeout_s: float = 30.0) -> int:
    """The SSD tier's block count once the restart's rebuild is done."""
    deadline = time.monotonic() + timeout_s
    while True:
        (ssd,) = [tier for tier in (await client.stats()).tiers if tier.tier.name == "SSD"]
        if ssd.name == "ssd":
            return ssd.num_blocks
        assert time.monotonic() < deadline, f"still {ssd.name!r} after {timeout_s}s"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
async def test_a_remote_rooted_run_survives_a_restart(tmp_path: Path, data_plane: bool) -> None:
    ssd_dir = tmp_path / "ssd"
    kv = blocks_kv(SMALL.layout, len(RUN), 8)
    async with serving(ssd_dir, data_plane) as client:
        result = await client.put_blocks(RUN, kv, parent_key=ELSEWHERE, parent_remote=True)
        assert result.num_committed == len(RUN)
    # The same directory, a new daemon: the run comes back whole, its root included.
    async with serving(ssd_dir, data_plane) as client:
        assert await ssd_recovered(client) == len(RUN)
        assert (await client.lookup_keys(RUN)).num_matched == len(RUN)
        assert same_bytes(await read_back(client, RUN), kv)
