"""The daemon's entry in etcd: registered under a lease kept alive, withdrawn on drain.

Registration never blocks serving. With etcd unreachable at start the daemon serves
anyway and keeps trying in the background; if etcd goes away later, or the lease is
lost, it keeps serving and registers again, under a new lease, once etcd answers.
An etcd that answers but refuses the daemon's settings (`check_etcd`: a certificate that
does not verify, plaintext against TLS, a wrong password) stops it at start-up instead,
since waiting would not help.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from pathlib import Path

import aetcd

from kvstore.cluster.etcd import PLAINTEXT, EtcdRefused, EtcdUnavailable, open_etcd
from kvstore.cluster.etcd_options import EtcdAccess
from kvstore.cluster.members import EtcdTarget, Member

logger = logging.getLogger("kvstore.server.membership")

NODE_ID_FILE = "kvstore-node-id"


def node_id_for(ssd_dir: str | None) -> str:
    """The node id kept in the SSD directory (made there the first time), so that it
    survives restarts; a random one per start where there is no SSD directory."""
    if not ssd_dir:
        return secrets.token_hex(8)
    path = Path(ssd_dir) / NODE_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        existing = path.read_text().strip()
        if existing:
            return existing
    node_id = secrets.token_hex(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(node_id + "\n")
    scratch.replace(path)  # atomic: a crash leaves the old file or the new, never half
    return node_id


async def check_etcd(target: EtcdTarget, access: EtcdAccess, *, timeout_s: float = 3.0) -> None:
    """Connect once at start-up: EtcdRefused (an OSError) where etcd answers but refuses
    these settings; an etcd that does not answer is only logged, the daemon serves on."""
    try:
        client = await open_etcd(target, access, timeout_s=timeout_s)
    except EtcdRefused:
        raise
    except EtcdUnavailable as error:
        logger.warning(
            "etcd does not answer yet (%s); serving, and registering when it does", error
        )
        return
    with contextlib.suppress(aetcd.ClientError, OSError):
        await client.close()


class Registration:
    """Keeps `member` registered at `target` under a lease of `lease_ttl_s`."""

    def __init__(
        self,
        target: EtcdTarget,
        member: Member,
        lease_ttl_s: int,
        access: EtcdAccess = PLAINTEXT,
    ) -> None:
        self.target = target
        self.access = access
        self.member = member
        self.lease_ttl_s = lease_ttl_s
        self.registered = False
        self._task: asyncio.Task[None] | None = None
        self._client: aetcd.Client | None = None
        self._lease_id = 0
        # Keep-alives three times a lease; a lost one or two still leaves the lease alive.
        self._interval_s = max(lease_ttl_s / 3, 0.2)

    @property
    def key(self) -> str:
        return self.target.member_key(self.member.node_id)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kvstore-membership")

    async def withdraw(self) -> None:
        """Stop keeping the lease alive and revoke it (its key goes with it)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        client, lease_id = self._client, self._lease_id
        if client is not None and lease_id:
            try:
                await client.revoke_lease(lease_id)
                logger.info("withdrew from the cluster: %s deleted", self.key)
            except Exception as error:
                # Any error (a re-login's grpc error too): a drain goes on to flush the
                # write-back blocks whatever etcd answers.
                logger.warning(
                    "could not withdraw %s (%s); it goes when its lease expires in <= %ds",
                    self.key,
                    error,
                    self.lease_ttl_s,
                )
        await self._disconnect()

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._register()
                failures = 0
                await self._keep_alive()
                await self._disconnect()  # the lease is gone: a new client registers again
            # Any failure (a refused re-login raises grpc's own error) is retried: the
            # daemon serves on, and registers again once etcd lets it.
            except Exception as error:
                failures += 1
                if self.registered or failures == 1:
                    logger.warning("not registered in etcd (%s); serving on and retrying", error)
                self.registered = False
                await self._disconnect()
            await asyncio.sleep(self._interval_s)

    async def _register(self) -> None:
        self._client = await open_etcd(self.target, self.access, timeout_s=self._interval_s)
        lease = await self._client.lease(self.lease_ttl_s)
        self._lease_id = lease.id
        await self._client.put(self.key.encode(), self.member.to_json(), lease=lease)
        self.registered = True
        logger.info(
            "registered in etcd as %s (%s, lease %ds)", self.key, self.member.address, lease.ttl
        )

    async def _keep_alive(self) -> None:
        """Until the lease is lost (returns) or etcd fails (raises). The record itself is
        checked too: one deleted (or overwritten by another daemon claiming this node id)
        while the lease lives would leave this daemon refreshing a lease nobody sees."""
        assert self._client is not None
        key = self.key.encode()
        while True:
            await asyncio.sleep(self._interval_s)
            reply = await self._client.refresh_lease(self._lease_id)
            if reply is None or reply.TTL <= 0:
                logger.warning("etcd lease for %s expired; registering again", self.key)
                self.registered = False
                return
            record = await self._client.get(key)
            if record is None or record.lease != self._lease_id:
                logger.warning(
                    "%s is gone from etcd (deleted or taken over); registering again", self.key
                )
                self.registered = False
                with contextlib.suppress(aetcd.ClientError, OSError):
                    await self._client.revoke_lease(self._lease_id)
                return

    async def _disconnect(self) -> None:
        client, self._client, self._lease_id = self._client, None, 0
        if client is not None:
            with contextlib.suppress(aetcd.ClientError, OSError):
                await client.close()
