"""WatchBlocks on the client: one node's event stream, checked, and a view built from it.

`node_events` turns a node's WatchBlocks replies into `BlockEvents` batches and checks
their sequence numbers: every jump must be a GAP the server announced, so a batch lost
anywhere between the server's queue and here raises ProtocolError instead of leaving a
view silently wrong. `BlockView` applies batches from any number of nodes: what a router
(Dynamo's KV router, llm-d's indexer) keeps to know where each prefix lives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import grpc

from kvstore.client._credentials import Metadata
from kvstore.client._errors import ProtocolError, error_for
from kvstore.client._settle import CallSettle
from kvstore.enums import TierKind
from kvstore.events import BlockEvent, BlockEventKind
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

_KINDS = {kind.value: kind for kind in BlockEventKind}
_TIERS = {kind.value: kind for kind in TierKind}


@dataclass(frozen=True, slots=True)
class BlockEvents:
    """One batch of one node's events, oldest first: events[i] has sequence number
    `first_sequence + i` on that node's stream.

    `first_sequence` 0 marks a batch the client made itself: a lone GAP saying the
    node's stream ended (the node left or failed). Forget what that node held; when it
    is back, its stream starts over with a snapshot, numbered from 1.
    """

    node: str  # the target (one daemon) or the member's node id (a cluster)
    first_sequence: int
    events: tuple[BlockEvent, ...]


def node_lost(node: str) -> BlockEvents:
    """The client's own GAP for a node whose stream ended (see BlockEvents)."""
    return BlockEvents(node, 0, (BlockEvent(BlockEventKind.GAP),))


def _event_from_wire(event: pb.BlockEvent) -> BlockEvent:
    kind = _KINDS.get(event.kind)
    if kind is None:
        raise ProtocolError(f"the server sent a block event of unknown kind {event.kind}")
    tier = _TIERS.get(event.tier) if event.tier else None
    return BlockEvent(kind, event.key, event.parent_key, tier)


async def node_events(
    stub: pb_grpc.KVStoreStub,
    request: pb.WatchBlocksRequest,
    node: str,
    *,
    metadata: Metadata,
    settle: CallSettle,
) -> AsyncGenerator[BlockEvents, None]:
    """The node's batches until the stream ends; its errors as client errors."""
    call = stub.WatchBlocks(request, metadata=metadata)
    settle.opened()
    expected = 1
    try:
        while True:
            try:
                reply = await call.read()
            except grpc.aio.AioRpcError as error:
                raise error_for(error) from error
            if reply is grpc.aio.EOF:
                return
            assert isinstance(reply, pb.WatchBlocksResponse)
            events = tuple(map(_event_from_wire, reply.events))
            first = reply.first_sequence
            if not events:
                raise ProtocolError("the server sent a WatchBlocks message with no event")
            jumped = first > expected and events[0].kind is BlockEventKind.GAP
            if first != expected and not jumped:
                raise ProtocolError(
                    f"events {expected}..{first - 1} of {node}'s watch stream went missing "
                    f"without a GAP (got sequence {first})"
                )
            expected = first + len(events)
            yield BlockEvents(node, first, events)
    except asyncio.CancelledError:
        settle.note_cancel()
        raise
    finally:
        if call.cancel():
            settle.note_cancel()
        settle.closed()


@dataclass(frozen=True, slots=True)
class WatchedBlock:
    parent_key: bytes
    tier: TierKind


@dataclass
class BlockView:
    """What each node holds, as its events tell: apply every batch in order.

    `blocks[node][key]` is the block's parent key and fastest tier there. A GAP empties
    the node's entry (a snapshot follows, or the node is gone); `synced` lists nodes whose
    snapshot has ended, so their view is complete.
    """

    blocks: dict[str, dict[bytes, WatchedBlock]] = field(default_factory=dict)
    synced: set[str] = field(default_factory=set)

    def apply(self, batch: BlockEvents) -> None:
        node = batch.node
        held = self.blocks.setdefault(node, {})
        for event in batch.events:
            kind = event.kind
            if kind is BlockEventKind.STORED or kind is BlockEventKind.SNAPSHOT:
                assert event.tier is not None
                held[event.key] = WatchedBlock(event.parent_key, event.tier)
            elif kind is BlockEventKind.REMOVED:
                held.pop(event.key, None)
            elif kind is BlockEventKind.TIER_CHANGED:
                block = held.get(event.key)
                if block is not None and event.tier is not None:
                    held[event.key] = WatchedBlock(block.parent_key, event.tier)
            elif kind is BlockEventKind.SNAPSHOT_END:
                self.synced.add(node)
            elif kind is BlockEventKind.GAP:
                held.clear()
                self.synced.discard(node)

    def keys(self, node: str) -> set[bytes]:
        return set(self.blocks.get(node, {}))

    def nodes_of(self, key: bytes) -> list[str]:
        """The nodes that hold `key`, by this view."""
        return [node for node, held in self.blocks.items() if key in held]
