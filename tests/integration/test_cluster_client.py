"""The cluster client (issue 16, item 3): `KVClient("cluster://...")` over three real
in-process daemons does every call of the single-node API, with runs placed by weighted
rendezvous, fetched in parallel, and a lost node costing misses, never errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from threaded_server import server_thread

from kvstore.client import (
    ChecksumError,
    ClientOptions,
    DType,
    InvalidArgument,
    KVClient,
    KVForm,
    KVLayout,
    KVStoreClientError,
    PrefixMatch,
    PutOutcome,
    ResourceExhausted,
    SyncKVClient,
    Unauthenticated,
    Unavailable,
)
from kvstore.client._cluster import ClusterClient
from kvstore.cluster.members import parse_static_target
from kvstore.cluster.placement import Placement
from kvstore.enums import TierKind
from kvstore.layout import Namespace
from kvstore.server import RunningServer
from kvstore.server.auth import token_sha256
from kvstore.server.servicer import REFUSED_PUT_READ_ON_S

ServerFactory = Callable[..., Awaitable[RunningServer]]
RUN_BLOCKS = 2
NUM_BLOCKS = 24  # 12 runs over 3 nodes
MiB = 1 << 20


def cluster_options(data_plane: bool, **overrides: Any) -> ClientOptions:
    return ClientOptions(
        data_plane=data_plane, cluster_run_blocks=RUN_BLOCKS, cluster_retry_s=60, **overrides
    )


@pytest.fixture
async def nodes(server_factory: ServerFactory) -> list[RunningServer]:
    return [await server_factory() for _ in range(3)]


def static_target(nodes: list[RunningServer]) -> str:
    return "cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in nodes)


@pytest.fixture(params=["data-plane", "grpc"])
async def cluster(
    nodes: list[RunningServer],
    request: pytest.FixtureRequest,
    make_namespace: Callable[..., Namespace],
) -> AsyncIterator[KVClient]:
    options = cluster_options(request.param == "data-plane")
    async with KVClient(static_target(nodes), make_namespace(), options=options) as client:
        yield client


def tokens_for(num_blocks: int, block_tokens: int, seed: int = 1) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (num_blocks * block_tokens,), generator=generator).tolist()


def owners(nodes: list[RunningServer], keys: list[bytes]) -> list[int]:
    """For each block of `keys`, the index in `nodes` of the node placement gives it."""
    placement = Placement(parse_static_target(static_target(nodes)), RUN_BLOCKS)
    ports = [f"127.0.0.1:{node.port}" for node in nodes]
    found = []
    for run in placement.runs(keys):
        found += [ports.index(run.owner.address)] * (run.stop - run.start)
    return found


async def stored_on(node: RunningServer, namespace: Namespace, keys: list[bytes]) -> list[bool]:
    async with KVClient(f"127.0.0.1:{node.port}", namespace) as client:
        return [(await client.lookup_keys([key])).num_matched == 1 for key in keys]


async def test_a_cluster_target_makes_a_cluster_client(
    cluster: KVClient,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    assert isinstance(cluster, ClusterClient)
    assert isinstance(cluster, KVClient)


async def test_put_places_each_run_on_its_owner_and_the_chain_reads_back(
    cluster: KVClient,
    nodes: list[RunningServer],
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    layout = cluster.namespace.layout
    tokens = tokens_for(NUM_BLOCKS, layout.block_tokens)
    kv = make_kv(layout, NUM_BLOCKS, seed=3)
    result = await cluster.put(tokens, kv)
    assert result.outcomes == (PutOutcome.COMMITTED,) * NUM_BLOCKS
    keys = cluster.keys(tokens)
    placed = owners(nodes, keys)
    assert len(set(placed)) > 1, "the chain should spread over several nodes"
    for index, node in enumerate(nodes):
        here = await stored_on(node, cluster.namespace, keys)
        assert here == [owner == index for owner in placed], f"node {index} holds the wrong runs"

    match = await cluster.lookup(tokens)
    assert match.num_matched == NUM_BLOCKS
    assert len(match.tiers) == NUM_BLOCKS
    dest = torch.zeros_like(kv)
    assert await cluster.get_into(match, dest) == NUM_BLOCKS
    assert same_bytes(dest, kv)


def cut_inside_a_run(nodes: list[RunningServer], keys: list[bytes]) -> int:
    """A cut of `keys` whose tail starts inside a run: its first blocks continue the
    parent's run, whose first key is not in the tail."""
    placement = Placement(parse_static_target(static_target(nodes)), RUN_BLOCKS)
    return next(cut for cut in range(3, len(keys)) if placement.lead_blocks(keys[cut:]) > 0)


