"""A cluster lookup waits only for the owners whose answers can change its prefix
(kvstore.client._cluster_lookup): a node that hangs (here a listener that the kernel
accepts on and nobody answers) but whose runs all lie past a block found missing delays
nothing, until it has its share of asks left in flight; one whose runs come first is
waited for; a cancelled lookup cancels its asks."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterator

import pytest
import torch

from kvstore.client import ClientOptions, KVClient, KVForm, Timeouts
from kvstore.client._cluster import ClusterClient
from kvstore.client._cluster_lookup import STRAGGLERS_PER_MEMBER
from kvstore.cluster.members import parse_static_target
from kvstore.cluster.placement import Placement
from kvstore.layout import Namespace
from kvstore.server import RunningServer

ServerFactory = Callable[..., Awaitable[RunningServer]]
RUN_BLOCKS = 2
NUM_BLOCKS = 24
HUNG_FOR_S = 60.0  # the lookup timeout: a lookup that waited on the hung node would fail


@pytest.fixture
def hung_node() -> Iterator[str]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # the kernel accepts; nobody ever reads or answers
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@pytest.fixture(params=["data-plane", "grpc"])
async def cluster(
    server_factory: ServerFactory,
    hung_node: str,
    request: pytest.FixtureRequest,
    make_namespace: Callable[..., Namespace],
) -> ClusterClient:
    servers = [await server_factory() for _ in range(2)]
    target = "cluster://" + ",".join([*(f"127.0.0.1:{s.port}" for s in servers), hung_node])
    options = ClientOptions(
        data_plane=request.param == "data-plane",
        cluster_run_blocks=RUN_BLOCKS,
        cluster_retry_s=60,
        timeouts=Timeouts(lookup=HUNG_FOR_S),
    )
    client = KVClient(target, make_namespace(), options=options)
    assert isinstance(client, ClusterClient)
    return client


def first_block_of(placement: Placement, keys: list[bytes], address: str) -> int:
    """The chain position of the first block that `address` owns (len(keys) if none)."""
    for run in placement.runs(keys):
        if run.owner.address == address:
            return run.start
    return len(keys)


def chain_where_the_hung_node_comes_late(
    client: KVClient, hung_node: str
) -> tuple[list[bytes], int]:
    """A chain whose first block on the hung node comes after at least two blocks."""
    placement = Placement(parse_static_target(client.target), RUN_BLOCKS)
    block_tokens = client.namespace.layout.block_tokens
    for seed in range(500):
        tokens = torch.randint(
            0, 50_000, (NUM_BLOCKS * block_tokens,), generator=torch.Generator().manual_seed(seed)
        ).tolist()
        keys = client.keys(tokens)
        hung_first = first_block_of(placement, keys, hung_node)
        if 3 <= hung_first < NUM_BLOCKS:
            return keys, hung_first
    raise AssertionError("no such chain in 500 seeds")


async def test_a_hung_node_whose_runs_lie_past_a_miss_delays_nothing(
    cluster: ClusterClient, hung_node: str, make_kv: Callable[..., torch.Tensor]
) -> None:
    keys, hung_first = chain_where_the_hung_node_comes_late(cluster, hung_node)
    stored = hung_first - 1  # the block before the hung node's first is on a live node
    layout = cluster.namespace.layout
    result = await cluster.put_blocks(keys[:stored], make_kv(layout, stored, form=KVForm.BLOCKS))
    assert result.num_committed == stored

    # Twice: the hung node is never found failed, so it is asked (and not waited for)
    # every time.
    for _ in range(2):
        match = await asyncio.wait_for(cluster.lookup_keys(keys), timeout=HUNG_FOR_S / 4)
        assert match.num_matched == stored
        assert len(match.tiers) == stored
        assert match.first_is_chain_root
    hung = next(m for m in cluster.membership.placement.members if m.address == hung_node)
    assert cluster.nodes.reachable(hung)  # its asks are still in flight, not failed
    # One left behind per lookup. A live node's ask the answer did not need may still be
    # finishing on a loaded machine; those end on their own.
    assert cluster._stragglers.count(hung.node_id) == 2
    await asyncio.wait_for(cluster.close(), timeout=HUNG_FOR_S / 4)
    assert not cluster._stragglers


async def test_a_hung_node_whose_runs_come_first_is_waited_for_and_a_cancel_cancels(
    cluster: ClusterClient, hung_node: str, make_kv: Callable[..., torch.Tensor]
) -> None:
    keys, hung_first = chain_where_the_hung_node_comes_late(cluster, hung_node)
    layout = cluster.namespace.layout
    result = await cluster.put_blocks(
        keys[:hung_first], make_kv(layout, hung_first, form=KVForm.BLOCKS)
    )
    assert result.num_committed == hung_first  # every block before the hung node's
    # The live nodes hold every block before the hung node's first and lack their next
    # ones, so the prefix ends after that block or later: the hung node must answer.
    lookup = asyncio.ensure_future(cluster.lookup_keys(keys))
    done, _ = await asyncio.wait([lookup], timeout=1.0)
    assert not done
    lookup.cancel()
    with pytest.raises(asyncio.CancelledError):
        await lookup
    for _ in range(10):  # the cancelled asks end within a few steps of the loop
        if not cluster._stragglers:
            break
        await asyncio.sleep(0.01)
    assert not cluster._stragglers
    await cluster.close()


async def test_a_hung_node_is_left_at_most_its_share_of_asks_then_waited_for_and_passed_over(
    server_factory: ServerFactory,
    hung_node: str,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
) -> None:
    servers = [await server_factory() for _ in range(2)]
    target = "cluster://" + ",".join([*(f"127.0.0.1:{s.port}" for s in servers), hung_node])
    lookup_s = 2.0
    options = ClientOptions(
        cluster_run_blocks=RUN_BLOCKS, cluster_retry_s=60, timeouts=Timeouts(lookup=lookup_s)
    )
    async with KVClient(target, make_namespace(), options=options) as cluster:
        assert isinstance(cluster, ClusterClient)
        keys, hung_first = chain_where_the_hung_node_comes_late(cluster, hung_node)
        stored = hung_first - 1
        layout = cluster.namespace.layout
        await cluster.put_blocks(keys[:stored], make_kv(layout, stored, form=KVForm.BLOCKS))
        for _ in range(STRAGGLERS_PER_MEMBER):  # each leaves its ask of the hung node
            match = await asyncio.wait_for(cluster.lookup_keys(keys), timeout=lookup_s / 2)
            assert match.num_matched == stored
        hung = next(m for m in cluster.membership.placement.members if m.address == hung_node)
        # The hung node's asks; a live node's unneeded ask may still be on its way on a
        # loaded machine, and is left too (it ends on its own at once).
        assert cluster._stragglers.count(hung.node_id) == STRAGGLERS_PER_MEMBER
        # The hung node has its share: the next lookup waits for its ask, which ends at
        # the lookup timeout and has the node passed over.
        lookup = asyncio.ensure_future(cluster.lookup_keys(keys))
        done, _ = await asyncio.wait([lookup], timeout=lookup_s / 4)
        assert not done
        assert (await lookup).num_matched == stored
        assert not cluster.nodes.reachable(hung)
        assert not cluster._stragglers
        match = await asyncio.wait_for(cluster.lookup_keys(keys), timeout=lookup_s / 2)
        assert match.num_matched == stored  # asked of the live nodes only, now
        assert not cluster._stragglers
