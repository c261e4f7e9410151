"""The client of a cluster: many daemons as one store, placed by the client.

`KVClient("etcd://HOST:PORT/PREFIX", ns)` follows the members registered in etcd;
`KVClient("cluster://H1:P1,H2:P2", ns)` takes a fixed list. Either way the calls are
those of a single daemon. A chain is cut into runs of `ClientOptions.cluster_run_blocks`
blocks, each owned by one member (kvstore.cluster.placement), and:

- a lookup asks every owner once, in parallel, for its runs back to back, and returns the
  longest prefix that is present run after run;
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
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import TypeVar

import grpc
import torch

from kvstore.client._async import KVClient, LayerPut, check_tensor
from kvstore.client._errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    Unavailable,
    Unknown,
)
from kvstore.client._membership import EtcdMembership, Membership
from kvstore.client._options import ClientOptions
from kvstore.client._results import LayerArrival, PrefixMatch, PutResult, StoreStats
from kvstore.client._stats_sum import sum_store_stats
from kvstore.client._transport import Transport
from kvstore.cluster.etcd import EtcdUnavailable
from kvstore.cluster.members import SCHEME, Member, parse_etcd_url, parse_static_target
from kvstore.cluster.placement import Placement, Run
from kvstore.codec import ByteMap, KVForm, cpu_contiguous
from kvstore.enums import Durability, PutOutcome, TierKind
from kvstore.layout import Namespace
from kvstore.wire.namespace import namespace_to_wire

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


@dataclass
class _OwnerRuns:
    """The runs of one chain a member owns, in chain order, and their keys back to back."""

    member: Member
    runs: list[Run] = field(default_factory=list)

    def keys(self, chain: Sequence[bytes]) -> list[bytes]:
        return [key for run in self.runs for key in chain[run.start : run.stop]]

    def positions(self) -> list[int]:
        return [position for run in self.runs for position in range(run.start, run.stop)]


def _by_owner(runs: Sequence[Run]) -> dict[str, _OwnerRuns]:
    owners: dict[str, _OwnerRuns] = {}
    for run in runs:
        owners.setdefault(run.owner.node_id, _OwnerRuns(run.owner)).runs.append(run)
    return owners


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
            if target.startswith(SCHEME):
                self.membership: Membership = EtcdMembership(
                    parse_etcd_url(target), run_blocks, refresh_s=self.options.cluster_refresh_s
                )
            else:
                self.membership = Membership(parse_static_target(target), run_blocks)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
        self.membership.on_change(self._forget_departed)
        self._nodes: dict[str, KVClient] = {}
        self._passed_over_until: dict[str, float] = {}
        self._started = False
        self._start_lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def data_plane(self) -> str | None:
        return None  # one per member

    async def _start(self) -> Placement:
        """The current placement, once membership has been read the first time."""
        if not self._started:
            async with self._start_lock:
                if not self._started:
                    try:
                        await self.membership.start()
                    except EtcdUnavailable as error:
                        raise Unavailable(
                            f"cannot read the cluster's members from {self.target}: {error}"
                        ) from error
                    self._started = True
        return self.membership.placement

    async def close(self) -> None:
        await self.membership.close()
        nodes, self._nodes = self._nodes, {}
        await asyncio.gather(*(node.close() for node in nodes.values()), return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- members ------------------------------------------------------------------------

    def _node(self, member: Member) -> KVClient:
        node = self._nodes.get(member.node_id)
        if node is None:
            node = self._nodes[member.node_id] = KVClient(
                member.address, self.namespace, options=self.options
            )
        return node

    def _forget_departed(self, placement: Placement) -> None:
        present = {member.node_id for member in placement.members}
        for node_id in [node_id for node_id in self._nodes if node_id not in present]:
            node = self._nodes.pop(node_id)
            self._passed_over_until.pop(node_id, None)
            task = asyncio.get_running_loop().create_task(node.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _reachable(self, member: Member) -> bool:
        return time.monotonic() >= self._passed_over_until.get(member.node_id, 0.0)

    def _failed(self, member: Member, error: BaseException) -> None:
        if self._reachable(member):
            logger.warning(
                "cluster node %s (%s) failed a call, passing it over for %.1f s: %s",
                member.node_id,
                member.address,
                self.options.cluster_retry_s,
                error,
            )
        self._passed_over_until[member.node_id] = time.monotonic() + self.options.cluster_retry_s

    async def _call(self, member: Member, call: Callable[[KVClient], Awaitable[T]]) -> T | None:
        """`call` on the member's client; None when the node is passed over or fails."""
        if not self._reachable(member):
            return None
        try:
            return await call(self._node(member))
        except NODE_FAILURES as error:
            self._failed(member, error)
            return None

    # -- lookups -------------------------------------------------------------------------

    async def lookup_keys(self, keys: list[bytes]) -> PrefixMatch:
        placement = await self._start()
        block_tokens = self._layout.block_tokens
        if not keys or not placement.members:
            return PrefixMatch(keys=keys, num_matched=0, tiers=(), block_tokens=block_tokens)
        runs = placement.runs(keys)
        owners = list(_by_owner(runs).values())

        async def ask(owner: _OwnerRuns) -> PrefixMatch | None:
            owner_keys = owner.keys(keys)
            return await self._call(owner.member, lambda node: node.lookup_keys(owner_keys))

        answers = await asyncio.gather(*(ask(owner) for owner in owners))
        found = {
            owner.member.node_id: answer for owner, answer in zip(owners, answers, strict=True)
        }
        offsets: dict[str, int] = {}
        tiers: list[TierKind] = []
        num_matched = 0
        for run in runs:
            node_id = run.owner.node_id
            offset = offsets.get(node_id, 0)
            offsets[node_id] = offset + (run.stop - run.start)
            answer = found[node_id]
            num_present = 0
            if answer is not None:
                num_present = max(0, min(answer.num_matched - offset, run.stop - run.start))
                tiers.extend(answer.tiers[offset : offset + num_present])
            num_matched += num_present
            if num_present < run.stop - run.start:
                break
        return PrefixMatch(
            keys=keys, num_matched=num_matched, tiers=tuple(tiers), block_tokens=block_tokens
        )

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
        placement = await self._start()
        if first >= len(keys):
            return PutResult(outcomes=(), num_skipped=first, bytes_sent=0)
        kv = cpu_contiguous(kv)  # once, not once per run
        runs = _runs_from(placement, keys, first)
        outcomes: dict[int, tuple[PutOutcome, ...]] = {}
        results: list[PutResult] = []

        async def put_run(node: KVClient, run: Run) -> PutResult:
            parent = keys[run.start - 1] if run.start else parent_key
            # keys[run.start] chains from keys[run.start - 1], which the previous run's
            # owner holds; the server links it if that is itself.
            return await node._put(
                keys[: run.stop], kv, form, run.start, parent_key, parent_remote=bool(parent)
            )

        async def put_owner(owner: _OwnerRuns) -> None:
            for run in owner.runs:
                result = await self._call(owner.member, partial(put_run, run=run))
                if result is None:
                    outcomes[run.start] = (PutOutcome.NODE_UNREACHABLE,) * (run.stop - run.start)
                else:
                    outcomes[run.start] = result.outcomes
                    results.append(result)

        if runs:
            await asyncio.gather(*(put_owner(owner) for owner in _by_owner(runs).values()))
        else:  # no members: nothing can be stored
            outcomes[first] = (PutOutcome.NODE_UNREACHABLE,) * (len(keys) - first)
        return PutResult(
            outcomes=tuple(outcome for start in sorted(outcomes) for outcome in outcomes[start]),
            num_skipped=first,
            bytes_sent=sum(result.bytes_sent for result in results),
            durability=_weakest(results),
        )

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
        placement = await self._start()
        if not placement.members:
            return
        gather = _ChainGather(self, keys, placement.runs(keys), dest, form)
        async with contextlib.aclosing(gather.arrivals()) as arrivals:
            async for arrival in arrivals:
                yield arrival

    # -- control -------------------------------------------------------------------------

    async def _everywhere(self, call: Callable[[KVClient], Awaitable[T]]) -> list[T]:
        """`call` on every reachable member at once; the answers of those that answered."""
        placement = await self._start()
        answers = await asyncio.gather(*(self._call(member, call) for member in placement.members))
        return [answer for answer in answers if answer is not None]

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
        placement = await self._start()

        async def one(member: Member) -> MemberStats:
            try:
                return MemberStats(member, await self._node(member).stats())
            except NODE_FAILURES as error:
                self._failed(member, error)
                return MemberStats(member, None, f"{type(error).__name__}: {error}")

        members = await asyncio.gather(*(one(member) for member in placement.members))
        return ClusterStats(
            members=tuple(members),
            membership_stale_since=self.membership.stale_since,
            membership_error=self.membership.last_error,
        )


