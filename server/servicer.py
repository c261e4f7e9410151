"""The KVStore servicer: gRPC in, the core and kvstore.server.transfer, gRPC out.

Each handler decodes its request (kvstore.server.decode), calls the core or the
transfers, and builds its reply (kvstore.server.replies). An error ends the RPC with
its status in one place, `_answer`, through kvstore.server.status; the lookup stream
alone answers a bad request inside its result, so the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeAlias, TypeVar

import grpc

from kvstore.errors import InvalidRequest
from kvstore.server.auth import OPEN, Authenticator, Caller
from kvstore.server.config import Limits
from kvstore.server.credentials import grpc_caller, grpc_credential
from kvstore.server.decode import (
    MalformedRequest,
    open_keyed_request,
    open_request,
    open_watch_request,
)
from kvstore.server.lifecycle import Lifecycle
from kvstore.server.lookup import Lookups
from kvstore.server.loopwatch import LoopWatch
from kvstore.server.pacing import TransferPacing
from kvstore.server.procstat import read_process_health
from kvstore.server.replies import (
    report_to_wire,
    scoped_to_tenant,
    tenant_to_wire,
    watch_reply,
)
from kvstore.server.request_metrics import RequestMetrics
from kvstore.server.status import status_for
from kvstore.server.transfer import Transfers
from kvstore.server.watch import WatchHub
from kvstore.store import BlockStore
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.frames import VERSION as DATAPLANE_VERSION

Reply = TypeVar("Reply")
Context: TypeAlias = grpc.aio.ServicerContext

# How often a WatchBlocks stream with a credential checks it while no event is due.
WATCH_RECHECK_S = 5.0
# Stats: tenants converted per step of the loop; room kept for the reply's framing; a
# repeated field's tag and length per entry.
_TENANTS_PER_SLICE = 512
_STATS_MARGIN_BYTES = 1024
_FIELD_OVERHEAD_BYTES = 6
# How long a refused put's remaining messages are read and dropped before its status is
# sent. grpc.aio's client replaces the status with INTERNAL "Internal error from Core"
# when one of its writes fails on a call the server has just ended (grpc issue 36066,
# fix pending in grpc PR 43486): measured on 300 refused puts of 320 small messages,
# 5 lost the server's answer. A client that has sent its last message by then writes
# nothing more, so its caller sees the server's code and message. The cost stays
# bounded by this time. A byte cap was tried (4 MiB): a large put refused early then
# lost its RESOURCE_EXHAUSTED to INTERNAL in about 1 of 10 tries, and a caller needs
# the right status more than the server needs to save a quarter second of reading.
REFUSED_PUT_READ_ON_S = 0.25


class KVStoreServicer:
    def __init__(
        self,
        store: BlockStore,
        transfers: Transfers,
        lifecycle: Lifecycle,
        limits: Limits,
        auth: Authenticator | None = None,
    ) -> None:
        self._store = store
        self._auth = auth  # None: no authentication, every caller is OPEN
        self._transfers = transfers
        self._lifecycle = lifecycle
        self._limits = limits
        self._max_keys = limits.max_keys
        self.watch_hub = WatchHub(store, limits)
        # Shared with the data plane's LOOKUP frame (kvstore.server.lookup).
        self.lookups = Lookups(store, limits.max_keys)
        self.data_plane_port = 0  # set once the data plane listens; 0: none
        self.data_plane_tls = False  # whether the data plane speaks TLS (kvstore.server.tls)
        # The same-host path's Unix socket and the daemon's instance id ("": none).
        self.shm_path = ""
        self.shm_instance = b""
        # (open connections, transfers carried), from the data plane once it listens.
        self.data_plane_counts: Callable[[], tuple[int, int]] | None = None
        self.loop_watch: LoopWatch | None = None  # set once the server runs; lag 0 without
        # Whether the daemon is registered in etcd now, and its node id (--cluster only).
        self.cluster_state: Callable[[], tuple[bool, str]] | None = None
        self.request_metrics: RequestMetrics | None = None  # the lookup histograms, if on

    def start_draining(self) -> None:
        """Drain both transports: see kvstore.server.lifecycle."""
        self._lifecycle.start_draining()

    async def _answer(
        self,
        context: Context,
        handle: Callable[[Caller], Awaitable[Reply]],
        unread: AsyncIterator[bytes] | None = None,
    ) -> Reply:
        """Run `handle` for the authenticated caller unless the server is draining; any
        error ends the RPC with its status. `unread`: a client stream whose rest is read
        briefly first (REFUSED_PUT_READ_ON_S), unless the stream was cut for its time."""
        try:
            caller = OPEN if self._auth is None else grpc_caller(self._auth, context)
            self._lifecycle.refuse_if_draining()
            return await handle(caller)
        except Exception as error:
            if context.done():
                # The client cancelled or went away, so a write failed: nobody is left to
                # answer, and it is no internal error. gRPC ends the call as it ends any.
                raise
            code, message = status_for(error)
            if self.request_metrics is not None:
                self.request_metrics.count_error("grpc", code.name)
            if unread is not None and code != grpc.StatusCode.DEADLINE_EXCEEDED:
                await _read_on_briefly(unread)
            await context.abort(code, message)
            raise AssertionError("unreachable") from error

    async def LookupPrefix(
        self, request: pb.LookupPrefixRequest | MalformedRequest, context: Context
    ) -> pb.LookupPrefixResponse:
        async def handle(caller: Caller) -> pb.LookupPrefixResponse:
            return self._lookup(request, caller)

        return await self._answer(context, handle)

    async def LookupPrefixStream(
        self, requests: AsyncIterator[pb.LookupPrefixRequest | MalformedRequest], context: Context
    ) -> None:
        """One result per request, in order; a bad request fails its own result only.

        A drain ends the stream with UNAVAILABLE: at once if it waits for a request,
        else once the result in hand is written. A request that arrives just as the
        drain begins gets that ending instead of a result.
        """

        async def handle(caller: Caller) -> None:
            # The stream may stay open for hours: its credential is checked again on
            # every request, so a token revoked (SIGHUP) or expired stops it.
            credential = None if self._auth is None else grpc_credential(self._auth, context)
            while True:
                with self._lifecycle.idle_wait():
                    request = await context.read()
                if request is grpc.aio.EOF:
                    return
                if credential is not None and self._auth is not None:
                    caller = credential.caller(self._auth)
                try:
                    result = pb.LookupPrefixResult(match=self._lookup(request, caller))
                except Exception as error:  # answered in the result: the stream goes on
                    code, message = status_for(error)
                    if self.request_metrics is not None:
                        self.request_metrics.count_error("grpc", code.name)
                    result = pb.LookupPrefixResult(code=code.value[0], message=message)
                await context.write(result)
                self._lifecycle.refuse_if_draining()

        await self._answer(context, handle)

    def _lookup(
        self, request: pb.LookupPrefixRequest | MalformedRequest, caller: Caller
    ) -> pb.LookupPrefixResponse:
        return self.lookups.answer(request, caller)

    async def Pin(
        self, request: pb.PinRequest | MalformedRequest, context: Context
    ) -> pb.PinResponse:
        async def handle(caller: Caller) -> pb.PinResponse:
            pin, namespace, keys = open_keyed_request(request, self._max_keys)
            caller.authorize(namespace.tenant)
            if pin.ttl_ms == 0:
                raise InvalidRequest("ttl_ms is required: how long, in ms, to keep the blocks")
            count, expires_at = self._store.pin(namespace, keys, pin.ttl_ms / 1000)
            return pb.PinResponse(num_pinned=count, expires_at_ms=int(expires_at * 1000))

        return await self._answer(context, handle)

    async def Unpin(
        self, request: pb.UnpinRequest | MalformedRequest, context: Context
    ) -> pb.UnpinResponse:
        async def handle(caller: Caller) -> pb.UnpinResponse:
            _, namespace, keys = open_keyed_request(request, self._max_keys)
            caller.authorize(namespace.tenant)
            return pb.UnpinResponse(num_unpinned=self._store.unpin(namespace, keys))

        return await self._answer(context, handle)

    async def Delete(
        self, request: pb.DeleteRequest | MalformedRequest, context: Context
    ) -> pb.DeleteResponse:
        async def handle(caller: Caller) -> pb.DeleteResponse:
            _, namespace, keys = open_keyed_request(request, self._max_keys)
            caller.authorize(namespace.tenant, admin_may=True)
            result = await self._store.delete_stepwise(namespace, keys)
            await self._store.settle_deletes()
            return pb.DeleteResponse(num_deleted=result.num_deleted, num_busy=result.num_busy)

        return await self._answer(context, handle)

    async def Stats(
        self, request: pb.StatsRequest | MalformedRequest, context: Context
    ) -> pb.StatsResponse:
        async def handle(caller: Caller) -> pb.StatsResponse:
            open_request(request)
            scoped = caller.tenant is not None and not caller.is_admin
            # A tenant's reply costs its own entry; the whole store's, every tenant's,
            # built a slice at a time and cut to fit the message limit.
            report = self._store.report([caller.tenant] if scoped and caller.tenant else [])
            reply = report_to_wire(
                report, time.process_time(), read_process_health(self.loop_watch)
            )
            reply.data_plane_port = self.data_plane_port
            if self.data_plane_counts is not None:
                connections, transfers = self.data_plane_counts()
                reply.data_plane_connections = connections
                reply.data_plane_transfers = transfers
            if self.cluster_state is not None:
                reply.cluster_registered, reply.cluster_node_id = self.cluster_state()
            if scoped and caller.tenant is not None:
                return scoped_to_tenant(reply, caller.tenant)
            await self._add_tenant_stats(reply)
            return reply

        return await self._answer(context, handle)

    async def _add_tenant_stats(self, reply: pb.StatsResponse) -> None:
        """Every tenant's entry, by name, while the reply stays within the message limit
        (the rest counted in `tenants_omitted`); yields to the loop between slices."""
        names = self._store.tenant_names()
        budget = self._limits.max_message_bytes - reply.ByteSize() - _STATS_MARGIN_BYTES
        for start in range(0, len(names), _TENANTS_PER_SLICE):
            if start:
                await asyncio.sleep(0)
            for index, report in enumerate(
                self._store.tenant_reports(names[start : start + _TENANTS_PER_SLICE]), start
            ):
                entry = tenant_to_wire(report)
                budget -= entry.ByteSize() + _FIELD_OVERHEAD_BYTES
                if budget < 0:
                    reply.tenants_omitted = len(names) - index
                    return
                reply.tenants.append(entry)

    async def PutBlocks(
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> pb.PutBlocksResponse:
        """Paced (kvstore.server.pacing): a client that sends nothing for the idle limit,
        or a call past limits.max_transfer_s (deadline or none), is cut and freed."""

        async def handle(caller: Caller) -> pb.PutBlocksResponse:
            async with TransferPacing(self._limits, "put") as pacing:
                return await self._transfers.put(pacing.received(request_iterator), caller)

        return await self._answer(context, handle, unread=request_iterator)

    async def GetBlocks(
        self, request: pb.GetBlocksRequest | MalformedRequest, context: Context
    ) -> None:
        """Writes each message as wire parts; arena views stay valid while the stream is open.

        Paced as puts are: a client that takes no message for the idle limit is cut.
        """

        async def handle(caller: Caller) -> None:
            # The messages close at once when the client cancels or is cut, so the
            # blocks are unpinned then.
            async with (
                TransferPacing(self._limits, "get") as pacing,
                contextlib.aclosing(self._transfers.get(request, caller)) as messages,
            ):
                async for parts in messages:
                    pacing.waiting()
                    await context.write(parts)
                    pacing.working()

        await self._answer(context, handle)

    async def WatchBlocks(
        self, request: pb.WatchBlocksRequest | MalformedRequest, context: Context
    ) -> None:
        """The namespace's snapshot, then its live events (kvstore.server.watch), until
        the client goes away or the server drains (UNAVAILABLE)."""

        async def handle(caller: Caller) -> None:
            watch, namespace = open_watch_request(request)
            caller.authorize(namespace.tenant, admin_may=True)
            # The stream may stay open for days: its credential is checked again before
            # every message, so a token revoked (SIGHUP) or expired stops it.
            credential = None if self._auth is None else grpc_credential(self._auth, context)
            limit = self._limits.watch_message_events
            max_events = min(watch.max_events_per_message or limit, limit)
            # On a quiet namespace no message is due for long: the credential is checked
            # every WATCH_RECHECK_S meanwhile, so a revoked stream does not keep its place.
            recheck_s = WATCH_RECHECK_S if credential is not None else None
            with self.watch_hub.watch(namespace, caller.tenant) as watcher:
                while True:
                    try:
                        with self._lifecycle.idle_wait():
                            async with asyncio.timeout(recheck_s):
                                first_sequence, events = await watcher.take(max_events)
                    except TimeoutError:  # take() gives up nothing when cancelled waiting
                        events = []
                    if credential is not None and self._auth is not None:
                        credential.caller(self._auth).authorize(namespace.tenant, admin_may=True)
                    if events:
                        await context.write(watch_reply(first_sequence, events))
                    # A drain that began while a slow reader held the write ends it here.
                    self._lifecycle.refuse_if_draining()

        await self._answer(context, handle)

    async def GetDataPlane(
        self, request: pb.DataPlaneRequest | MalformedRequest, context: Context
    ) -> pb.DataPlaneResponse:
        async def handle(caller: Caller) -> pb.DataPlaneResponse:
            open_request(request)
            return pb.DataPlaneResponse(
                port=self.data_plane_port,
                version=DATAPLANE_VERSION,
                tls=self.data_plane_tls,
                shm_path=self.shm_path,
                shm_instance=self.shm_instance,
                shm_uid=os.geteuid() if self.shm_path else None,
            )

        return await self._answer(context, handle)


async def _read_on_briefly(messages: AsyncIterator[bytes]) -> None:
    """Read and drop `messages` until the client ends them or REFUSED_PUT_READ_ON_S
    passes, whichever is first."""
    with contextlib.suppress(TimeoutError, grpc.RpcError):
        async with asyncio.timeout(REFUSED_PUT_READ_ON_S):
            async for _ in messages:
                pass
