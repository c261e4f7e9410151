"""The lifecycle both transports share (kvstore.server.lifecycle): a drain refuses new
work on gRPC and on the data plane alike, and ends lookup streams that wait idle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import torch

from kvstore.client import KVClient, KVForm
from kvstore.layout import KVLayout, Namespace
from kvstore.server import RunningServer
from kvstore.server.lifecycle import DRAINING_MESSAGE, Draining, Lifecycle
from kvstore.server.status import status_for
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire.chunks import encode_put_header
from kvstore.wire.frames import FrameKind
from kvstore.wire.namespace import namespace_to_wire

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
KEYS = [b"life-0", b"life-1"]
# tests/server/conftest.py's fixture: connects a DataPlanePeer.
ConnectPeer = Callable[[RunningServer], Awaitable[Any]]


# -- the object on its own ------------------------------------------------------------------


def test_draining_refuses_with_one_unavailable_answer() -> None:
    lifecycle = Lifecycle()
    lifecycle.refuse_if_draining()  # serving: nothing refused
    assert not lifecycle.draining
    lifecycle.start_draining()
    assert lifecycle.draining
    with pytest.raises(Draining) as raised:
        lifecycle.refuse_if_draining()
    assert status_for(raised.value) == (UNAVAILABLE, DRAINING_MESSAGE)


async def test_a_drain_ends_idle_waits_and_leaves_busy_tasks_alone() -> None:
    lifecycle = Lifecycle()
    never = asyncio.Event()
    busy_may_finish = asyncio.Event()
    entered = asyncio.Event()

    async def idle() -> None:
        with lifecycle.idle_wait():
            entered.set()
            await never.wait()

    async def busy() -> str:
        with lifecycle.idle_wait():
            pass  # a request arrived: no longer idle
        await busy_may_finish.wait()
        return "finished"

    waiting = asyncio.create_task(idle())
    working = asyncio.create_task(busy())
    await entered.wait()
    await asyncio.sleep(0)  # `busy` is past its idle wait
    lifecycle.start_draining()
    with pytest.raises(Draining):
        await waiting
    assert not working.done()
    busy_may_finish.set()
    assert await working == "finished"


async def test_a_cancelled_idle_wait_is_a_cancellation_while_serving() -> None:
    """The caller going away is not a drain: the cancellation goes through as it is."""
    lifecycle = Lifecycle()
    entered = asyncio.Event()

    async def idle() -> None:
        with lifecycle.idle_wait():
            entered.set()
            await asyncio.Event().wait()

    waiting = asyncio.create_task(idle())
    await entered.wait()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    lifecycle.start_draining()  # nothing left to cancel


# -- both transports, on a real server ------------------------------------------------------


async def grpc_status(call: Awaitable[object]) -> tuple[Any, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value.code(), raised.value.details() or ""


async def test_a_drain_refuses_new_work_on_both_transports(
    server: RunningServer,
    stub: pb_grpc.KVStoreStub,
    connect_peer: ConnectPeer,
    make_namespace: Callable[..., Namespace],
    make_layout: Callable[..., KVLayout],
    make_kv: Callable[..., torch.Tensor],
) -> None:
    namespace = make_namespace()
    wire_ns = namespace_to_wire(namespace)
    target = f"127.0.0.1:{server.port}"
    async with KVClient(target, namespace) as client:
        kv = make_kv(make_layout(), len(KEYS), form=KVForm.BLOCKS)
        assert (await client.put_blocks(KEYS, kv)).num_committed == len(KEYS)
    # Work that waits for its next request as the drain begins.
    lookups = stub.LookupPrefixStream()
    await lookups.write(pb.LookupPrefixRequest(namespace=wire_ns, keys=KEYS))
    assert (await lookups.read()).match.num_matched == len(KEYS)
    peer = await connect_peer(server)

    server.servicer.start_draining()

    # The idle lookup stream ends at once, without a drain's grace period.
    assert await grpc_status(lookups.read()) == (UNAVAILABLE, DRAINING_MESSAGE)
    lookup = pb.LookupPrefixRequest(namespace=wire_ns, keys=KEYS)
    get = pb.GetBlocksRequest(namespace=wire_ns, keys=KEYS)

    async def one_put() -> AsyncIterator[pb.PutBlocksRequest]:
        yield pb.PutBlocksRequest(namespace=wire_ns, blocks=[pb.BlockHeader(key=b"late")])

    refused = [
        await grpc_status(stub.LookupPrefix(lookup, timeout=5)),
        await grpc_status(stub.GetBlocks(get, timeout=5).read()),
        await grpc_status(stub.PutBlocks(one_put(), timeout=5)),
        await grpc_status(stub.Stats(pb.StatsRequest(), timeout=5)),
        await grpc_status(stub.LookupPrefixStream().read()),
    ]
    assert refused == [(UNAVAILABLE, DRAINING_MESSAGE)] * len(refused)
    # The data plane answers a transfer on a connection opened before with the same.
    put = encode_put_header(
        namespace=wire_ns.SerializeToString(), checksum_kind=1, blocks=[(b"late", b"")]
    )
    await peer.send(FrameKind.PUT, put)
    await peer.send(FrameKind.PUT_END)
    assert await peer.read_error() == (UNAVAILABLE.value[0], DRAINING_MESSAGE)
    assert await peer.closed_by_server()
    # Nothing stored was touched, and nothing refused was stored.
    assert server.store.report().tiers[0].num_blocks == len(KEYS)
    assert server.store.lookup(namespace, [*KEYS, b"late"]).num_matched == len(KEYS)
