"""The cluster client's members: one KVClient each, and which of them to pass over.

A node that fails a call (NODE_FAILURES: down, cut off, too slow) is passed over for
`ClientOptions.cluster_retry_s`, so that later calls count its runs as misses at once
instead of each waiting on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvstore.client._async import KVClient
from kvstore.client._errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    Unavailable,
    Unknown,
)
from kvstore.client._options import ClientOptions
from kvstore.client.cost import BandwidthMeter
from kvstore.cluster.members import Member
from kvstore.cluster.placement import Placement, Run
from kvstore.layout import Namespace

logger = logging.getLogger("kvstore.client.cluster")

T = TypeVar("T")

# What a node's failure looks like from here: it is down, cut off or too slow. Anything
# else (InvalidArgument, PermissionDenied, ResourceExhausted, ChecksumError...) is raised.
NODE_FAILURES: tuple[type[BaseException], ...] = (
    Unavailable,
    DeadlineExceeded,
    Unknown,
    Internal,
    Cancelled,
    OSError,
    TimeoutError,
)


class NodePool:
    """A KVClient per member talked to, made on first use and closed when it leaves."""

    def __init__(
        self, namespace: Namespace, options: ClientOptions, meter: BandwidthMeter | None = None
    ) -> None:
        self._namespace = namespace
        self._options = options
        self._meter = meter if meter is not None else BandwidthMeter()
        self._clients: dict[str, KVClient] = {}
        self._addresses: dict[str, str] = {}  # node id -> the address its client dials
        self._passed_over_until: dict[str, float] = {}
        self._closing: set[asyncio.Task[None]] = set()
        # Calls and streams in flight per client (by id): a member that leaves has its
        # client closed once the last of them ends, never under one (a closed channel
        # fails a call with a usage error, not as a node failure).
        self._in_use: dict[int, int] = {}
        self._departed: dict[int, KVClient] = {}
        self._closed = False

    def check_open(self) -> None:
        """Unavailable once closed: a call must not open node clients nothing would close
        (raised to the caller, never taken for a node's failure)."""
        if self._closed:
            raise Unavailable("this client is closed; make a new one")

    def client(self, member: Member) -> KVClient:
        self.check_open()
        node = self._clients.get(member.node_id)
        if node is not None and self._addresses[member.node_id] != member.address:
            # The node came back under its id (its SSD directory) at another address.
            self._retire(member.node_id)
            node = None
        if node is None:
            node = self._clients[member.node_id] = KVClient(
                member.address, self._namespace, options=self._options
            )
            self._addresses[member.node_id] = member.address
            # Every member's gets feed the cluster client's meter, keyed by member.
            node._report_bandwidth_to(self._meter, member.node_id)
        return node

    def keep_only(self, placement: Placement) -> None:
        """Close the clients of members no longer in `placement`, or now at another
        address."""
        present = {member.node_id: member.address for member in placement.members}
        for node_id in list(self._clients):
            if present.get(node_id) != self._addresses[node_id]:
                self._retire(node_id)

    def _retire(self, node_id: str) -> None:
        """Close the member's client once no call uses it; the next call makes a new one."""
        node = self._clients.pop(node_id)
        del self._addresses[node_id]
        self._passed_over_until.pop(node_id, None)
        if self._in_use.get(id(node)):
            self._departed[id(node)] = node
        else:
            self._close_soon(node)

    @contextlib.contextmanager
    def lease(self, member: Member) -> Iterator[KVClient]:
        """The member's client, kept open until the block ends even if the member leaves."""
        node = self.client(member)
        self._in_use[id(node)] = self._in_use.get(id(node), 0) + 1
        try:
            yield node
        finally:
            left = self._in_use[id(node)] - 1
            if left:
                self._in_use[id(node)] = left
            else:
                del self._in_use[id(node)]
                departed = self._departed.pop(id(node), None)
                if departed is not None:
                    self._close_soon(departed)

    def _close_soon(self, node: KVClient) -> None:
        task = asyncio.get_running_loop().create_task(node.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        self._closed = True
        clients, self._clients = self._clients, {}
        departed, self._departed = self._departed, {}
        await asyncio.gather(
            *(node.close() for node in [*clients.values(), *departed.values()]),
            return_exceptions=True,
        )
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def reachable(self, member: Member) -> bool:
        return time.monotonic() >= self._passed_over_until.get(member.node_id, 0.0)

    def failed(self, member: Member, error: BaseException) -> None:
        """Pass `member` over for a while: `error` says it is down, cut off or too slow."""
        if self.reachable(member):
            logger.warning(
                "cluster node %s (%s) failed a call, passing it over for %.1f s: %s",
                member.node_id,
                member.address,
                self._options.cluster_retry_s,
                error,
            )
        self._passed_over_until[member.node_id] = time.monotonic() + self._options.cluster_retry_s

    async def call(self, member: Member, call: Callable[[KVClient], Awaitable[T]]) -> T | None:
        """`call` on the member's client; None when the node is passed over or fails."""
        self.check_open()
        if not self.reachable(member):
            return None
        try:
            with self.lease(member) as node:
                return await call(node)
        except NODE_FAILURES as error:
            self.failed(member, error)
            return None


@dataclass
class OwnerRuns:
    """The runs of one chain a member owns, in chain order, and their keys back to back."""

    member: Member
    runs: list[Run] = field(default_factory=list)

    def keys(self, chain: Sequence[bytes]) -> list[bytes]:
        return [key for run in self.runs for key in chain[run.start : run.stop]]

    def positions(self) -> list[int]:
        return [position for run in self.runs for position in range(run.start, run.stop)]


def by_owner(runs: Sequence[Run]) -> dict[str, OwnerRuns]:
    """The runs grouped by owner, each owner's in chain order."""
    owners: dict[str, OwnerRuns] = {}
    for run in runs:
        owners.setdefault(run.owner.node_id, OwnerRuns(run.owner)).runs.append(run)
    return owners


def runs_from(runs: Sequence[Run], first: int) -> list[Run]:
    """`runs` from block `first` on (the first one cut to start there)."""
    return [Run(max(run.start, first), run.stop, run.owner) for run in runs if run.stop > first]


async def gather_or_cancel(*calls: Awaitable[T]) -> list[T]:
    """Every call's result, in order; at the first one that raises, the others are
    cancelled and waited for before it is raised. Unlike `asyncio.gather`, which leaves
    them running: a put to one node that a caller error ended must not go on reading the
    caller's tensor on the others after the call has returned."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    pending = set(tasks)
    ended: set[asyncio.Future[T]] = set()  # by themselves, not cancelled from here
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            ended |= done
            # A part cancelled from inside counts as failed: asyncio.wait's
            # FIRST_EXCEPTION would wait for the others then. Every part's exception is
            # read (a list, not any()), so none that failed beside the first is left
            # for asyncio to log as never retrieved.
            if [task for task in done if task.cancelled() or task.exception() is not None]:
                break
    except BaseException:  # this call was cancelled: so are its parts
        await cancel_and_wait(tasks)
        raise
    if pending:
        await cancel_and_wait(pending)
    for task in tasks:  # the first in call order of those that ended by themselves
        if task in ended:
            if task.cancelled():
                raise asyncio.CancelledError(f"a part of the call was cancelled: {task!r}")
            error = task.exception()
            if error is not None:
                raise error
    return [task.result() for task in tasks]


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait until each has ended, whatever it raised."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
