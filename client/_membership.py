"""Who is in the cluster, as a client sees it: a static list, or etcd read again and again.

Every change of membership gives a new `Placement`. When etcd stops answering, the last
membership stays in force (the daemons keep serving it) and `stale_since` says since
when; the log says so once, and again when etcd answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aetcd

from kvstore.cluster.etcd import PLAINTEXT, open_etcd, read_members
from kvstore.cluster.etcd_options import EtcdAccess
from kvstore.cluster.members import EtcdTarget, Member
from kvstore.cluster.placement import Placement

logger = logging.getLogger("kvstore.client.cluster")

# How often etcd is read for members. A daemon that dies keeps its key until its lease
# runs out (its TTL, 10 s by default), so reading faster would not find it sooner; the
# cluster client marks a node that fails a call unreachable at once instead.
DEFAULT_REFRESH_S = 1.0


class Membership:
    """The members a client places runs on. The static form never changes."""

    def __init__(self, members: tuple[Member, ...], run_blocks: int) -> None:
        self.run_blocks = run_blocks
        self.placement = Placement(members, run_blocks)
        # time.time() of the first failed read since the last good one; None: fresh.
        self.stale_since: float | None = None
        self.last_error = ""
        self._listeners: list[Callable[[Placement], None]] = []

    @property
    def members(self) -> tuple[Member, ...]:
        return self.placement.members

    def on_change(self, listener: Callable[[Placement], None]) -> None:
        self._listeners.append(listener)

    def _set(self, members: list[Member]) -> None:
        if tuple(members) == self.placement.members:
            return
        before = {member.node_id for member in self.placement.members}
        after = {member.node_id for member in members}
        logger.info(
            "cluster membership: %d members (joined %s, left %s)",
            len(members),
            sorted(after - before) or "none",
            sorted(before - after) or "none",
        )
        self.placement = Placement(members, self.run_blocks)
        for listener in self._listeners:
            listener(self.placement)

    async def start(self) -> None:
        """Read the first membership (nothing to read for a static list)."""

    async def close(self) -> None:
        """Stop following changes."""


class EtcdMembership(Membership):
    """Members registered in etcd under a target's prefix, read every `refresh_s`, with
    `access`'s TLS and credentials."""

    def __init__(
        self,
        target: EtcdTarget,
        run_blocks: int,
        *,
        access: EtcdAccess = PLAINTEXT,
        refresh_s: float = DEFAULT_REFRESH_S,
        timeout_s: float = 3.0,
    ) -> None:
        super().__init__((), run_blocks)
        self._target = target
        self._access = access
        self._refresh_s = refresh_s
        self._timeout_s = timeout_s
        self._etcd: aetcd.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the members once; raises EtcdUnavailable when no endpoint answers (its
        EtcdRefused where one refused these settings), since a client that never saw
        the cluster has nothing to serve from."""
        self._set(await self._read())
        self._task = asyncio.get_running_loop().create_task(
            self._follow(), name="kvstore-cluster-membership"
        )

    async def _read(self) -> list[Member]:
        if self._etcd is None:
            self._etcd = await open_etcd(self._target, self._access, timeout_s=self._timeout_s)
        try:
            return await asyncio.wait_for(
                read_members(self._etcd, self._target), timeout=self._timeout_s
            )
        except BaseException:
            etcd, self._etcd = self._etcd, None
            with contextlib.suppress(Exception):
                await etcd.close()
            raise

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                members = await self._read()
            except Exception as error:  # etcd down, or a value that cannot be read
                self.last_error = f"{type(error).__name__}: {error}".rstrip(": ")
                if self.stale_since is None:
                    self.stale_since = time.time()
                    logger.warning(
                        "etcd is unreachable (%s); keeping the last membership of %d members",
                        self.last_error,
                        len(self.members),
                    )
                continue
            try:
                self._set(members)
            except Exception as error:  # an unusable membership: serve the last one
                logger.warning("keeping the last membership; the new one is unusable: %s", error)
                continue
            if self.stale_since is not None:
                logger.info("etcd answers again after %.1f s", time.time() - self.stale_since)
                self.stale_since = None
                self.last_error = ""

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._etcd is not None:
            etcd, self._etcd = self._etcd, None
            with contextlib.suppress(Exception):
                await etcd.close()