def _runs_from(placement: Placement, keys: Sequence[bytes], first: int) -> list[Run]:
    """The runs of `keys` from block `first` on (the first one cut to start there)."""
    if not placement.members:
        return []
    runs = []
    for run in placement.runs(keys):
        if run.stop <= first:
            continue
        runs.append(Run(max(run.start, first), run.stop, run.owner))
    return runs


def _weakest(results: Sequence[PutResult]) -> Durability | None:
    found = [
        result.durability
        for result in results
        if result.durability is not None and result.num_committed
    ]
    return min(found) if found else None


def _check_key(key: bytes, index: int) -> None:
    if not isinstance(key, bytes) or not key:
        raise InvalidArgument(f"keys[{index}] must be non-empty bytes")


class ClusterLayerPut(LayerPut):
    """A layer put over a cluster: one member layer put per run, all open at once, each
    fed its runs' slice of every layer (a view, not a copy)."""

    def __init__(self, client: ClusterClient, keys: list[bytes], parent_key: bytes) -> None:
        if not keys:
            raise InvalidArgument("layer_put needs at least one key")
        self._cluster = client
        self._layout = client.namespace.layout
        self._keys = keys
        self._parent_key = parent_key
        self._next_layer = 0
        self._runs: list[Run] = []
        self._puts: dict[int, LayerPut] = {}  # by run start; a failed run's put leaves
        self.result: PutResult | None = None

    async def __aenter__(self) -> ClusterLayerPut:
        placement = await self._cluster._start()
        self._runs = _runs_from(placement, self._keys, 0)

        async def open_run(run: Run) -> None:
            parent = self._keys[run.start - 1] if run.start else self._parent_key

            async def open_on(node: KVClient) -> LayerPut:
                put = node.layer_put(
                    self._keys[run.start : run.stop], parent_key=parent, parent_remote=bool(parent)
                )
                await put.__aenter__()
                return put

            put = await self._cluster._call(run.owner, open_on)
            if put is not None:
                self._puts[run.start] = put

        await asyncio.gather(*(open_run(run) for run in self._runs))
        return self

    async def send_layer(self, layer: int, kv_layer: torch.Tensor) -> None:
        if layer != self._next_layer:
            raise InvalidArgument(f"send layer {self._next_layer} next, not layer {layer}")
        check_tensor(kv_layer, self._layout, KVForm.LAYER, len(self._keys))
        kv_layer = cpu_contiguous(kv_layer)

        async def send(run: Run, put: LayerPut) -> None:
            try:
                await put.send_layer(layer, kv_layer[run.start : run.stop])
            except NODE_FAILURES as error:
                self._cluster._failed(run.owner, error)
                del self._puts[run.start]
                with contextlib.suppress(Exception):
                    await put.__aexit__(type(error), error, None)

        await asyncio.gather(
            *(send(run, self._puts[run.start]) for run in self._runs if run.start in self._puts)
        )
        self._next_layer += 1

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None and self._next_layer != self._layout.num_layers:
            exc = InvalidArgument(
                f"layer_put ended after {self._next_layer} of {self._layout.num_layers} layers"
            )
            await self._close_all(type(exc), exc)
            raise exc
        results = await self._close_all(exc_type, exc)
        if exc is not None:
            return
        outcomes: list[PutOutcome] = []
        for run in self._runs:
            result = results.get(run.start)
            if result is None:
                outcomes += [PutOutcome.NODE_UNREACHABLE] * (run.stop - run.start)
            else:
                outcomes += result.outcomes
        found = list(results.values())
        self.result = PutResult(
            outcomes=tuple(outcomes),
            num_skipped=0,
            bytes_sent=sum(result.bytes_sent for result in found),
            durability=_weakest(found),
        )

    async def _close_all(
        self, exc_type: type[BaseException] | None, exc: BaseException | None
    ) -> dict[int, PutResult]:
        runs = {run.start: run for run in self._runs}

        async def close(start: int, put: LayerPut) -> tuple[int, PutResult | None]:
            try:
                await put.__aexit__(exc_type, exc, None)
            except NODE_FAILURES as error:
                self._cluster._failed(runs[start].owner, error)
                return start, None
            return start, put.result

        closed = await asyncio.gather(*(close(s, p) for s, p in self._puts.items()))
        return {start: result for start, result in closed if result is not None}


