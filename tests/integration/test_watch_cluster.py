"""WatchBlocks through the client library's other doors: a cluster target, whose members'
streams merge into one (kvstore.client._cluster_watch), and the blocking facade."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import torch

from kvstore.client import (
    BlockEventKind,
    BlockEvents,
    BlockView,
    ClientOptions,
    KVClient,
    KVForm,
    SyncKVClient,
)
from kvstore.layout import Namespace
from kvstore.server import RunningServer

ServerFactory = Callable[..., Awaitable[RunningServer]]
MakeKV = Callable[..., torch.Tensor]
NUM_BLOCKS = 64  # 32 runs: all on two of three nodes with odds (2/3)^32 x 3, about 1e-5


async def held_by_node(
    nodes: list[RunningServer], namespace: Namespace, keys: list[bytes]
) -> dict[str, set[bytes]]:
    """What each node's own lookups find among `keys`, by its address."""
    held: dict[str, set[bytes]] = {}
    for node in nodes:
        address = f"127.0.0.1:{node.port}"
        async with KVClient(address, namespace) as client:
            held[address] = {k for k in keys if (await client.lookup_keys([k])).num_matched}
    return held


async def test_a_cluster_watch_merges_every_node_and_drops_a_lost_one(
    server_factory: ServerFactory, make_namespace: Callable[..., Namespace], make_kv: MakeKV
) -> None:
    nodes = [await server_factory() for _ in range(3)]
    target = "cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in nodes)
    namespace = make_namespace()
    options = ClientOptions(cluster_run_blocks=2, cluster_retry_s=0.2)
    view = BlockView()
    batches: list[BlockEvents] = []
    changed = asyncio.Event()

    async with KVClient(target, namespace, options=options) as cluster:
        stream = cluster.watch_blocks()

        async def follow() -> None:
            async for batch in stream:
                view.apply(batch)
                batches.append(batch)
                changed.set()

        async def wait_until(condition: Callable[[], bool]) -> None:
            async with asyncio.timeout(20):
                while not condition():
                    changed.clear()
                    await changed.wait()

        task = asyncio.create_task(follow())
        try:
            addresses = {f"127.0.0.1:{node.port}" for node in nodes}
            await wait_until(lambda: view.synced == addresses)
            keys = [bytes([9, i]) * 8 for i in range(NUM_BLOCKS)]
            kv = make_kv(namespace.layout, NUM_BLOCKS, form=KVForm.BLOCKS)
            result = await cluster.put_blocks(keys, kv)
            assert result.num_committed == NUM_BLOCKS
            truth = await held_by_node(nodes, namespace, keys)
            assert sum(len(held) for held in truth.values()) == NUM_BLOCKS
            assert sum(1 for held in truth.values() if held) == 3  # spread over all three
            await wait_until(lambda: {a: view.keys(a) for a in addresses} == truth)
            for key in keys:
                assert len(view.nodes_of(key)) == 1
            # Each node's batches are numbered on their own, without a hole.
            expected = dict.fromkeys(addresses, 1)
            for batch in batches:
                assert batch.first_sequence == expected[batch.node]
                expected[batch.node] += len(batch.events)

            # A node that goes away: the client's own GAP empties its part of the view.
            lost = f"127.0.0.1:{nodes[1].port}"
            await nodes[1].drain()
            await wait_until(lambda: lost not in view.synced)
            gap = batches[-1]
            assert (gap.node, gap.first_sequence) == (lost, 0)
            assert [event.kind for event in gap.events] == [BlockEventKind.GAP]
            assert view.keys(lost) == set()
            for address in addresses - {lost}:
                assert view.keys(address) == truth[address]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await stream.aclose()


def test_the_sync_facade_watches(
    store_target: str, make_namespace: Callable[..., Namespace], make_kv: MakeKV
) -> None:
    namespace = make_namespace(model_fingerprint="sync-watch")
    with SyncKVClient(store_target, namespace) as client:
        kv = make_kv(namespace.layout, 2, form=KVForm.BLOCKS)
        client.put_blocks([b"w-0", b"w-1"], kv)
        view = BlockView()
        stream = client.watch_blocks()
        try:
            while store_target not in view.synced:
                view.apply(next(stream))
            assert view.keys(store_target) == {b"w-0", b"w-1"}
            client.delete([b"w-1"])
            client.put_blocks([b"w-2"], kv[:1], parent_key=b"w-0")
            while view.keys(store_target) != {b"w-0", b"w-2"}:
                view.apply(next(stream))
            assert view.blocks[store_target][b"w-2"].parent_key == b"w-0"
        finally:
            stream.close()
