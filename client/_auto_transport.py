"""The automatic transport: block bytes over the data plane while it answers, else gRPC.

The data plane is asked for once (over gRPC), and again only after a back-off once it
could not be reached or was not offered. Where the server offers both, the same-host
path (shared memory, kvstore.client._shm) is tried before the TCP data plane
(PlaneChain). Lookups go over the data plane too (a LOOKUP frame), else over gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from kvstore.client._dataplane import DataPlanePool, DataPlaneUnreachable
from kvstore.client._errors import DeadlineExceeded, InvalidArgument, Unavailable
from kvstore.client._transport import BlockTransport, GetStream, Parts, PutStream, Transport
from kvstore.v1 import kvstore_pb2 as pb

T = TypeVar("T")
logger = logging.getLogger("kvstore.client")
# After the data plane could not be reached, use gRPC this long before asking again.
DATA_PLANE_RETRY_S = 30.0
# After the data plane refused a LOOKUP frame (an older server), use gRPC this long.
LOOKUP_RETRY_S = 60.0


class DataPlane(BlockTransport, Protocol):
    """A data plane found by discovery (kvstore.client._dataplane_transport)."""

    @property
    def address(self) -> str: ...

    @property
    def pool(self) -> DataPlanePool:
        """Its connections; the one lookups go to, for a PlaneChain."""

    async def lookup(
        self, request: pb.LookupPrefixRequest, deadline: float
    ) -> pb.LookupPrefixResponse: ...

    def retire(self) -> None:
        """Take no more transfers; those in flight finish."""

    def close(self) -> None:
        """Take no more transfers, and cut those in flight."""


class PlaneChain:
    """Data planes in order of preference (the same-host path, then TCP): a transfer
    goes to the first; one that cannot be reached is retired, and the next takes the
    transfer and those after it."""

    def __init__(self, planes: list[DataPlane]) -> None:
        assert planes
        self._planes = planes

    @property
    def address(self) -> str:
        return self._planes[0].address

    @property
    def pool(self) -> DataPlanePool:
        return self._planes[0].pool

    async def lookup(
        self, request: pb.LookupPrefixRequest, deadline: float
    ) -> pb.LookupPrefixResponse:
        return await self._route(lambda plane: plane.lookup(request, deadline))

    async def put(self, messages: AsyncIterator[Parts], timeout_s: float) -> pb.PutBlocksResponse:
        return await self._route(lambda plane: plane.put(messages, timeout_s))

    async def open_put(self, timeout_s: float) -> PutStream:
        return await self._route(lambda plane: plane.open_put(timeout_s))

    async def open_get(self, request: pb.GetBlocksRequest, timeout_s: float) -> GetStream:
        return await self._route(lambda plane: plane.open_get(request, timeout_s))

    def retire(self) -> None:
        for plane in self._planes:
            plane.retire()

    def close(self) -> None:
        for plane in self._planes:
            plane.close()

    async def _route(self, call: Callable[[DataPlane], Awaitable[T]]) -> T:
        while True:
            plane = self._planes[0]
            try:
                return await call(plane)
            except DataPlaneUnreachable as error:
                if plane in self._planes:
                    if len(self._planes) == 1:
                        raise
                    self._planes.remove(plane)
                    logger.warning("%s; using %s", error, self._planes[0].address)
                    plane.retire()  # its transfers in flight finish there
                # else a transfer beside this one retired it already: take the next plane


class AutoTransport:
    """`grpc` for lookups, and for transfers while there is no data plane.

    `find_data_plane` asks the server for its data plane (None: it offers none);
    `clock` (seconds) times the back-off. With `require_data_plane`, transfers never
    fall back to gRPC: they raise Unavailable instead.
    """

    def __init__(
        self,
        grpc: Transport,
        find_data_plane: Callable[[], Awaitable[DataPlane | None]],
        *,
        clock: Callable[[], float] = time.monotonic,
        require_data_plane: bool = False,
    ) -> None:
        self.grpc = grpc  # the fallback, and the lookups' transport
        self._require_data_plane = require_data_plane
        self._find_data_plane = find_data_plane
        self._clock = clock
        self._current: DataPlane | None = None
        self._asked_at: float | None = None
        self._lock = asyncio.Lock()
        self._lookups_off_until = 0.0  # clock time; until then lookups use gRPC
        self._finding: asyncio.Future[DataPlane | None] | None = None  # a lookup's search
        self._closed = False

    @property
    def data_plane(self) -> str | None:
        current = self._current
        return None if current is None else current.address

    async def lookup(
        self, request: pb.LookupPrefixRequest, deadline: float
    ) -> pb.LookupPrefixResponse:
        """Over the data plane (a LOOKUP frame) where there is one that takes lookups,
        else over gRPC. A server from before LOOKUP answers it INVALID_ARGUMENT: the
        lookup goes again over gRPC, and if that answers, the data plane is not asked
        for lookups for a while (a server upgrade is noticed then)."""
        self._check_open()
        data_plane = await self._data_plane_by(deadline) if self._lookups_on() else None
        if data_plane is None:
            return await self.grpc.lookup(request, deadline)
        try:
            return await data_plane.lookup(request, deadline)
        except DataPlaneUnreachable as error:
            logger.warning("%s; using gRPC for %.0f s", error, DATA_PLANE_RETRY_S)
            data_plane.retire()
            if self._current is data_plane:
                self._current = None
                self._asked_at = self._clock()
            return await self.grpc.lookup(request, deadline)
        except InvalidArgument:
            reply = await self.grpc.lookup(request, deadline)  # raises if it is the request
            self._lookups_off_until = self._clock() + LOOKUP_RETRY_S
            return reply

    def lookup_pool(self) -> DataPlanePool | None:
        """The pool whose idle connections a blocking lookup may borrow from another
        thread (kvstore.client._blocking_lookup): where lookups go over the data plane
        already found. None otherwise; the loop's lookup then finds it (or uses gRPC)."""
        current = self._current
        if self._closed or current is None or not self._lookups_on():
            return None
        return current.pool

    async def _data_plane_by(self, deadline: float) -> DataPlane | None:
        """`_data_plane`, within a lookup's deadline (loop time): finding the data plane
        takes a round trip of its own, and a server that does not answer it must cost a
        lookup its own timeout, not the control timeout. The search goes on meanwhile,
        for the calls after."""
        if self._current is not None:
            return self._current
        if self._finding is None or self._finding.done():
            self._finding = asyncio.ensure_future(self._data_plane())
        left_s = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(asyncio.shield(self._finding), max(left_s, 0.0))
        except TimeoutError:
            raise DeadlineExceeded(
                "no lookup result before the deadline: the server has not said where its "
                "data plane is"
            ) from None

    def _check_open(self) -> None:
        # A closed client's pools refuse as "unreachable": that must not read as a data
        # plane to fall back from, onto a channel that is closed too.
        if self._closed:
            raise Unavailable("this client is closed; make a new one")

    def _lookups_on(self) -> bool:
        return self._clock() >= self._lookups_off_until

    async def put(self, messages: AsyncIterator[Parts], timeout_s: float) -> pb.PutBlocksResponse:
        return await self._route(lambda transport: transport.put(messages, timeout_s))

    async def open_put(self, timeout_s: float) -> PutStream:
        return await self._route(lambda transport: transport.open_put(timeout_s))

    async def open_get(self, request: pb.GetBlocksRequest, timeout_s: float) -> GetStream:
        return await self._route(lambda transport: transport.open_get(request, timeout_s))

    async def close(self) -> None:
        self._closed = True
        if self._finding is not None and not self._finding.done():
            self._finding.cancel()
        if self._current is not None:
            self._current.close()
        await self.grpc.close()

    async def _route(self, call: Callable[[BlockTransport], Awaitable[T]]) -> T:
        """`call` on the data plane, or on gRPC when there is none or it cannot be reached
        (DataPlaneUnreachable means nothing was sent, so gRPC can still carry it all)."""
        self._check_open()
        data_plane = await self._data_plane()
        if data_plane is not None:
            try:
                return await call(data_plane)
            except DataPlaneUnreachable as error:
                if self._require_data_plane:
                    raise Unavailable(f"{error} (and it is required)") from None
                logger.warning("%s; using gRPC for %.0f s", error, DATA_PLANE_RETRY_S)
                # Transfers already on the data plane finish there.
                data_plane.retire()
                if self._current is data_plane:
                    self._current = None
                    self._asked_at = self._clock()  # the back-off starts now
        elif self._require_data_plane:
            raise Unavailable(
                "the same-host path is required (ClientOptions.shared_memory=True) and the "
                "server offers none this client can use: another host, shm_socket off, "
                "or a socket it may not open"
            )
        return await call(self.grpc)

    async def _data_plane(self) -> DataPlane | None:
        """The server's data plane, asked for once (again after the back-off)."""
        if self._current is not None:
            return self._current
        now = self._clock()
        async with self._lock:
            asked_at = self._asked_at
            if self._current is not None:
                return self._current
            if asked_at is not None and now - asked_at < DATA_PLANE_RETRY_S:
                return None
            self._asked_at = now
            found = await self._find_data_plane()
            if self._closed:  # closed during the search: nothing may keep its pools open
                if found is not None:
                    found.close()
                self._check_open()
            self._current = found
            return found