@dataclass
class _OwnerProgress:
    owner: _OwnerRuns
    num_served: int = -1  # blocks the member serves of its runs; -1: not known yet
    num_layers_done: int = 0
    failed: bool = False
    finished: bool = False
    # An error that is not a node's failure (a bad checksum, a refused credential): the
    # whole get raises it.
    error: BaseException | None = None


class _PlacedWriter:
    """Writes a member's blocks (its runs back to back) at their places in the chain."""

    def __init__(self, positions: list[int], target: Callable[[int], tuple[ByteMap, int]]) -> None:
        self._positions = positions
        self._target = target

    def write(self, block: int, layer: int, offset: int, data: memoryview | bytes) -> None:
        byte_map, index = self._target(layer)
        byte_map.write(self._positions[block], index, offset, data)

    def write_run(self, first_block: int, num_blocks: int, layer: int, data: memoryview) -> None:
        byte_map, index = self._target(layer)
        positions = self._positions
        layer_bytes = len(data) // num_blocks if num_blocks else 0
        start = first_block
        end = first_block + num_blocks
        while start < end:
            # The longest stretch whose places are consecutive in the chain: one copy.
            stop = start + 1
            while stop < end and positions[stop] == positions[stop - 1] + 1:
                stop += 1
            piece = data[(start - first_block) * layer_bytes : (stop - first_block) * layer_bytes]
            byte_map.write_run(positions[start], stop - start, index, piece)
            start = stop


