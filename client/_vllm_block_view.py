"""The scheduler side's mirror of what the store holds, for misses without a lookup.

With `block_view` on, the scheduler side follows the namespace's WatchBlocks events
on its loop thread. A request whose first block the mirror does not hold is a miss at
once: a lookup matches a chain from its first block, so the store can match none of
it. A request with any block the mirror holds is still looked up: the mirror may lag an
eviction, and the lookup touches the blocks it matches, which keeps a prefix that
vLLM's own cache covers warm in the store.

Where the mirror answers "miss" it may lag a put instead: a block stored within the
events' delay (a round trip, about a millisecond on one host) is taken for missing
and its tokens recomputed. That is a cost, never wrong bytes. While the mirror is not
complete (its snapshot not ended on every member, its stream down), every request is
looked up as without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from kvstore.client._async import KVClient
from kvstore.client._cluster import ClusterClient
from kvstore.client._errors import KVStoreClientError
from kvstore.client._loop import LoopThread
from kvstore.client._watch import BlockEvents
from kvstore.events import BlockEventKind

logger = logging.getLogger("kvstore.client.vllm")

# After the watch stream fails, the next try waits this long, doubling up to the maximum.
RETRY_S = 0.5
RETRY_MAX_S = 30.0
_POLL_S = 0.005


class KeySets:
    """Per node, the set of keys its events say it holds, and which nodes' snapshots
    have ended (no parent or tier: a miss needs neither). Applied on one thread, read
    from others. A GAP unsyncs its node, then gives it a new set; a reader takes the
    sets first and checks the nodes are synced after, so a set it took that a GAP had
    already replaced fails that check (the node is synced again only once the new set
    holds a whole snapshot)."""

    def __init__(self) -> None:
        self._held: dict[str, set[bytes]] = {}
        self._synced: set[str] = set()

    def apply(self, batch: BlockEvents) -> None:
        node = batch.node
        held = self._held.setdefault(node, set())
        for event in batch.events:
            kind = event.kind
            if kind is BlockEventKind.STORED or kind is BlockEventKind.SNAPSHOT:
                held.add(event.key)
            elif kind is BlockEventKind.REMOVED:
                held.discard(event.key)
            elif kind is BlockEventKind.SNAPSHOT_END:
                self._synced.add(node)
            elif kind is BlockEventKind.GAP:
                self._synced.discard(node)
                self._held[node] = held = set()

    def held_prefix(self, keys: Sequence[bytes], nodes: set[str]) -> int | None:
        """How many of `keys`, from the first, one of `nodes` holds; None unless every
        one of `nodes` (at least one) has its snapshot."""
        held = [self._held.get(node, set()) for node in nodes]  # before the check
        if not nodes or not nodes <= set(self._synced):
            return None
        count = 0
        for key in keys:
            if not any(key in node_keys for node_keys in held):
                break
            count += 1
        return count


class StoredKeysMirror:
    """The namespace's stored keys, as the store's events tell, kept on `loop`."""

    def __init__(self, loop: LoopThread, client: KVClient | ClusterClient) -> None:
        self._keys = KeySets()
        self._live = False  # a stream is open and its batches applied
        self._expected_nodes: Callable[[], set[str]] = _nodes_of(client)
        self._task = loop.submit(self._follow(client))

    def held_prefix(self, keys: Sequence[bytes]) -> int | None:
        """How many of `keys`, from the first, the store holds by the mirror; None while
        the mirror is incomplete (then it says nothing). Safe from any thread."""
        if not self._live:
            return None
        return self._keys.held_prefix(keys, self._expected_nodes())

    def wait_complete(self, timeout_s: float) -> bool:
        """Whether the mirror became complete within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self.held_prefix(()) is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)
        return True

    def close(self) -> None:
        self._task.cancel()

    async def _follow(self, client: KVClient | ClusterClient) -> None:
        wait_s = RETRY_S
        while True:
            try:
                async with contextlib.aclosing(client.watch_blocks()) as batches:
                    async for batch in batches:
                        self._live = True
                        self._keys.apply(batch)
                        wait_s = RETRY_S
            except Exception as error:
                # Whatever ended it (the store, a protocol error, an event this client
                # cannot apply), the mirror says nothing until a new stream is synced.
                logger.warning(
                    "kvstore block view: the watch failed (%s: %s); requests are looked "
                    "up until it is back (next try in %.1f s)",
                    type(error).__name__,
                    error,
                    wait_s,
                    exc_info=not isinstance(error, KVStoreClientError),
                )
            finally:
                self._live = False
                self._keys = KeySets()
            await asyncio.sleep(wait_s)
            wait_s = min(RETRY_MAX_S, 2 * wait_s)


def _nodes_of(client: KVClient | ClusterClient) -> Callable[[], set[str]]:
    """The nodes whose snapshot must have ended for the mirror to be complete: the one
    daemon (its events name its target), or every member of the cluster now."""
    if isinstance(client, ClusterClient):
        return lambda: {member.node_id for member in client.membership.placement.members}
    target = client.target
    return lambda: {target}
