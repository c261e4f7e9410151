"""The client of a cluster: many daemons as one store, placed by the client.

`KVClient("etcd://HOST:PORT/PREFIX", ns)` follows the members registered in etcd
(`etcds://` over TLS; ClientOptions.etcd or KVSTORE_ETCD_* say with what certificates
and credentials); `KVClient("cluster://H1:P1,H2:P2", ns)` takes a fixed list. Either way
the calls are those of a single daemon. A chain is cut into runs of
`ClientOptions.cluster_run_blocks` blocks, each owned by one member
(kvstore.cluster.placement), and:

- a lookup asks every owner once, in parallel, for its runs back to back, and returns the
  longest prefix that is present run after run, without waiting for an owner whose runs
  all lie past a block already found missing (kvstore.client._cluster_lookup);
- a get streams from every owner at once into one destination, and a layer is yielded
  once every owner has delivered it;
- a put sends each run to its owner, owners in parallel; a run's first block continues
  from the previous run's last block, which may live on another node (`parent_remote`).

A lost node costs misses, never errors: a node that fails a call (unreachable, cut off,
timed out) counts as holding nothing, is passed over for `cluster_retry_s`, and its runs
of a put come back NODE_UNREACHABLE. A get whose node dies mid-stream keeps the prefix
before that node's first run: later layers arrive with that shorter `num_blocks`. Errors
that are the caller's (a bad argument, a refused credential) are raised as from one
daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import grpc
import torch

from kvstore.client._async import KVClient, LayerPut, check_tensor
from kvstore.client._cluster_get import ChainGather
from kvstore.client._cluster_lookup import (
    LookupPlans,
    OwnerAsk,
    Stragglers,
    ask_owners,
    merge_answers,
)
from kvstore.client._cluster_nodes import (
    NODE_FAILURES,
    NodePool,
    OwnerRuns,
    by_owner,
    gather_or_cancel,
    runs_from,
)
from kvstore.client._cluster_put import ClusterLayerPut, weakest_durability
from kvstore.client._cluster_watch import cluster_events
from kvstore.client._errors import (
    InvalidArgument,
    KVStoreClientError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from kvstore.client._membership import EtcdMembership, Membership
from kvstore.client._options import ClientOptions
from kvstore.client._results import LayerArrival, PrefixMatch, PutResult, StoreStats
from kvstore.client._stats_sum import sum_store_stats
from kvstore.client._transport import Transport
from kvstore.client._watch import BlockEvents
from kvstore.client.cost import BandwidthMeter
from kvstore.cluster.etcd import EtcdRefused, EtcdUnavailable
from kvstore.cluster.etcd_options import EtcdOptions, load_access
from kvstore.cluster.members import Member, is_etcd_target, parse_etcd_url, parse_static_target
from kvstore.cluster.placement import Placement, Run
from kvstore.codec import KVForm, cpu_contiguous
from kvstore.enums import PutOutcome
from kvstore.layout import Namespace
from kvstore.wire.namespace import namespace_to_wire

T = TypeVar("T")

# How an etcd that refused this client's settings is raised: as the daemons' own
# refusals are (a wrong password is Unauthenticated), TLS trouble as Unavailable.
_REFUSALS: dict[str, type[KVStoreClientError]] = {
    "auth": Unauthenticated,
    "permission": PermissionDenied,
    "tls": Unavailable,
}


def _etcd_error(target: str, error: EtcdUnavailable) -> KVStoreClientError:
    kind = _REFUSALS[error.cause] if isinstance(error, EtcdRefused) else Unavailable
    return kind(f"cannot read the cluster's members from {target}: {error}")


@dataclass(frozen=True)
class MemberStats:
    """One member as the cluster client sees it: its Stats, or why it has none."""

    member: Member
    stats: StoreStats | None
    error: str = ""  # why `stats` is None


@dataclass(frozen=True)
class ClusterStats:
    members: tuple[MemberStats, ...]
    # time.time() since when etcd has not answered (the last membership stays in
    # force); None: membership is fresh or static.
    membership_stale_since: float | None
    membership_error: str = ""


class ClusterClient(KVClient):
    """KVClient over a cluster target; made by `KVClient(target, ...)` for `etcd://` and
    `cluster://` targets. Every KVClient call works the same (see the module docstring).

    It keeps one KVClient per member it has talked to, and drops those of members that
    leave. `membership` says who is in the cluster now; `cluster_stats()` gives each
    member's Stats, and `stats()` their sum.
    """

    def __init__(
        self,
        target: str,
        namespace: Namespace,
        *,
        options: ClientOptions | None = None,
        channel: grpc.aio.Channel | None = None,
        transport: Transport | None = None,
    ) -> None:
        # The base's per-connection state (channel, transport, stub) is per member here:
        # each member's own KVClient holds it. The base's calls that remain in use (keys,
        # lookup, put, put_blocks, get_into, iter_layers) go through the overrides below.
        if channel is not None or transport is not None:
            raise InvalidArgument(
                f"{target!r} is a cluster: it takes no channel or transport, since each "
                f"node gets its own"
            )
        self.namespace = namespace
        self.options = options or ClientOptions()
        self.target = target
        self._layout = namespace.layout
        self._namespace_wire = namespace_to_wire(namespace)
        self.namespace_bytes = self._namespace_wire.SerializeToString()
        run_blocks = self.options.cluster_run_blocks
        try:
            if is_etcd_target(target):
                etcd_target = parse_etcd_url(target)
                etcd_options = self.options.etcd or EtcdOptions.from_environment()
                self.membership: Membership = EtcdMembership(
                    etcd_target,
                    run_blocks,
                    access=load_access(etcd_target, etcd_options),
                    refresh_s=self.options.cluster_refresh_s,
                )
            else:
                self.membership = Membership(parse_static_target(target), run_blocks)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
        self._meter = BandwidthMeter()
        self._meter_node = ""
        self.nodes = NodePool(namespace, self.options, self._meter)
        self.membership.on_change(self.nodes.keep_only)
        self._lookup_plans = LookupPlans()
        # Lookups' asks of owners whose answers were not needed, left to end on their own.
        self._stragglers = Stragglers()
        self._started = False
        self._start_lock = asyncio.Lock()

    @property
    def data_plane(self) -> str | None:
        return None  # one per member

    async def start(self) -> Placement:
        """The current placement, once membership has been read the first time."""
        self.nodes.check_open()
        if not self._started:
            async with self._start_lock:
                if not self._started:
                    try:
                        await self.membership.start()
                    except EtcdUnavailable as error:
                        raise _etcd_error(self.target, error) from error
                    self._started = True
        return self.membership.placement

    async def close(self) -> None:
        await self.membership.close()
        await self._stragglers.cancel()
        await self.nodes.close()

    # -- lookups -------------------------------------------------------------------------

    async def lookup_keys(self, keys: list[bytes]) -> PrefixMatch:
        placement = await self.start()
        block_tokens = self._layout.block_tokens
        if not keys or not placement.members:
            return PrefixMatch(keys=keys, num_matched=0, tiers=(), block_tokens=block_tokens)
        plan = self._lookup_plans.plan(placement, keys)
        if len(plan.owners) == 1:  # one owner holds the whole chain: its answer is the answer
            return await self.nodes.call(
                plan.owners[0].member, lambda node: node.lookup_keys(keys)
            ) or PrefixMatch(keys=keys, num_matched=0, tiers=(), block_tokens=block_tokens)
        answers = await ask_owners(plan, len(keys), self._ask_owner, self._stragglers)
        return merge_answers(plan, keys, answers, block_tokens)

    async def _ask_owner(self, owner: OwnerAsk) -> PrefixMatch | None:
        return await self.nodes.call(owner.member, partial(_lookup_on, keys=owner.keys))

    # -- puts ----------------------------------------------------------------------------

    async def _put(
        self,
        keys: list[bytes],
        kv: torch.Tensor,
        form: KVForm,
        first: int,
        parent_key: bytes,
        parent_remote: bool = False,
    ) -> PutResult:
        # A caller's `parent_key` may be on any node: it is always sent as remote.
        placement = await self.start()
        if first >= len(keys):
            return PutResult(outcomes=(), num_skipped=first, bytes_sent=0)
        chain_runs = await self.chain_runs(placement, keys, parent_key if not first else b"")
        if chain_runs is None:  # as one daemon answers a chain whose parent it lacks
            return PutResult(
                outcomes=(PutOutcome.PARENT_MISSING,) * (len(keys) - first),
                num_skipped=first,
                bytes_sent=0,
            )
        kv = cpu_contiguous(kv)  # once, not once per run
        runs = runs_from(chain_runs, first)
        outcomes: dict[int, tuple[PutOutcome, ...]] = {}
        results: list[PutResult] = []

        async def put_run(node: KVClient, run: Run) -> PutResult:
            parent = keys[run.start - 1] if run.start else parent_key
            # keys[run.start] chains from keys[run.start - 1], which the previous run's
            # owner holds; the server links it if that is itself.
            return await node._put(
                keys[: run.stop], kv, form, run.start, parent_key, parent_remote=bool(parent)
            )

        async def put_owner(owner: OwnerRuns) -> None:
            for run in owner.runs:
                result = await self.nodes.call(owner.member, partial(put_run, run=run))
                if result is None:
                    outcomes[run.start] = (PutOutcome.NODE_UNREACHABLE,) * (run.stop - run.start)
                else:
                    outcomes[run.start] = result.outcomes
                    results.append(result)

        if runs:
            await gather_or_cancel(*(put_owner(owner) for owner in by_owner(runs).values()))
        else:  # no members: nothing can be stored
            outcomes[first] = (PutOutcome.NODE_UNREACHABLE,) * (len(keys) - first)
        return PutResult(
            outcomes=tuple(outcome for start in sorted(outcomes) for outcome in outcomes[start]),
            num_skipped=first,
            bytes_sent=sum(result.bytes_sent for result in results),
            durability=weakest_durability(results),
        )

    async def chain_runs(
        self, placement: Placement, keys: list[bytes], parent_key: bytes
    ) -> list[Run] | None:
        """The runs of `keys`, a whole chain, or with `parent_key` its tail.

        A tail's blocks before its first run start belong to its parent's run, on the
        member that holds the parent, unless the parent is a chain's first block: that
        is a run alone, and the tail starts a run of its own. One parallel ask of every
        member finds the holder, whose answer says whether the parent is a chain's first
        block; a server that predates that mark never says so, and the tail continues
        the parent's run, as it did before the mark. None when no reachable member
        holds the parent: no lookup can reach the tail then.

        Runs, not spans: each run is a put of its own, so a put holds at most a run's
        blocks in flight on its node however long the chain (a span may be all of it).
        """
        if not placement.members:
            return []  # nothing can be stored: every block is NODE_UNREACHABLE
        if not parent_key:
            return placement.runs(keys)
        if placement.lead_blocks(keys) == 0:
            return placement.runs(keys, tail=True)
        answers = await gather_or_cancel(
            *(
                self.nodes.call(member, lambda node: node.lookup_keys([parent_key]))
                for member in placement.members
            )
        )
        holders = [
            (member, answer)
            for member, answer in zip(placement.members, answers, strict=True)
            if answer is not None and answer.num_matched
        ]
        if not holders:
            return None
        # A key names its whole prefix, so any holder that knows it as a chain's first
        # block speaks for all (another may hold a copy restored from an older file).
        if any(answer.first_is_chain_root for _, answer in holders):
            return placement.runs(keys, tail=True)
        return placement.runs(keys, tail=True, lead_owner=holders[0][0])

    def layer_put(
        self, keys: list[bytes], *, parent_key: bytes = b"", parent_remote: bool = False
    ) -> LayerPut:
        return ClusterLayerPut(self, keys, parent_key)

    # -- gets ----------------------------------------------------------------------------

    async def get_into(
        self, keys: list[bytes] | PrefixMatch, dest: torch.Tensor, *, form: KVForm = KVForm.SEQUENCE
    ) -> int:
        """As KVClient.get_into: the blocks that arrived whole, every layer of them."""
        num_blocks = 0
        async for arrival in self._stream(keys, dest, form):
            if arrival.layer == self._layout.num_layers - 1:
                num_blocks = arrival.num_blocks
        return num_blocks

    async def _stream(
        self, keys: list[bytes] | PrefixMatch, dest: torch.Tensor | None, form: KVForm
    ) -> AsyncGenerator[LayerArrival, None]:
        if isinstance(keys, PrefixMatch):
            keys = keys.matched_keys
        if not keys:
            return
        for index, key in enumerate(keys):
            _check_key(key, index)
        if dest is not None:
            check_tensor(dest, self._layout, form, len(keys), at_least=True)
        placement = await self.start()
        if not placement.members:
            return
        gather = ChainGather(self.nodes, self._layout, keys, placement.spans(keys), dest, form)
        async with contextlib.aclosing(gather.arrivals()) as arrivals:
            async for arrival in arrivals:
                yield arrival

    # -- control -------------------------------------------------------------------------

    async def _everywhere(self, call: Callable[[KVClient], Awaitable[T]]) -> list[T]:
        """`call` on every reachable member at once; the answers of those that answered.
        A caller error from one is raised once every other has answered: these calls
        read no buffer of the caller's, and one cut half-way (a delete, a pin) would
        leave some nodes changed without the caller hearing of it."""
        placement = await self.start()
        answers = await asyncio.gather(
            *(self.nodes.call(member, call) for member in placement.members),
            return_exceptions=True,
        )
        found: list[T] = []
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
            if answer is not None:
                found.append(answer)
        return found

    async def pin(self, keys: list[bytes], ttl_s: float) -> int:
        """Lease the stored blocks among `keys` on every node; returns how many were pinned.
        Keys go to every node, so any subset of a chain pins wherever its blocks are."""
        return sum(await self._everywhere(lambda node: node.pin(keys, ttl_s)))

    async def unpin(self, keys: list[bytes]) -> int:
        return sum(await self._everywhere(lambda node: node.unpin(keys)))

    async def delete(self, keys: list[bytes]) -> tuple[int, int]:
        """Delete blocks, and on each node their descendants there; returns (deleted, left
        because pinned), summed. A deleted run's later runs on other nodes are left to be
        evicted: no lookup reaches them while the run before them is missing."""
        answers = await self._everywhere(lambda node: node.delete(keys))
        return sum(deleted for deleted, _ in answers), sum(busy for _, busy in answers)

    def watch_blocks(self, *, max_events_per_message: int = 0) -> AsyncGenerator[BlockEvents, None]:
        """Every member's block events, merged; each batch names its node (its node id),
        whose events keep their order and numbering (kvstore.client._cluster_watch)."""
        return cluster_events(self, max_events_per_message)

    async def stats(self) -> StoreStats:
        """The sum of every reachable member's Stats (see `cluster_stats` for each)."""
        cluster = await self.cluster_stats()
        found = [entry.stats for entry in cluster.members if entry.stats is not None]
        if not found:
            raise Unavailable(
                f"no member of {self.target} answered Stats: "
                + ("; ".join(f"{e.member.address}: {e.error}" for e in cluster.members) or "none")
            )
        return sum_store_stats(found)

    async def cluster_stats(self) -> ClusterStats:
        """Each member's Stats or why it has none, and how fresh the membership is."""
        placement = await self.start()

        async def one(member: Member) -> MemberStats:
            try:
                with self.nodes.lease(member) as node:
                    return MemberStats(member, await node.stats())
            except NODE_FAILURES as error:
                self.nodes.failed(member, error)
                return MemberStats(member, None, f"{type(error).__name__}: {error}")

        members = await gather_or_cancel(*(one(member) for member in placement.members))
        return ClusterStats(
            members=tuple(members),
            membership_stale_since=self.membership.stale_since,
            membership_error=self.membership.last_error,
        )


async def _lookup_on(node: KVClient, keys: list[bytes]) -> PrefixMatch:
    return await node.lookup_keys(keys)


def _check_key(key: bytes, index: int) -> None:
    if not isinstance(key, bytes) or not key:
        raise InvalidArgument(f"keys[{index}] must be non-empty bytes")