class _ChainGather:
    """One get of a chain from all its owners at once, layer by layer."""

    def __init__(
        self,
        client: ClusterClient,
        keys: list[bytes],
        runs: list[Run],
        dest: torch.Tensor | None,
        form: KVForm,
    ) -> None:
        self._client = client
        self._keys = keys
        self._runs = runs
        self._dest = dest
        self._form = form
        layout = client.namespace.layout
        self._layout = layout
        self._host: torch.Tensor | None = None
        self._host_map: ByteMap | None = None
        self._layer_buffers: dict[int, tuple[torch.Tensor, ByteMap]] = {}
        if dest is not None:
            if dest.device.type == "cpu" and dest.is_contiguous():
                self._host = dest
            else:
                self._host = torch.empty(
                    dest.shape, dtype=dest.dtype, pin_memory=torch.cuda.is_available()
                )
            self._host_map = ByteMap(self._host, layout, form)
        self._progress = [_OwnerProgress(owner) for owner in _by_owner(runs).values()]
        self._changed = asyncio.Event()

    def _target(self, layer: int) -> tuple[ByteMap, int]:
        if self._host_map is not None:
            return self._host_map, layer
        found = self._layer_buffers.get(layer)
        if found is None:
            buffer = torch.empty(
                (len(self._keys), *self._layout.layer_shape),
                dtype=self._layout.dtype.torch_dtype,
            )
            found = self._layer_buffers[layer] = (
                buffer,
                ByteMap(buffer, self._layout, KVForm.LAYER),
            )
        return found[1], 0

    async def _drive(self, progress: _OwnerProgress) -> None:
        owner = progress.owner
        client = self._client
        if not client._reachable(owner.member):
            progress.failed = True
            return
        writer = _PlacedWriter(owner.positions(), self._target)
        try:
            node = client._node(owner.member)
            arrivals = node.stream_to_writer(owner.keys(self._keys), writer)
            async with contextlib.aclosing(arrivals):
                async for arrival in arrivals:
                    progress.num_served = arrival.num_blocks
                    progress.num_layers_done = arrival.layer + 1
                    self._changed.set()
            progress.finished = True
        except NODE_FAILURES as error:
            client._failed(owner.member, error)
            progress.failed = True
        except Exception as error:
            progress.error = error
            progress.failed = True
        finally:
            if progress.num_served < 0:
                progress.num_served = 0
            self._changed.set()

    def _ready(self, layer: int) -> bool:
        return all(p.failed or p.finished or p.num_layers_done > layer for p in self._progress)

    def _prefix(self, layer: int) -> int:
        """Blocks of the chain, from its start, whose layer `layer` has arrived."""
        by_node = {p.owner.member.node_id: p for p in self._progress}
        offsets: dict[str, int] = {}
        num_blocks = 0
        for run in self._runs:
            progress = by_node[run.owner.node_id]
            offset = offsets.get(run.owner.node_id, 0)
            offsets[run.owner.node_id] = offset + (run.stop - run.start)
            size = run.stop - run.start
            delivered = progress.num_layers_done > layer
            present = max(0, min(progress.num_served - offset, size)) if delivered else 0
            num_blocks += present
            if present < size:
                break
        return num_blocks

    async def arrivals(self) -> AsyncGenerator[LayerArrival, None]:
        tasks = [
            asyncio.get_running_loop().create_task(self._drive(progress))
            for progress in self._progress
        ]
        try:
            num_blocks = len(self._keys)
            for layer in range(self._layout.num_layers):
                while not self._ready(layer):
                    self._changed.clear()
                    await self._changed.wait()
                for progress in self._progress:
                    if progress.error is not None:
                        raise progress.error
                num_blocks = min(num_blocks, self._prefix(layer))
                if num_blocks == 0:
                    return
                yield LayerArrival(
                    layer=layer, num_blocks=num_blocks, kv=self._view(layer, num_blocks)
                )
        finally:
            # Stopped early (or done): end every member's stream, so the nodes free the
            # blocks at once.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _view(self, layer: int, num_blocks: int) -> torch.Tensor:
        if self._host is None:
            return self._layer_buffers[layer][0][:num_blocks]
        assert self._dest is not None
        tokens = num_blocks * self._layout.block_tokens
        if self._form is KVForm.SEQUENCE:
            host, dest = self._host[layer, :, :tokens], self._dest[layer, :, :tokens]
        elif self._form is KVForm.BLOCKS:
            host, dest = self._host[:num_blocks, layer], self._dest[:num_blocks, layer]
        else:
            host, dest = self._host[:num_blocks], self._dest[:num_blocks]
        if self._host is not self._dest:
            dest.copy_(host, non_blocking=True)
        return dest
