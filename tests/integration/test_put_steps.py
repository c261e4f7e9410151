"""A put of many small blocks is applied in steps of the event loop (server/transfer.py,
BLOCKS_PER_STEP), on both transports: other work runs while one message of hundreds of
blocks commits, and a checksum that fails in a later step fails the put without harming
the blocks the earlier steps committed. A put of many messages that all arrived at once
is applied a message a step (server/dataplane.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import torch
import xxhash
from raw_puts import opening, raw_put  # tests/raw_puts.py

from kvstore.checksum import ChecksumKind
from kvstore.client import DType, KVClient, KVForm, KVLayout, Namespace
from kvstore.server import RunningServer
from kvstore.server.transfer import BLOCKS_PER_STEP
from kvstore.wire.chunks import PUT_RUNS, encode_put_header, run_parts
from kvstore.wire.namespace import namespace_to_wire

# 512-byte blocks of one layer: a few hundred fit one short message, in one run.
SMALL = KVLayout(num_layers=1, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
NS = Namespace(tenant="acme", model_fingerprint="put-steps", layout=SMALL)
NUM_BLOCKS = 5 * BLOCKS_PER_STEP
DATA_LOSS = grpc.StatusCode.DATA_LOSS.value[0]
TRANSPORTS = pytest.mark.parametrize("data_plane", [False, True], ids=["grpc", "data-plane"])
ServerFactory = Callable[..., Awaitable[RunningServer]]


def one_message(keys: list[bytes], layers: list[bytes], checksums: list[int]) -> bytes:
    parts = run_parts(PUT_RUNS, 0, 0, checksums, layers)
    return opening(NS, keys) + b"".join(bytes(part) for part in parts)


def layer_of(index: int) -> bytes:
    return bytes([index % 251]) * SMALL.layer_bytes


async def counts_during(server: RunningServer, put: Awaitable[tuple[int, str]]) -> list[int]:
    """The blocks stored, as another task sees them at each of its turns while `put` runs
    (it must succeed)."""
    seen: list[int] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            seen.append(len(server.store.snapshot_entries(NS)))
            await asyncio.sleep(0)

    probing = asyncio.create_task(probe())
    try:
        assert await put == (0, "")
    finally:
        done.set()
        await probing
    return seen


@TRANSPORTS
async def test_one_message_of_many_blocks_commits_in_steps(
    server_factory: ServerFactory, data_plane: bool
) -> None:
    server = await server_factory()
    keys = [b"step-%d" % index for index in range(NUM_BLOCKS)]
    layers = [layer_of(index) for index in range(NUM_BLOCKS)]
    message = one_message(keys, layers, [xxhash.xxh3_64_intdigest(layer) for layer in layers])
    seen = await counts_during(server, raw_put(server, [message], data_plane))
    assert len(server.store.snapshot_entries(NS)) == NUM_BLOCKS
    # Other work ran between the steps: it saw the message part-committed.
    between = {count for count in seen if 0 < count < NUM_BLOCKS}
    assert len(between) >= 3, sorted(set(seen))


@TRANSPORTS
async def test_a_checksum_failing_in_a_later_step_fails_the_put_and_harms_nothing(
    server_factory: ServerFactory, data_plane: bool
) -> None:
    server = await server_factory()
    keys = [b"bad-%d" % index for index in range(NUM_BLOCKS)]
    layers = [layer_of(index) for index in range(NUM_BLOCKS)]
    checksums = [xxhash.xxh3_64_intdigest(layer) for layer in layers]
    bad = 3 * BLOCKS_PER_STEP + 5
    checksums[bad] ^= 1
    code, message = await raw_put(server, [one_message(keys, layers, checksums)], data_plane)
    assert code == DATA_LOSS, message
    async with KVClient(f"127.0.0.1:{server.port}", NS) as client:
        # What committed before the failing step is whole and right; nothing from it on.
        match = await client.lookup_keys(keys)
        assert match.num_matched <= bad
        stored = match.matched_keys
        dest = torch.zeros((len(stored), 1, *SMALL.layer_shape), dtype=torch.float16)
        assert await client.get_into(stored, dest, form=KVForm.BLOCKS) == len(stored)
        assert dest.view(torch.uint8).numpy().tobytes() == b"".join(layers[: len(stored)])


@TRANSPORTS
async def test_a_put_of_many_messages_lets_other_work_run_between_them(
    server_factory: ServerFactory, data_plane: bool
) -> None:
    """Frames already in the socket are read without a wait: a put whose messages all
    arrived would otherwise be applied in one step of the loop, however many there are."""
    server = await server_factory()
    # 32 blocks of 512 B: the put floor's 16 KiB a message, and no message long enough to be
    # cut in steps (BLOCKS_PER_STEP).
    per_message = BLOCKS_PER_STEP // 2
    num_messages = 24
    keys = [b"msg-%d" % index for index in range(per_message * num_messages)]
    layers = [layer_of(index) for index in range(len(keys))]
    messages = []
    for first in range(0, len(keys), per_message):
        batch = layers[first : first + per_message]
        checksums = [xxhash.xxh3_64_intdigest(layer) for layer in batch]
        # Each message declares its blocks (under the last one before them) and carries
        # them whole: every run reaches the last block declared (the put floor).
        if first:
            declared = [(keys[i], keys[i - 1]) for i in range(first, first + per_message)]
            head = encode_put_header(checksum_kind=ChecksumKind.XXH3_64.value, blocks=declared)
        else:
            head = opening(NS, keys[:per_message])
        parts = run_parts(PUT_RUNS, 0, first, checksums, batch)
        messages.append(head + b"".join(bytes(part) for part in parts))
    seen = await counts_during(server, raw_put(server, messages, data_plane))
    assert len(server.store.snapshot_entries(NS)) == len(keys)
    between = {count for count in seen if 0 < count < len(keys)}
    assert len(between) >= num_messages // 2, sorted(set(seen))


@TRANSPORTS
async def test_a_malformed_put_evicts_nothing_before_it_is_refused(
    server_factory: ServerFactory, data_plane: bool
) -> None:
    # DRAM full of another tenant's blocks; a put that declares many blocks and names
    # them all in a run without their bytes is refused before any room is made for it.
    running = await server_factory(
        **{"store.dram_bytes": 128 * SMALL.block_bytes, "store.page_bytes": SMALL.block_bytes}
    )
    for part in range(4):  # 100 blocks, in puts small enough to hold their blocks
        stored = [b"s-%d-%d" % (part, index) for index in range(25)]
        layers = [layer_of(index) for index in range(25)]
        checksums = [xxhash.xxh3_64_intdigest(layer) for layer in layers]
        message = one_message(stored, layers, checksums)
        assert await raw_put(running, [message], data_plane) == (0, "")
    other = Namespace(tenant="other", model_fingerprint="put-steps", layout=SMALL)
    keys = [b"o-%d" % index for index in range(100)]
    bare_run = run_parts(PUT_RUNS, 0, 0, [0] * len(keys), [b""])
    header = encode_put_header(
        namespace=namespace_to_wire(other).SerializeToString(),
        checksum_kind=ChecksumKind.XXH3_64.value,
        blocks=[(key, b"") for key in keys],
    )
    code, message = await raw_put(
        running, [header + b"".join(bytes(part) for part in bare_run)], data_plane
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "carries 0 bytes" in message
    assert len(running.store.snapshot_entries(NS)) == 100  # not one evicted for it


@TRANSPORTS
async def test_write_through_blocks_committed_before_a_put_fails_reach_ssd(
    server_factory: ServerFactory, tmp_path: Path, data_plane: bool
) -> None:
    running = await server_factory(
        **{
            "store.ssd_dir": str(tmp_path / "ssd"),
            "store.ssd_bytes": 64 * SMALL.block_bytes,
            "store.write_policy": "write-through",
        }
    )
    keys = [b"w-0", b"w-1"]
    good = layer_of(1)
    # Block 0 whole and right; block 1's checksum wrong: the put fails after block 0
    # committed, and block 0 stays stored, so write-through owes it its file.
    message = opening(NS, keys) + b"".join(
        bytes(part)
        for part in run_parts(
            PUT_RUNS, 0, 0, [xxhash.xxh3_64_intdigest(good), 12345], [good + layer_of(2)]
        )
    )
    code, _ = await raw_put(running, [message], data_plane)
    assert code == DATA_LOSS
    entry = running.store.pool.find_namespace(NS).blocks[b"w-0"]  # type: ignore[union-attr]

    async def on_ssd() -> bool:
        return "SSD" in {kind.name for kind in entry.copies}

    for _ in range(200):
        if await on_ssd():
            break
        await asyncio.sleep(0.01)
    assert await on_ssd()
