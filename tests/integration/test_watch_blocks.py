"""WatchBlocks (issue 17 item 5): a watcher's view is exactly what the store holds.

A real server on port 0, real clients, real puts that evict and demote. A `Follower`
applies every batch of one watch stream to a `BlockView`; the test then puts a sentinel
block and waits for its STORED event: events arrive in order, so by then the view has
every earlier change, and it must equal what lookups find, key for key and tier for tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import torch

from kvstore.client import (
    BlockEventKind,
    BlockEvents,
    BlockView,
    ClientOptions,
    KVClient,
    KVForm,
    PermissionDenied,
    ResourceExhausted,
    TierKind,
    Unauthenticated,
    Unavailable,
)
from kvstore.codec import expected_shape
from kvstore.layout import KVLayout, Namespace
from kvstore.server import RunningServer, build_server, load_config
from kvstore.server.auth import token_sha256
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire.namespace import namespace_to_wire

ServerFactory = Callable[..., Awaitable[RunningServer]]
MakeKV = Callable[..., torch.Tensor]
BLOCK_BYTES = 2048  # make_layout()'s block: one page of the servers below


class Follower:
    """Applies one watch stream to a BlockView in a task; keeps every batch."""

    def __init__(self, client: KVClient, **options: int) -> None:
        self.view = BlockView()
        self.batches: list[BlockEvents] = []
        self.error: BaseException | None = None
        self._changed = asyncio.Condition()
        self._stream = client.watch_blocks(**options)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for batch in self._stream:
                self.view.apply(batch)
                self.batches.append(batch)
                async with self._changed:
                    self._changed.notify_all()
        except Exception as error:
            self.error = error
            async with self._changed:
                self._changed.notify_all()

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: condition() or self.error is not None)
        if self.error is not None and not condition():
            raise self.error

    def kinds(self) -> list[BlockEventKind]:
        return [event.kind for batch in self.batches for event in batch.events]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._stream.aclose()


@pytest.fixture
async def follow() -> AsyncIterator[Callable[..., Follower]]:
    followers: list[Follower] = []

    def start(client: KVClient, **options: int) -> Follower:
        follower = Follower(client, **options)
        followers.append(follower)
        return follower

    yield start
    for follower in followers:
        await follower.close()


async def stored_now(client: KVClient, keys: list[bytes]) -> dict[bytes, TierKind]:
    """Each key lookups find now, alone, with the tier it would be served from."""
    found = {}
    for key in keys:
        match = await client.lookup_keys([key])
        if match.num_matched:
            found[key] = match.tiers[0]
    return found


async def catch_up(client: KVClient, follower: Follower, layout: KVLayout, name: bytes) -> None:
    """Put a sentinel block; once its STORED has arrived, so has every earlier event."""
    kv = torch.zeros(expected_shape(layout, KVForm.BLOCKS, 1), dtype=layout.dtype.torch_dtype)
    await client.put_blocks([name], kv)
    await follower.wait_until(lambda: name in follower.view.keys(client.target))


def assert_view_is_the_store(
    follower: Follower, node: str, truth: dict[bytes, TierKind], sentinel: bytes
) -> None:
    held = follower.view.blocks[node]
    assert {key: block.tier for key, block in held.items() if key != sentinel} == truth
    assert node in follower.view.synced


async def random_workload(
    client: KVClient, make_kv: MakeKV, layout: KVLayout, seed: int, rounds: int
) -> list[bytes]:
    """Chains put from scratch or from a block put earlier, lookups, gets and deletes;
    returns every key ever put."""
    rng = random.Random(seed)
    keys: list[bytes] = []
    chains: list[list[bytes]] = []
    for round_index in range(rounds):
        action = rng.random()
        if action < 0.6 or not chains:
            length = rng.randint(1, 5)
            chain = [f"r{round_index}-{i}".encode() for i in range(length)]
            parent = b""
            if chains and rng.random() < 0.4:
                parent = rng.choice(rng.choice(chains))
            kv = make_kv(layout, length, form=KVForm.BLOCKS, seed=round_index)
            await client.put_blocks(chain, kv, parent_key=parent)
            keys += chain
            chains.append(chain)
        elif action < 0.8:
            await client.lookup_keys(rng.choice(chains))
        elif action < 0.9:
            chain = rng.choice(chains)
            dest = make_kv(layout, len(chain), form=KVForm.BLOCKS)
            await client.get_into(chain, dest, form=KVForm.BLOCKS)
        else:
            await client.delete([rng.choice(rng.choice(chains))])
    return keys


# -- the view equals the store -----------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
async def test_view_equals_the_stored_set_after_a_random_workload_with_evictions(
    server_factory: ServerFactory,
    make_namespace: Callable[..., Namespace],
    make_kv: MakeKV,
    follow: Callable[..., Follower],
    seed: int,
) -> None:
    # 24 blocks of DRAM: the workload puts several hundred, so most are evicted.
    server = await server_factory(store__dram_bytes=24 * BLOCK_BYTES, store__page_bytes=BLOCK_BYTES)
    namespace = make_namespace()
    async with KVClient(f"127.0.0.1:{server.port}", namespace) as client:
        # Blocks stored before the watch begins come in its snapshot.
        early = [b"early-0", b"early-1"]
        await client.put_blocks(early, make_kv(namespace.layout, 2, form=KVForm.BLOCKS))
        follower = follow(client, max_events_per_message=7)
        await follower.wait_until(lambda: client.target in follower.view.synced)
        assert follower.view.keys(client.target) == set(early)
        assert follower.view.blocks[client.target][b"early-1"].parent_key == b"early-0"

        keys = early + await random_workload(client, make_kv, namespace.layout, seed, 150)
        await catch_up(client, follower, namespace.layout, b"sentinel")
        truth = await stored_now(client, keys)
        assert_view_is_the_store(follower, client.target, truth, b"sentinel")

        kinds = follower.kinds()
        assert kinds[: kinds.index(BlockEventKind.SNAPSHOT_END) + 1] == [
            BlockEventKind.SNAPSHOT,
            BlockEventKind.SNAPSHOT,
            BlockEventKind.SNAPSHOT_END,
        ]
        assert kinds.count(BlockEventKind.REMOVED) > 100  # evictions and deletes
        assert BlockEventKind.GAP not in kinds
        assert (await client.stats()).tiers[0].evictions > 0
        # Consecutive numbers, batched as asked.
        expected = 1
        for batch in follower.batches:
            assert batch.first_sequence == expected
            assert 1 <= len(batch.events) <= 7
            expected += len(batch.events)


async def test_ssd_demotion_and_promotion_are_tier_changes(
    server_factory: ServerFactory,
    make_namespace: Callable[..., Namespace],
    make_kv: MakeKV,
    follow: Callable[..., Follower],
    tmp_path: Path,
) -> None:
    server = await server_factory(
        store__dram_bytes=16 * BLOCK_BYTES,
        store__page_bytes=BLOCK_BYTES,
        store__ssd_dir=str(tmp_path / "ssd"),
        store__ssd_bytes=1 << 20,
        store__write_policy="write-back",
    )
    namespace = make_namespace()
    async with KVClient(f"127.0.0.1:{server.port}", namespace) as client:
        follower = follow(client)
        await follower.wait_until(lambda: client.target in follower.view.synced)
        keys: list[bytes] = []
        for index in range(8):  # 40 blocks into 16 of DRAM: the oldest move to SSD
            chain = [f"c{index}-{i}".encode() for i in range(5)]
            await client.put_blocks(chain, make_kv(namespace.layout, 5, form=KVForm.BLOCKS))
            keys += chain
        # A get of a block only on SSD copies it back into DRAM.
        dest = make_kv(namespace.layout, 5, form=KVForm.BLOCKS)
        assert await client.get_into(keys[:5], dest, form=KVForm.BLOCKS) == 5
        await catch_up(client, follower, namespace.layout, b"sentinel")
        truth = await stored_now(client, keys)
        assert TierKind.SSD in truth.values()
        assert_view_is_the_store(follower, client.target, truth, b"sentinel")
        moves = [
            event.tier
            for batch in follower.batches
            for event in batch.events
            if event.kind is BlockEventKind.TIER_CHANGED
        ]
        assert TierKind.SSD in moves
        assert TierKind.DRAM in moves
        assert truth[keys[0]] is TierKind.DRAM  # promoted by the get


# -- a slow watcher ------------------------------------------------------------------------------


async def test_a_watcher_that_falls_behind_gets_a_gap_and_a_fresh_snapshot(
    server_factory: ServerFactory,
    make_namespace: Callable[..., Namespace],
    make_kv: MakeKV,
    follow: Callable[..., Follower],
) -> None:
    server = await server_factory(limits__watch_queue_events=8)
    namespace = make_namespace()
    async with KVClient(f"127.0.0.1:{server.port}", namespace) as client:
        # Read one message, then stop reading while the store changes: the server's
        # queue for this stream overflows and the HTTP/2 window fills.
        stalled = client.watch_blocks(max_events_per_message=1)
        first = await anext(stalled)
        assert [event.kind for event in first.events] == [BlockEventKind.SNAPSHOT_END]
        keys: list[bytes] = []
        for index in range(60):
            chain = [f"s{index}-{i}".encode() for i in range(10)]
            kv = make_kv(namespace.layout, 10, form=KVForm.BLOCKS, seed=index)
            await client.put_blocks(chain, kv)  # never waits on the stalled watcher
            keys += chain
        # Another watcher, reading all along, saw every event: no gap.
        follower = follow(client)
        await catch_up(client, follower, namespace.layout, b"sentinel")
        assert BlockEventKind.GAP not in follower.kinds()

        view = BlockView()
        view.apply(first)
        gaps: list[BlockEvents] = []
        expected = 2
        async with contextlib.aclosing(stalled):
            async for batch in stalled:
                view.apply(batch)
                if batch.first_sequence != expected:
                    gaps.append(batch)
                expected = batch.first_sequence + len(batch.events)
                if b"sentinel" in view.keys(client.target) and client.target in view.synced:
                    break
        # The jump in numbers comes with a GAP, then a snapshot of the store as it is.
        assert gaps, "the stalled watcher never fell behind"
        assert all(batch.events[0].kind is BlockEventKind.GAP for batch in gaps)
        truth = await stored_now(client, keys)
        assert {k: b.tier for k, b in view.blocks[client.target].items() if k != b"sentinel"} == (
            truth
        )
        # The store kept serving: a put and a lookup work.
        assert (await client.lookup_keys(keys[-10:])).num_matched == 10


# -- who may watch -----------------------------------------------------------------------------


def _tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.toml"
    lines = []
    for token, tenant, role in (
        ("tok-a-0123456789", "team-a", "tenant"),
        ("tok-b-0123456789", "team-b", "tenant"),
        ("tok-admin-012345", "ops", "admin"),
    ):
        lines += ["[[tokens]]", f'sha256 = "{token_sha256(token)}"']
        lines += [f'tenant = "{tenant}"', f'role = "{role}"']
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_a_tenant_watches_only_its_own_namespaces(
    server_factory: ServerFactory,
    make_namespace: Callable[..., Namespace],
    make_kv: MakeKV,
    follow: Callable[..., Follower],
    tmp_path: Path,
) -> None:
    server = await server_factory(auth__tokens_file=str(_tokens_file(tmp_path)))
    target = f"127.0.0.1:{server.port}"
    ns_b = make_namespace(tenant="team-b")

    def as_(token: str) -> KVClient:
        return KVClient(target, ns_b, options=ClientOptions(token=token))

    async with (
        as_("tok-a-0123456789") as a,
        as_("tok-b-0123456789") as b,
        as_("tok-admin-012345") as admin,
    ):
        await b.put_blocks([b"b-0"], make_kv(ns_b.layout, 1, form=KVForm.BLOCKS))
        with pytest.raises(PermissionDenied, match="another tenant's"):
            async with contextlib.aclosing(a.watch_blocks()) as stream:
                await anext(stream)
        # The owner and an admin may.
        for client in (b, admin):
            follower = follow(client)
            await follower.wait_until(lambda f=follower: target in f.view.synced)
            assert follower.view.keys(target) == {b"b-0"}
        # The refusal harmed nothing, and the server keeps serving.
        assert (await b.lookup_keys([b"b-0"])).num_matched == 1


async def test_an_admins_watches_count_against_its_own_share(
    server_factory: ServerFactory,
    make_namespace: Callable[..., Namespace],
    follow: Callable[..., Follower],
    tmp_path: Path,
) -> None:
    server = await server_factory(
        auth__tokens_file=str(_tokens_file(tmp_path)), limits__max_watchers_per_tenant=1
    )
    target = f"127.0.0.1:{server.port}"
    ns_b = make_namespace(tenant="team-b")

    def as_(token: str) -> KVClient:
        return KVClient(target, ns_b, options=ClientOptions(token=token))

    async with as_("tok-b-0123456789") as b, as_("tok-admin-012345") as admin:
        watching = follow(admin)
        await watching.wait_until(lambda: target in watching.view.synced)
        # The admin's watch of b's namespace did not take b's one place.
        own = follow(b)
        await own.wait_until(lambda: target in own.view.synced)
        with pytest.raises(ResourceExhausted, match="'ops' has 1"):
            async with contextlib.aclosing(admin.watch_blocks()) as stream:
                await anext(stream)


# -- bad requests and limits ----------------------------------------------------------------------


async def _first_status(stub: pb_grpc.KVStoreStub, request: object) -> grpc.aio.AioRpcError:
    call = stub.WatchBlocks(request)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    return caught.value


async def test_bad_watch_requests_are_refused_with_clear_statuses(
    server: RunningServer,
    channel: grpc.aio.Channel,
    stub: pb_grpc.KVStoreStub,
    make_namespace: Callable[..., Namespace],
) -> None:
    error = await _first_status(stub, pb.WatchBlocksRequest())
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "namespace" in (error.details() or "")

    broken = namespace_to_wire(make_namespace())
    broken.layout.num_layers = 0
    error = await _first_status(stub, pb.WatchBlocksRequest(namespace=broken))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "num_layers" in (error.details() or "")

    raw = channel.unary_stream("/kvstore.v1.KVStore/WatchBlocks")
    for payload in (b"\xff\xff\xff", pb.WatchBlocksRequest().SerializeToString() + b"\xa8\x1f\x01"):
        call = raw(payload)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    # None of it left a watcher behind, and the server still serves.
    assert server.servicer.watch_hub.num_watchers == 0
    ok = stub.WatchBlocks(pb.WatchBlocksRequest(namespace=namespace_to_wire(make_namespace())))
    reply = await ok.read()
    assert [event.kind for event in reply.events] == [pb.SNAPSHOT_END]
    ok.cancel()


async def test_watchers_past_the_limits_are_resource_exhausted(
    server_factory: ServerFactory,
    make_namespace: Callable[..., Namespace],
    follow: Callable[..., Follower],
    make_kv: MakeKV,
    poll: Callable[..., Awaitable[None]],
) -> None:
    server = await server_factory(limits__max_watchers=3, limits__max_watchers_per_tenant=2)
    target = f"127.0.0.1:{server.port}"
    ns_a, ns_b = make_namespace(tenant="a"), make_namespace(tenant="b")
    async with KVClient(target, ns_a) as a, KVClient(target, ns_b) as b:
        watching = [follow(a), follow(a)]
        for follower in watching:
            await follower.wait_until(lambda f=follower: target in f.view.synced)
        with pytest.raises(ResourceExhausted, match="max_watchers_per_tenant"):
            async with contextlib.aclosing(a.watch_blocks()) as stream:
                await anext(stream)
        third = follow(b)
        await third.wait_until(lambda: target in third.view.synced)
        with pytest.raises(ResourceExhausted, match=r"limits\.max_watchers\)"):
            async with contextlib.aclosing(b.watch_blocks()) as stream:
                await anext(stream)
        # Closing one frees its place; the watchers that were admitted still get events.
        await watching[0].close()
        hub = server.servicer.watch_hub
        await poll(lambda: _true_async(hub.num_watchers == 2))
        again = follow(a)
        await again.wait_until(lambda: target in again.view.synced)
        await a.put_blocks([b"x"], make_kv(ns_a.layout, 1, form=KVForm.BLOCKS))
        for follower in (watching[1], again):
            await follower.wait_until(lambda f=follower: b"x" in f.view.keys(target))


async def _true_async(value: bool) -> bool:
    return value


async def test_a_drain_ends_watch_streams_unavailable(
    make_namespace: Callable[..., Namespace],
) -> None:
    server = await build_server(
        load_config(None, {"listen": "127.0.0.1:0", "log_level": "warning"})
    )
    async with (
        KVClient(f"127.0.0.1:{server.port}", make_namespace()) as client,
        contextlib.aclosing(client.watch_blocks()) as stream,
    ):
        await anext(stream)
        draining = asyncio.create_task(server.drain())
        with pytest.raises(Unavailable, match="draining"):
            await anext(stream)
        await draining


async def test_an_hbm_promotion_is_a_tier_change(
    server_factory: ServerFactory,
    make_namespace: Callable[..., Namespace],
    make_kv: MakeKV,
    follow: Callable[..., Follower],
) -> None:
    server = await server_factory(
        store__hbm_bytes=8 * BLOCK_BYTES,
        store__hbm_device="cpu",
        store__page_bytes=BLOCK_BYTES,
        store__hbm_promote_after_seen=2,
    )
    namespace = make_namespace()
    async with KVClient(f"127.0.0.1:{server.port}", namespace) as client:
        follower = follow(client)
        await follower.wait_until(lambda: client.target in follower.view.synced)
        keys = [b"h-0", b"h-1", b"h-2"]
        await client.put_blocks(keys, make_kv(namespace.layout, 3, form=KVForm.BLOCKS))
        dest = make_kv(namespace.layout, 3, form=KVForm.BLOCKS)
        for _ in range(3):  # seen often enough: copied into (emulated) HBM
            await client.get_into(keys, dest, form=KVForm.BLOCKS)
        await catch_up(client, follower, namespace.layout, b"sentinel")
        truth = await stored_now(client, keys)
        assert set(truth.values()) == {TierKind.HBM}
        assert_view_is_the_store(follower, client.target, truth, b"sentinel")
        assert [
            (event.key, event.tier)
            for batch in follower.batches
            for event in batch.events
            if event.kind is BlockEventKind.TIER_CHANGED
        ] == [(key, TierKind.HBM) for key in keys]


async def test_a_revoked_token_ends_an_open_watch(
    server_factory: ServerFactory,
    make_namespace: Callable[..., Namespace],
    make_kv: MakeKV,
    tmp_path: Path,
) -> None:
    tokens = _tokens_file(tmp_path)
    server = await server_factory(auth__tokens_file=str(tokens))
    target = f"127.0.0.1:{server.port}"
    ns_b = make_namespace(tenant="team-b")
    b_options = ClientOptions(token="tok-b-0123456789")
    admin_options = ClientOptions(token="tok-admin-012345")
    async with (
        KVClient(target, ns_b, options=b_options) as b,
        KVClient(target, ns_b, options=admin_options) as admin,
        contextlib.aclosing(b.watch_blocks()) as stream,
    ):
        await b.put_blocks([b"b-0"], make_kv(ns_b.layout, 1, form=KVForm.BLOCKS))
        first = await anext(stream)  # the watch began after the put: b-0 is in the snapshot
        assert [event.key for event in first.events] == [b"b-0", b""]
        kept = [line for line in tokens.read_text().split("[[tokens]]") if "team-b" not in line]
        tokens.write_text("[[tokens]]".join(kept))
        assert server.auth is not None
        assert server.auth.reload()  # what SIGHUP does
        # The next message is checked against the reloaded tokens: the stream ends.
        assert await admin.delete([b"b-0"]) == (1, 0)
        with pytest.raises(Unauthenticated):
            await asyncio.wait_for(_read_to_the_end(stream), timeout=20)


async def test_a_revoked_token_ends_a_watch_of_a_quiet_namespace(
    server_factory: ServerFactory,
    make_namespace: Callable[..., Namespace],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No event is due on a quiet namespace: the stream still checks its credential, so
    a revoked one does not keep its watcher place."""
    import kvstore.server.servicer as servicer

    monkeypatch.setattr(servicer, "WATCH_RECHECK_S", 0.2)
    tokens = _tokens_file(tmp_path)
    server = await server_factory(auth__tokens_file=str(tokens))
    ns_b = make_namespace(tenant="team-b")
    options = ClientOptions(token="tok-b-0123456789")
    async with (
        KVClient(f"127.0.0.1:{server.port}", ns_b, options=options) as b,
        contextlib.aclosing(b.watch_blocks()) as stream,
    ):
        first = await anext(stream)
        assert [event.key for event in first.events] == [b""]  # SNAPSHOT_END only
        kept = [line for line in tokens.read_text().split("[[tokens]]") if "team-b" not in line]
        tokens.write_text("[[tokens]]".join(kept))
        assert server.auth is not None
        assert server.auth.reload()
        with pytest.raises(Unauthenticated):
            await asyncio.wait_for(_read_to_the_end(stream), timeout=20)
    assert server.servicer.watch_hub.num_watchers == 0


async def _read_to_the_end(stream: AsyncIterator[BlockEvents]) -> None:
    async for _ in stream:
        pass
