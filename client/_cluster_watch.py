"""WatchBlocks over a cluster: every member's stream, merged into one.

One follower task per member reads that member's stream (kvstore.client._watch, which
checks its sequence numbers) and hands its batches, labelled with the member's node id,
to one bounded queue; the merged iterator yields them as they come. Each node's batches
stay in order and keep their own numbering; batches of different nodes interleave.

A member whose stream fails (down, cut off, draining) gets the client's own GAP
(`first_sequence` 0), is passed over for `cluster_retry_s` as in every cluster call,
and is followed again with a fresh stream, which starts with its snapshot. A member
that leaves the membership gets that GAP and is no longer followed; one that joins is
followed from its snapshot on. Errors that are the caller's (a refused credential, a
bad namespace, too many watchers) end the merged iterator, raised as from one daemon.

A consumer slower than the cluster leaves the queue full: followers then stop reading,
so each server's own bound (its GAP and resync) is what drops events, never this queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from kvstore.client._cluster_nodes import NODE_FAILURES, cancel_and_wait
from kvstore.client._watch import BlockEvents, node_lost
from kvstore.cluster.members import Member

if TYPE_CHECKING:
    from kvstore.client._cluster import ClusterClient

_QUEUED_BATCHES = 64
_MIN_RETRY_S = 0.1  # between tries of a node that keeps failing, whatever cluster_retry_s

# (the follower's token, a batch or the caller's error that ends the watch)
_Item = tuple[int, BlockEvents | Exception]


async def cluster_events(
    client: ClusterClient, max_events_per_message: int
) -> AsyncGenerator[BlockEvents, None]:
    """The merged batches of every member (see the module docstring)."""
    await client.start()
    queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=_QUEUED_BATCHES)
    tokens = itertools.count(1)
    # node id -> (token, the member record followed, follower); a batch whose token is
    # not its node's is stale.
    followers: dict[str, tuple[int, Member, asyncio.Task[None]]] = {}
    refresh_s = client.options.cluster_refresh_s
    try:
        while True:
            present = {member.node_id: member for member in client.membership.placement.members}
            # Gone, or back under its id at another address (its old stream is dead).
            for node_id in [
                node_id
                for node_id, (_, followed, _) in followers.items()
                if node_id not in present or _moved(followed, present[node_id])
            ]:
                followers.pop(node_id)[2].cancel()
                yield node_lost(node_id)
            for node_id, member in present.items():
                if node_id not in followers:
                    token = next(tokens)
                    task = asyncio.create_task(
                        _follow(client, member, token, queue, max_events_per_message)
                    )
                    followers[node_id] = (token, member, task)
            try:
                async with asyncio.timeout(refresh_s):
                    token, item = await queue.get()
            except TimeoutError:
                continue  # look at the membership again
            if isinstance(item, Exception):
                raise item
            current = followers.get(item.node)
            if current is not None and current[0] == token:
                yield item
    finally:
        await cancel_and_wait(task for _, _, task in followers.values())


def _moved(followed: Member, now: Member) -> bool:
    return (followed.address, followed.data_port) != (now.address, now.data_port)


async def _follow(
    client: ClusterClient,
    member: Member,
    token: int,
    queue: asyncio.Queue[_Item],
    max_events_per_message: int,
) -> None:
    """Follow one member's stream until cancelled, starting over after each failure."""
    nodes = client.nodes
    retry_s = max(client.options.cluster_retry_s, _MIN_RETRY_S)
    while True:
        if not nodes.reachable(member):
            await asyncio.sleep(retry_s)
            continue
        delivered = False
        stream = nodes.client(member).watch_blocks(max_events_per_message=max_events_per_message)
        try:
            async with contextlib.aclosing(stream):
                async for batch in stream:
                    await queue.put((token, dataclasses.replace(batch, node=member.node_id)))
                    delivered = True
            nodes.failed(member, ConnectionError("the watch stream ended"))
        except NODE_FAILURES as error:
            nodes.failed(member, error)
        except Exception as error:  # the caller's: ends the merged watch
            await queue.put((token, error))
            return
        if delivered:
            await queue.put((token, node_lost(member.node_id)))
        await asyncio.sleep(retry_s)  # a stream that fails at once must not spin
