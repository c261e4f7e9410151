"""Talking to etcd for membership, through aetcd (an asyncio etcd v3 client).

`open_etcd` returns a connected client for the first endpoint of a target that answers:
over TLS for an `etcds://` target and logged in where a user is given (EtcdAccess,
kvstore.cluster.etcd_options). `read_members` and `list_members` read what the daemons
registered (kvstore.cluster.Member).

An endpoint that answers but does not take this side's settings (a certificate that does
not verify, plaintext against TLS, a wrong password, no permission on the prefix) raises
EtcdRefused, whose message names etcd and what to change; retrying does not help.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rpc, watcher

from kvstore.cluster.etcd_options import EtcdAccess, EtcdOptions, load_access
from kvstore.cluster.etcd_probe import explain_tls_failure
from kvstore.cluster.members import EtcdTarget, Member, parse_etcd_url

logger = logging.getLogger("kvstore.cluster")

PLAINTEXT = EtcdAccess()
T = TypeVar("T")


class EtcdUnavailable(ConnectionError):
    """No endpoint of the target answered."""


class EtcdRefused(EtcdUnavailable):
    """An endpoint answered, but not to these settings: `cause` is "tls", "auth" or
    "permission", and the message says what to change."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


def _logged_in_again(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """`method`, retried once after logging in again where etcd says the token is stale.

    etcd forgets a token unused for its --auth-token-ttl (300 s by default), and lease
    keep-alives do not use it: a daemon that only kept its lease alive would otherwise
    find its token gone when it withdraws, or registers again.
    """

    @functools.wraps(method)
    async def call(self: EtcdClient, *args: Any, **kwargs: Any) -> T:
        try:
            return await method(self, *args, **kwargs)
        except aetcd.ClientError as error:
            if self.access.user is None or "invalid auth token" not in str(error):
                raise
        await self.log_in()
        return await method(self, *args, **kwargs)

    return call


class EtcdClient(aetcd.Client):  # type: ignore[misc]
    """aetcd.Client on a TLS channel where `access.tls` says so (aetcd opens only
    plaintext ones), logged in as `access.user` where one is given."""

    def __init__(self, host: str, port: int, access: EtcdAccess, timeout: int) -> None:
        super().__init__(
            host=host,
            port=port,
            username=access.user,
            password=access.password,
            timeout=timeout,
            options=(
                {"grpc.ssl_target_name_override": access.server_name}
                if access.tls and access.server_name
                else None
            ),
        )
        self.access = access

    async def connect(self) -> None:
        """Open the channel and log in; raises grpc.aio.AioRpcError (not aetcd's errors,
        so that open_etcd sees the status code) where logging in fails."""
        if self._connected.is_set():
            return
        target = f"{self._host}:{self._port}"
        options = list(self._options.items())
        access = self.access
        if access.tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=access.root_pem,
                private_key=access.key_pem,
                certificate_chain=access.cert_pem,
            )
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.auth_stub = rpc.AuthStub(self.channel)
        await self.log_in()
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()

    async def log_in(self) -> None:
        """A fresh token for `access.user` (nothing without a user)."""
        access = self.access
        if access.user is None:
            return
        request = rpc.AuthenticateRequest(name=access.user, password=access.password)
        try:
            reply = await self.auth_stub.Authenticate(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            # As etcd's own client does: credentials for an etcd without auth are not an
            # error (auth may be about to be enabled).
            if "authentication is not enabled" not in (error.details() or ""):
                raise
            return
        self.metadata = (("token", reply.token),)

    # The calls kvstore makes, each retried once with a fresh token.
    get = _logged_in_again(aetcd.Client.get)
    get_prefix = _logged_in_again(aetcd.Client.get_prefix)
    put = _logged_in_again(aetcd.Client.put)
    lease = _logged_in_again(aetcd.Client.lease)
    revoke_lease = _logged_in_again(aetcd.Client.revoke_lease)
    get_lease_info = _logged_in_again(aetcd.Client.get_lease_info)


async def open_etcd(
    target: EtcdTarget, access: EtcdAccess = PLAINTEXT, *, timeout_s: float = 3.0
) -> EtcdClient:
    """A client connected to the first endpoint that answers, in order, logged in and
    allowed to read the target's prefix.

    Every call it makes gives up after `timeout_s` (aetcd takes whole seconds). Raises
    EtcdRefused where an endpoint answered but refused these settings and none took
    them, EtcdUnavailable where none answered at all.
    """
    failures = []
    refusals = []
    for host, port in target.endpoints:
        client = EtcdClient(host, port, access, timeout=max(1, round(timeout_s)))
        try:
            await client.connect()
            # A read, not a status call: it needs the login and the permission as well.
            await client.get(target.members_prefix.encode())
        except (aetcd.ClientError, grpc.aio.AioRpcError, OSError) as error:
            await _close_quietly(client)
            refusal = await _refusal(error, host, port, target, access)
            if refusal is not None:
                refusals.append(refusal)
            failures.append(f"{host}:{port}: {_describe(error)}")
            continue
        return client
    if refusals:
        raise EtcdRefused("; ".join(str(r) for r in refusals), refusals[0].cause)
    raise EtcdUnavailable("no etcd endpoint answered (" + "; ".join(failures) + ")")


async def _close_quietly(client: EtcdClient) -> None:
    with contextlib.suppress(TimeoutError, aetcd.ClientError, grpc.aio.AioRpcError, OSError):
        await client.close()


def _rpc_error(error: BaseException) -> grpc.aio.AioRpcError | None:
    """The gRPC error under aetcd's wrapping, if any."""
    while error is not None:
        if isinstance(error, grpc.aio.AioRpcError):
            return error
        error = error.__cause__  # type: ignore[assignment]
    return None


def _describe(error: BaseException) -> str:
    rpc_error = _rpc_error(error)
    if rpc_error is not None:
        return f"{rpc_error.code().name} {rpc_error.details()}".rstrip()
    return f"{type(error).__name__} {error}".rstrip()


async def _refusal(
    error: BaseException, host: str, port: int, target: EtcdTarget, access: EtcdAccess
) -> EtcdRefused | None:
    """EtcdRefused where `error` says the endpoint refused these settings; None where it
    did not answer (or said nothing this side can fix)."""
    endpoint = f"{host}:{port}"
    rpc_error = _rpc_error(error)
    details = (rpc_error.details() or "") if rpc_error is not None else ""
    password_from = "--etcd-password-file or KVSTORE_ETCD_PASSWORD"
    if "authentication failed" in details:
        return EtcdRefused(
            f"etcd at {endpoint} refused user {access.user!r}: wrong password or no such "
            f"user ({details}); check --etcd-user and the password ({password_from})",
            "auth",
        )
    if "user name is empty" in details or "user name not found" in details:
        return EtcdRefused(
            f"etcd at {endpoint} has authentication enabled: give --etcd-user and its "
            f"password ({password_from})",
            "auth",
        )
    if "permission denied" in details:
        return EtcdRefused(
            f"etcd at {endpoint}: user {access.user!r} may not use {target.prefix}/ "
            f"({details}); grant it a role with readwrite on the prefix {target.prefix}/",
            "permission",
        )
    if rpc_error is not None and rpc_error.code() is not grpc.StatusCode.UNAVAILABLE:
        return None
    explanation = await asyncio.to_thread(explain_tls_failure, host, port, access)
    return EtcdRefused(explanation, "tls") if explanation is not None else None


async def read_members(
    client: aetcd.Client, target: EtcdTarget, *, with_leases: bool = False
) -> list[Member]:
    """The members registered under the target's prefix, by node id; with `with_leases`,
    each with its lease's seconds left (one more call per member). Values that are not
    member records are skipped (and logged)."""
    found = await client.get_prefix(target.members_prefix.encode())
    members: dict[str, Member] = {}
    for entry in found:
        ttl_left_s = -1
        if with_leases and entry.lease:
            info = await client.get_lease_info(entry.lease, keys=False)
            ttl_left_s = int(info.TTL)
        try:
            member = Member.from_json(entry.value, lease_ttl_left_s=ttl_left_s)
        except ValueError as error:
            logger.warning("skipping %r in etcd: %s", entry.key, error)
            continue
        # A daemon registers under its own node id: a record under another key, or a
        # second record of one id, is not one daemon's and could not be placed.
        if bytes(entry.key) != target.member_key(member.node_id).encode():
            logger.warning("skipping %r in etcd: it names node %r", entry.key, member.node_id)
            continue
        members[member.node_id] = member
    return sorted(members.values(), key=lambda member: member.node_id)


async def list_members(
    etcd_url: str, *, options: EtcdOptions | None = None, timeout_s: float = 3.0
) -> list[Member]:
    """The members registered under the URL's prefix, by node id, each with its lease's
    seconds left. ValueError where `options` do not fit the URL or name unreadable
    files; EtcdRefused, EtcdUnavailable as open_etcd."""
    target = parse_etcd_url(etcd_url)
    client = await open_etcd(target, load_access(target, options), timeout_s=timeout_s)
    try:
        return await read_members(client, target, with_leases=True)
    finally:
        await client.close()