async def put_tail(
    cluster: KVClient, how: str, keys: list[bytes], kv: torch.Tensor, parent_key: bytes
) -> tuple[PutOutcome, ...]:
    if how == "put_blocks":
        return (await cluster.put_blocks(keys, kv, parent_key=parent_key)).outcomes
    async with cluster.layer_put(keys, parent_key=parent_key) as put:  # the connector's save
        for layer in range(cluster.namespace.layout.num_layers):
            await put.send_layer(layer, kv[:, layer])
    assert put.result is not None
    return put.result.outcomes


@pytest.mark.parametrize("how", ["put_blocks", "layer_put"])
async def test_a_tail_put_after_its_head_is_placed_as_the_whole_chain_is(
    cluster: KVClient,
    nodes: list[RunningServer],
    how: str,
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    # An agent's next turn puts only its new blocks, chained to the last cached one;
    # a later lookup of the whole chain must find them where it looks.
    layout = cluster.namespace.layout
    keys = cluster.keys(tokens_for(NUM_BLOCKS, layout.block_tokens, seed=21))
    kv = make_kv(layout, NUM_BLOCKS, form=KVForm.BLOCKS, seed=22)
    cut = cut_inside_a_run(nodes, keys)
    head = await cluster.put_blocks(keys[:cut], kv[:cut])
    tail = await put_tail(cluster, how, keys[cut:], kv[cut:], keys[cut - 1])
    assert head.outcomes + tail == (PutOutcome.COMMITTED,) * NUM_BLOCKS
    placed = owners(nodes, keys)
    for index, node in enumerate(nodes):
        here = await stored_on(node, cluster.namespace, keys)
        assert here == [owner == index for owner in placed], f"node {index} holds the wrong runs"
    match = await cluster.lookup_keys(keys)
    assert match.num_matched == NUM_BLOCKS
    dest = torch.zeros_like(kv)
    assert await cluster.get_into(match, dest, form=KVForm.BLOCKS) == NUM_BLOCKS
    assert same_bytes(dest, kv)


async def test_a_tail_whose_parent_no_node_holds_is_parent_missing_and_stores_nothing(
    cluster: KVClient,
    nodes: list[RunningServer],
    make_kv: Callable[..., torch.Tensor],
) -> None:
    layout = cluster.namespace.layout
    keys = cluster.keys(tokens_for(NUM_BLOCKS, layout.block_tokens, seed=25))
    cut = cut_inside_a_run(nodes, keys)
    tail = keys[cut:]
    result = await cluster.put_blocks(
        tail, make_kv(layout, len(tail), form=KVForm.BLOCKS), parent_key=keys[cut - 1]
    )
    assert result.outcomes == (PutOutcome.PARENT_MISSING,) * len(tail)
    for node in nodes:
        assert not any(await stored_on(node, cluster.namespace, tail))


def placement_of(nodes: list[RunningServer]) -> Placement:
    return Placement(parse_static_target(static_target(nodes)), RUN_BLOCKS)


def node_of(nodes: list[RunningServer], placement: Placement, key: bytes) -> RunningServer:
    """The node that owns the run that starts at `key`."""
    address = placement.owner(key).address
    return next(node for node in nodes if f"127.0.0.1:{node.port}" == address)


def chain_whose_second_block_leaves_the_root(
    nodes: list[RunningServer], client: KVClient, first_seed: int
) -> list[bytes]:
    """A chain whose second block is no run start key and is owned by another node than
    its root: were the root to head a run, that block would be the root's node's."""
    placement = placement_of(nodes)
    block_tokens = client.namespace.layout.block_tokens
    for seed in range(first_seed, first_seed + 200):
        keys = client.keys(tokens_for(NUM_BLOCKS, block_tokens, seed=seed))
        if not placement.is_run_start(keys[1]) and (
            placement.owner(keys[0]) != placement.owner(keys[1])
        ):
            return keys
    raise AssertionError("no such chain in 200 seeds")


async def lookup_on(node: RunningServer, namespace: Namespace, keys: list[bytes]) -> PrefixMatch:
    async with KVClient(f"127.0.0.1:{node.port}", namespace) as client:
        return await client.lookup_keys(keys)


async def assert_placed(cluster: KVClient, nodes: list[RunningServer], keys: list[bytes]) -> None:
    placed = owners(nodes, keys)
    for index, node in enumerate(nodes):
        here = await stored_on(node, cluster.namespace, keys)
        assert here == [owner == index for owner in placed], f"node {index} holds the wrong runs"


async def test_a_chains_root_is_stored_alone_and_its_next_blocks_by_their_own_keys(
    cluster: KVClient,
    nodes: list[RunningServer],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    keys = chain_whose_second_block_leaves_the_root(nodes, cluster, 40)
    layout = cluster.namespace.layout
    kv = make_kv(layout, NUM_BLOCKS, form=KVForm.BLOCKS, seed=41)
    result = await cluster.put_blocks(keys, kv)
    assert result.outcomes == (PutOutcome.COMMITTED,) * NUM_BLOCKS
    placement = placement_of(nodes)
    root_node = node_of(nodes, placement, keys[0])
    next_node = node_of(nodes, placement, keys[1])
    assert await stored_on(root_node, cluster.namespace, keys[:2]) == [True, False]
    assert await stored_on(next_node, cluster.namespace, keys[1:2]) == [True]
    await assert_placed(cluster, nodes, keys)
    # The root's node knows it as a chain's first block; keys[1], whose parent is on
    # another node, is a local root there but not a chain's first block.
    assert (await lookup_on(root_node, cluster.namespace, keys[:1])).first_is_chain_root
    second = await lookup_on(next_node, cluster.namespace, keys[1:2])
    assert second.num_matched == 1
    assert not second.first_is_chain_root
    match = await cluster.lookup_keys(keys)
    assert match.num_matched == NUM_BLOCKS
    assert match.first_is_chain_root
    dest = torch.zeros_like(kv)
    assert await cluster.get_into(match, dest, form=KVForm.BLOCKS) == NUM_BLOCKS
    assert same_bytes(dest, kv)


@pytest.mark.parametrize("how", ["put_blocks", "layer_put"])
async def test_a_tail_put_after_a_root_only_put_starts_a_run_of_its_own(
    cluster: KVClient,
    nodes: list[RunningServer],
    how: str,
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    # A system prompt of one block put first; a conversation then puts its own blocks
    # chained to it. They go to the owner of their own first key, where a lookup of the
    # whole chain looks, not to the root's node.
    keys = chain_whose_second_block_leaves_the_root(nodes, cluster, 60)
    layout = cluster.namespace.layout
    kv = make_kv(layout, NUM_BLOCKS, form=KVForm.BLOCKS, seed=61)
    root = await cluster.put_blocks(keys[:1], kv[:1])
    tail = await put_tail(cluster, how, keys[1:], kv[1:], keys[0])
    assert root.outcomes + tail == (PutOutcome.COMMITTED,) * NUM_BLOCKS
    root_node = node_of(nodes, placement_of(nodes), keys[0])
    assert await stored_on(root_node, cluster.namespace, keys[:2]) == [True, False]
    await assert_placed(cluster, nodes, keys)
    match = await cluster.lookup_keys(keys)
    assert match.num_matched == NUM_BLOCKS
    dest = torch.zeros_like(kv)
    assert await cluster.get_into(match, dest, form=KVForm.BLOCKS) == NUM_BLOCKS
    assert same_bytes(dest, kv)


def cut_after_a_remote_run_start(
    nodes: list[RunningServer], client: KVClient
) -> tuple[list[bytes], int]:
    """A chain and cut whose tail's parent starts a run on another node than the block
    before it (so it is stored as a local root continuing a remote parent), and whose
    tail's first block is no run start and has another owner than the parent."""
    placement = placement_of(nodes)
    block_tokens = client.namespace.layout.block_tokens
    for seed in range(80, 400):
        keys = client.keys(tokens_for(NUM_BLOCKS, block_tokens, seed=seed))
        per_block = owners(nodes, keys)
        for cut in range(3, NUM_BLOCKS - 1):
            parent = keys[cut - 1]
            if (
                placement.is_run_start(parent)
                and per_block[cut - 2] != per_block[cut - 1]
                and placement.lead_blocks(keys[cut:]) > 0
                and placement.owner(keys[cut]) != placement.owner(parent)
            ):
                return keys, cut
    raise AssertionError("no such chain")


@pytest.mark.parametrize("how", ["put_blocks", "layer_put"])
async def test_a_tail_whose_parent_is_a_remote_parent_run_start_continues_its_run(
    cluster: KVClient,
    nodes: list[RunningServer],
    how: str,
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    keys, cut = cut_after_a_remote_run_start(nodes, cluster)
    layout = cluster.namespace.layout
    kv = make_kv(layout, NUM_BLOCKS, form=KVForm.BLOCKS, seed=81)
    head = await cluster.put_blocks(keys[:cut], kv[:cut])
    # The parent is a root on its node, but not a chain's first block: the tail's lead
    # blocks continue its run there.
    holder = node_of(nodes, placement_of(nodes), keys[cut - 1])
    parent = await lookup_on(holder, cluster.namespace, [keys[cut - 1]])
    assert parent.num_matched == 1
    assert not parent.first_is_chain_root
    tail = await put_tail(cluster, how, keys[cut:], kv[cut:], keys[cut - 1])
    assert head.outcomes + tail == (PutOutcome.COMMITTED,) * NUM_BLOCKS
    assert await stored_on(holder, cluster.namespace, keys[cut : cut + 1]) == [True]
    await assert_placed(cluster, nodes, keys)
    match = await cluster.lookup_keys(keys)
    assert match.num_matched == NUM_BLOCKS
    dest = torch.zeros_like(kv)
    assert await cluster.get_into(match, dest, form=KVForm.BLOCKS) == NUM_BLOCKS
    assert same_bytes(dest, kv)


async def test_iter_layers_yields_each_layer_once_every_node_delivered_it(
    cluster: KVClient,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    layout = cluster.namespace.layout
    tokens = tokens_for(NUM_BLOCKS, layout.block_tokens, seed=2)
    kv = make_kv(layout, NUM_BLOCKS, form=KVForm.BLOCKS, seed=4)
    keys = cluster.keys(tokens)
    await cluster.put_blocks(keys, kv)
    layers = []
    async for arrival in cluster.iter_layers(keys):
        assert arrival.num_blocks == NUM_BLOCKS
        assert same_bytes(arrival.kv, kv[:, arrival.layer])
        layers.append(arrival.layer)
    assert layers == list(range(layout.num_layers))

    dest = torch.zeros_like(kv)
    seen = [arrival.layer async for arrival in cluster.iter_layers(keys, dest, form=KVForm.BLOCKS)]
    assert seen == list(range(layout.num_layers))
    assert same_bytes(dest, kv)


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
async def test_a_nodes_fault_comes_after_the_layers_every_node_delivered(
    nodes: list[RunningServer],
    make_namespace: Callable[..., Namespace],
    make_layout: Callable[..., KVLayout],
    make_kv: Callable[..., torch.Tensor],
    data_plane: bool,
) -> None:
    """A block whose layer 2 fails its checksum on its node: layers 0 and 1, whole and
    verified on every node, are handed out first; then the fault is raised."""
    namespace = make_namespace(make_layout(num_layers=4))
    options = cluster_options(data_plane)
    async with KVClient(static_target(nodes), namespace, options=options) as cluster:
        tokens = tokens_for(NUM_BLOCKS, namespace.layout.block_tokens, seed=5)
        kv = make_kv(namespace.layout, NUM_BLOCKS, form=KVForm.BLOCKS, seed=6)
        keys = cluster.keys(tokens)
        await cluster.put_blocks(keys, kv)
        victim = keys[5]
        node = nodes[owners(nodes, keys)[5]]
        (entry,) = [entry for entry in node.store.pool.entries() if entry.key == victim]
        at = 2 * namespace.layout.layer_bytes + 3  # inside layer 2
        handle = entry.copies[TierKind.DRAM]
        (byte,) = node.store.dram.read(handle, at, 1)
        node.store.dram.write(handle, at, bytes([byte[0] ^ 0x40]))

        arrived: list[int] = []

        async def receive() -> None:
            async for arrival in cluster.iter_layers(keys):
                arrived.append(arrival.layer)

        with pytest.raises(ChecksumError, match="layer 2"):
            await receive()
        assert arrived == [0, 1]


async def test_a_longer_query_matches_the_stored_prefix_across_nodes(
    cluster: KVClient,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    layout = cluster.namespace.layout
    tokens = tokens_for(NUM_BLOCKS, layout.block_tokens, seed=5)
    stored = 7  # ends inside a run
    await cluster.put(tokens[: stored * layout.block_tokens], make_kv(layout, stored))
    match = await cluster.lookup(tokens)
    assert match.num_matched == stored
    dest = make_kv(layout, NUM_BLOCKS, seed=9)
    assert await cluster.get_into(cluster.keys(tokens), dest) == stored


async def test_layer_put_across_nodes(
    cluster: KVClient,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    layout = cluster.namespace.layout
    tokens = tokens_for(NUM_BLOCKS, layout.block_tokens, seed=6)
    keys = cluster.keys(tokens)
    kv = make_kv(layout, NUM_BLOCKS, form=KVForm.BLOCKS, seed=7)
    async with cluster.layer_put(keys) as put:
        for layer in range(layout.num_layers):
            await put.send_layer(layer, kv[:, layer].contiguous())
    assert put.result is not None
    assert put.result.outcomes == (PutOutcome.COMMITTED,) * NUM_BLOCKS
    dest = torch.zeros_like(kv)
    assert await cluster.get_into(keys, dest, form=KVForm.BLOCKS) == NUM_BLOCKS
    assert same_bytes(dest, kv)


async def test_pin_unpin_delete_and_stats_reach_every_node(
    cluster: KVClient,
    nodes: list[RunningServer],
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    layout = cluster.namespace.layout
    tokens = tokens_for(NUM_BLOCKS, layout.block_tokens, seed=8)
    await cluster.put(tokens, make_kv(layout, NUM_BLOCKS))
    keys = cluster.keys(tokens)
    stats = await cluster.stats()
    assert sum(tier.num_blocks for tier in stats.tiers) == NUM_BLOCKS
    assert stats.blocks_put == NUM_BLOCKS
    assert await cluster.pin(keys, ttl_s=30) == NUM_BLOCKS
    assert await cluster.unpin(keys) == NUM_BLOCKS
    assert await cluster.delete(keys[4:]) == (NUM_BLOCKS - 4, 0)
    assert (await cluster.lookup(tokens)).num_matched == 4
    per_member = await cluster.cluster_stats()
    assert len(per_member.members) == 3
    assert all(entry.stats is not None for entry in per_member.members)


async def test_a_stopped_node_costs_misses_not_errors(
    nodes: list[RunningServer],
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    layout = make_namespace().layout
    tokens = tokens_for(NUM_BLOCKS, layout.block_tokens, seed=10)
    kv = make_kv(layout, NUM_BLOCKS, seed=11)
    options = cluster_options(True)
    async with KVClient(static_target(nodes), make_namespace(), options=options) as cluster:
        await cluster.put(tokens, kv)
        keys = cluster.keys(tokens)
        placed = owners(nodes, keys)
        lost = placed[RUN_BLOCKS * 2]  # the node of the third run
        first_lost = placed.index(lost)
        await nodes[lost].drain()

        match = await cluster.lookup(tokens)
        assert match.num_matched == first_lost
        dest = torch.zeros_like(kv)
        assert await cluster.get_into(keys, dest) == first_lost
        tokens_ok = first_lost * layout.block_tokens
        assert same_bytes(dest[:, :, :tokens_ok], kv[:, :, :tokens_ok])
        result = await cluster.put_blocks(
            [bytes([7, i]) * 16 for i in range(NUM_BLOCKS)],
            make_kv(layout, NUM_BLOCKS, form=KVForm.BLOCKS),
        )
        assert PutOutcome.NODE_UNREACHABLE in result.outcomes
        assert set(result.outcomes) <= {PutOutcome.NODE_UNREACHABLE, PutOutcome.COMMITTED}
        stats = await cluster.cluster_stats()
        assert sum(entry.stats is None for entry in stats.members) == 1


def test_the_sync_facade_takes_a_cluster_target(
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    layout = make_namespace().layout
    tokens = tokens_for(4, layout.block_tokens, seed=12)
    kv = make_kv(layout, 4)
    options = cluster_options(True)
    with contextlib.ExitStack() as servers:
        targets = [servers.enter_context(server_thread()) for _ in range(3)]
        client = servers.enter_context(
            SyncKVClient("cluster://" + ",".join(targets), make_namespace(), options=options)
        )
        assert client.put(tokens, kv).num_committed == 4
        dest = torch.zeros_like(kv)
        assert client.get_into(client.lookup(tokens), dest) == 4
        assert same_bytes(dest, kv)


@pytest.mark.parametrize(
    "target",
    [
        "cluster://",
        "cluster://127.0.0.1",
        "cluster://127.0.0.1:1,127.0.0.1:1",
        "etcd://h:1",
        "cluster://127.0.0.1:1=1GiB,127.0.0.1:2",  # sizes for some members only
        "cluster://127.0.0.1:1=0,127.0.0.1:2=0",
        "cluster://127.0.0.1:1=lots",
    ],
)
def test_bad_cluster_targets_say_what_is_wrong(
    target: str,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    with pytest.raises(InvalidArgument, match="cluster"):
        KVClient(target, make_namespace())


async def test_caller_errors_are_raised_not_taken_for_misses(
    cluster: KVClient,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    with pytest.raises(InvalidArgument):
        await cluster.lookup_keys([b""])
    with pytest.raises(InvalidArgument):
        await cluster.get_into([b""], torch.zeros(1))


async def _first_layer_then(
    cluster: KVClient, keys: list[bytes], action: Callable[[], Awaitable[None]]
) -> list[tuple[int, int]]:
    seen = []
    async with contextlib.aclosing(cluster.iter_layers(keys)) as arrivals:
        async for arrival in arrivals:
            seen.append((arrival.layer, arrival.num_blocks))
            if arrival.layer == 0:
                await action()
    return seen


async def test_credentials_reach_every_node_and_a_refusal_is_raised(
    server_factory: ServerFactory,
    tmp_path: Path,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    """With auth on every node, the cluster client's token goes to each; a wrong token is
    the caller's error, raised, not a node's failure taken for a miss."""
    token = "tok-cluster-0123456789"
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(
        f'[[tokens]]\nsha256 = "{token_sha256(token)}"\ntenant = "tenant-a"\nrole = "tenant"\n'
    )
    nodes = [await server_factory(auth__tokens_file=str(tokens_file)) for _ in range(3)]
    namespace = make_namespace(tenant="tenant-a")
    layout = namespace.layout
    tokens = tokens_for(NUM_BLOCKS, layout.block_tokens, seed=13)
    kv = make_kv(layout, NUM_BLOCKS, seed=14)
    options = cluster_options(True, token=token)
    async with KVClient(static_target(nodes), namespace, options=options) as cluster:
        assert (await cluster.put(tokens, kv)).num_committed == NUM_BLOCKS
        dest = torch.zeros_like(kv)
        assert await cluster.get_into(await cluster.lookup(tokens), dest) == NUM_BLOCKS
        assert same_bytes(dest, kv)
    wrong = cluster_options(True, token="tok-never-issued-0")
    async with KVClient(static_target(nodes), namespace, options=wrong) as cluster:
        with pytest.raises(Unauthenticated):
            await cluster.lookup(tokens)


async def two_open_nodes_and_one_refusing(
    server_factory: ServerFactory, tmp_path: Path
) -> list[RunningServer]:
    """Two nodes without authentication, then one whose tokens file knows only another
    token: a client's token is refused there alone (UNAUTHENTICATED, a caller error)."""
    tokens_file = tmp_path / "tokens.toml"
    other = "tok-someone-else-0123"
    tokens_file.write_text(
        f'[[tokens]]\nsha256 = "{token_sha256(other)}"\ntenant = "tenant-a"\nrole = "tenant"\n'
    )
    nodes = [await server_factory(), await server_factory()]
    nodes.append(await server_factory(auth__tokens_file=str(tokens_file)))
    return nodes


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
async def test_a_refusal_by_one_node_ends_the_whole_put_before_it_is_raised(
    server_factory: ServerFactory,
    tmp_path: Path,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    data_plane: bool,
) -> None:
    """One node refuses the caller (its tokens file lacks the token): the put raises, and
    by then no part of it still runs on the other nodes, reading the caller's tensor."""
    nodes = await two_open_nodes_and_one_refusing(server_factory, tmp_path)
    namespace = make_namespace(tenant="tenant-a")
    # 48 runs: one node owns none of them with odds about 3 x (2/3)^48, 1e-8 (the ports,
    # and so the owners, differ from run to run).
    keys = [b"refused-%d" % index for index in range(96)]
    assert len(set(owners(nodes, keys))) == 3  # every node owns some of the chain
    kv = make_kv(namespace.layout, len(keys), form=KVForm.BLOCKS, seed=41)
    options = cluster_options(data_plane, token="tok-not-on-node-3-0")
    async with KVClient(static_target(nodes), namespace, options=options) as cluster:
        with pytest.raises(Unauthenticated):
            await cluster.put_blocks(keys, kv)
        running = [
            task
            for task in asyncio.all_tasks()
            if "put_owner" in repr(task.get_coro()) and not task.done()
        ]
        assert running == []


async def test_a_delete_one_node_refuses_is_raised_once_the_others_have_deleted(
    server_factory: ServerFactory,
    tmp_path: Path,
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
) -> None:
    """A delete reads no buffer of the caller's: it is not cut on the other nodes when
    one refuses, so none is left half-done without the caller hearing of it."""
    nodes = await two_open_nodes_and_one_refusing(server_factory, tmp_path)
    namespace = make_namespace(tenant="tenant-a")
    keys = [b"deleted-%d" % index for index in range(8000)]  # a delete of several steps
    kv = make_kv(namespace.layout, 1000, form=KVForm.BLOCKS, seed=43)
    for node in nodes[:2]:
        async with KVClient(f"127.0.0.1:{node.port}", namespace) as direct:
            for first in range(0, len(keys), 1000):  # the test servers' max_keys
                part = keys[first : first + 1000]
                parent = keys[first - 1] if first else b""
                put = await direct.put_blocks(part, kv, parent_key=parent)
                assert put.num_committed == len(part)
    options = cluster_options(True, token="tok-not-on-node-3-0")
    async with KVClient(static_target(nodes), namespace, options=options) as cluster:
        with pytest.raises(Unauthenticated):
            await cluster.delete(keys[:1])  # the root: the whole chain, several steps
    for node in nodes[:2]:
        assert await stored_on(node, namespace, keys[-1:]) == [False]


async def test_a_member_that_leaves_mid_get_is_closed_only_after_the_get_ends(
    cluster: KVClient,
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    # Membership can change while a get streams from a member; closing its client under
    # the stream would fail the get with a closed channel.
    assert isinstance(cluster, ClusterClient)
    layout = cluster.namespace.layout
    keys = cluster.keys(tokens_for(NUM_BLOCKS, layout.block_tokens, seed=31))
    kv = make_kv(layout, NUM_BLOCKS, form=KVForm.BLOCKS, seed=32)
    await cluster.put_blocks(keys, kv)
    layers = []
    async for arrival in cluster.iter_layers(keys):
        if not layers:
            cluster.nodes.keep_only(Placement([], RUN_BLOCKS))  # every member leaves
        assert arrival.num_blocks == NUM_BLOCKS
        assert same_bytes(arrival.kv, kv[:, arrival.layer])
        layers.append(arrival.layer)
    assert layers == list(range(layout.num_layers))
    assert not cluster.nodes._departed, "a departed member's client stayed open"


async def test_a_static_list_weighs_its_members_by_the_sizes_it_gives(
    nodes: list[RunningServer],
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
) -> None:
    sizes = ["1GiB", "6GiB", "1GiB"]  # the second member should own about 3/4 of the runs
    target = "cluster://" + ",".join(
        f"127.0.0.1:{node.port}={size}" for node, size in zip(nodes, sizes, strict=True)
    )
    members = parse_static_target(target)
    assert [member.capacity_bytes["dram"] for member in members] == [1 << 30, 6 << 30, 1 << 30]
    placement = Placement(members, 1)
    keys = [b"weighed-%d" % index for index in range(3000)]
    counts = [0, 0, 0]
    for key in keys:
        counts[members.index(placement.owner(key))] += 1
    assert counts[1] / len(keys) == pytest.approx(0.75, abs=0.03), counts
    # The client places by the same sizes: each block is stored on its weighed owner.
    options = ClientOptions(data_plane=True, cluster_run_blocks=1, cluster_retry_s=60)
    async with KVClient(target, make_namespace(), options=options) as client:
        layout = client.namespace.layout
        tokens = tokens_for(12, layout.block_tokens, seed=9)
        result = await client.put(tokens, make_kv(layout, 12, seed=9))
        assert result.outcomes == (PutOutcome.COMMITTED,) * 12
        chain = client.keys(tokens)
        expected = [members.index(run.owner) for run in Placement(members, 1).runs(chain)]
        for index, node in enumerate(nodes):
            here = await stored_on(node, client.namespace, chain)
            assert here == [owner == index for owner in expected], f"node {index}"


async def test_a_closed_cluster_client_refuses_calls_and_opens_nothing(
    nodes: list[RunningServer],
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
) -> None:
    namespace = make_namespace()
    layout = namespace.layout
    tokens = tokens_for(NUM_BLOCKS, layout.block_tokens, seed=21)
    cluster = KVClient(static_target(nodes), namespace, options=cluster_options(True))
    await cluster.put(tokens, make_kv(layout, NUM_BLOCKS))
    await cluster.close()
    calls = [
        lambda: cluster.lookup(tokens),
        lambda: cluster.put(tokens, make_kv(layout, NUM_BLOCKS)),
        lambda: cluster.pin(cluster.keys(tokens), ttl_s=5),
        lambda: cluster.stats(),
    ]
    for call in calls:
        with pytest.raises(Unavailable, match="closed"):
            await call()
    # Nothing was opened that no one will close.
    assert cluster.nodes._clients == {}  # type: ignore[attr-defined]


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
async def test_a_cluster_layer_put_one_node_refused_raises_that_refusal_from_then_on(
    server_factory: ServerFactory, make_namespace: Callable[..., Namespace], data_plane: bool
) -> None:
    """One node is too small for its runs of a layer put (RESOURCE_EXHAUSTED, a caller
    error): whichever call raises it first (a layer, the end), every later call raises
    it again, not a complaint about layer order or a put that stopped short. The data
    plane's next send sees the refusal; the second layer goes after the server's brief
    read-on of a refused gRPC put (REFUSED_PUT_READ_ON_S), so over gRPC too it is the
    send of layer 1 that raises."""
    nodes = [await server_factory(), await server_factory()]
    nodes.append(await server_factory(store__dram_bytes=MiB))
    layout = KVLayout(
        num_layers=4, num_kv_heads=8, head_dim=128, dtype=DType.FLOAT16, block_tokens=16
    )  # 256 KiB blocks
    namespace = make_namespace(tenant="tenant-a", layout=layout)
    keys = [b"layered-refused-%d" % index for index in range(96)]
    assert owners(nodes, keys).count(2) > 4  # more than the small node's DRAM
    kv_layer = torch.ones(len(keys), *layout.layer_shape, dtype=torch.float16)
    raised: list[tuple[str, KVStoreClientError]] = []
    options = cluster_options(data_plane)
    async with KVClient(static_target(nodes), namespace, options=options) as cluster:
        try:
            async with cluster.layer_put(keys) as put:
                for layer in range(layout.num_layers):
                    for attempt in range(2):  # a caller that retries the layer once
                        try:
                            await put.send_layer(layer, kv_layer)
                            break
                        except KVStoreClientError as error:
                            raised.append((f"layer {layer} try {attempt}", error))
                    if layer == 0:
                        await asyncio.sleep(4 * REFUSED_PUT_READ_ON_S)
        except KVStoreClientError as error:
            raised.append(("end", error))
    assert raised, "the small node's refusal never reached the caller"
    assert raised[0][0] == "layer 1 try 0", raised[0][0]
    for where, error in raised:
        assert isinstance(error, ResourceExhausted), (where, error)
    assert "already failed" not in str(raised[0][1])
    for where, error in raised[1:]:
        assert "already failed" in str(error), where
    assert raised[-1][0] == "end"
