"""The daemon's TCP data plane: puts and gets framed as kvstore.wire.frames describes.

Each connection serves one transfer at a time through kvstore.server.transfer, as
the gRPC PutBlocks and GetBlocks handlers do, so validation, status codes and the
reclaiming of abandoned puts are identical. A bad frame gets an ERROR frame with the
status code gRPC would have answered, and the connection is closed: the stream cannot
be trusted after it. Other connections and stored blocks are untouched. The drain is
the lifecycle gRPC shares (kvstore.server.lifecycle).

The same-host path (kvstore.wire.shm) is this data plane on a Unix socket: the same
HELLO, tokens, connection limits and transfers, plus the buffers its clients register
(kvstore.server.shm), through which the bytes of PUT_SHM and GET_SHM move.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import grpc

from kvstore.config import TenantQuota
from kvstore.errors import CapacityExhausted, InvalidRequest
from kvstore.keys import MAX_KEY_BYTES
from kvstore.server.auth import MAX_TOKEN_BYTES, OPEN, Authenticator, Caller, Unauthenticated
from kvstore.server.config import Limits
from kvstore.server.credentials import Credential, hello_credential
from kvstore.server.decode import parse_request
from kvstore.server.lifecycle import Lifecycle
from kvstore.server.lookup import Lookups
from kvstore.server.pacing import TransferPacing
from kvstore.server.request_metrics import RequestMetrics
from kvstore.server.shm import ClientBuffers, FdStream, MappedBytes
from kvstore.server.shm_socket import bind_private, remove_stale_socket
from kvstore.server.status import status_for
from kvstore.server.transfer import TailedMessage, Transfers
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.frames import (
    DEFAULT_TRANSFER_S,
    HEADER,
    HELLO_PAYLOAD,
    LOOP_SLICE_BYTES,
    ConnectionClosed,
    FrameKind,
    FrameReader,
    FrameTooLarge,
    decode_deadline,
    encode_error,
    frame_header,
    send_frame,
    tune_socket,
)
from kvstore.wire.shm import (
    BUFFER_ID,
    INSTANCE_BYTES,
    REGION,
    SHM_MESSAGE_BYTES,
    Region,
    RegionRing,
    copy_parts,
    decode_buffer_size,
    decode_region,
)
from kvstore.wire.tls import TLSStream

logger = logging.getLogger("kvstore.server")
# After an ERROR frame, how long to wait for the client to read it and hang up.
_LINGER_S = 2.0
# A connection that has not said HELLO by then is not a kvstore client: close it.
_HELLO_TIMEOUT_S = 10.0
# At the connection limit, a connection still before its HELLO this long may be closed to
# make room: more than the round trips of a TLS handshake and a HELLO between hosts.
_CUT_AFTER_S = 0.5
# A connection idle between transfers this long is closed. Clients drop their pooled
# connections sooner (kvstore.client._dataplane), so they never pick up one being closed.
_IDLE_TIMEOUT_S = 300.0


class _Rejected(Exception):
    """Answer with this status and close the connection."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Link:
    """One connection's socket, its TLS layer if any, its reader, and whether a frame
    is half sent."""

    def __init__(
        self,
        sock: socket.socket,
        max_payload: int,
        tls: TLSStream | None,
        fd_stream: FdStream | None = None,
        mapped_bytes: MappedBytes | None = None,
    ) -> None:
        self.sock = sock if tls is None else tls.sock  # a TLS stream owns the socket
        self.tls = tls
        self.secured = tls is None  # no TLS, or its handshake is done
        self.stream: socket.socket | TLSStream | FdStream = sock if tls is None else tls
        # The same-host socket: descriptors it receives, and the buffers they map.
        self.fd_stream = fd_stream
        self.buffers: ClientBuffers | None = None
        if fd_stream is not None:
            assert mapped_bytes is not None, "a same-host connection counts what it maps"
            self.stream = fd_stream
            self.buffers = ClientBuffers(mapped_bytes)
        self.reader = FrameReader(self.stream, max_payload)
        # True while a frame is on its way out: a frame cut short (a deadline, a drain)
        # leaves the stream where no ERROR frame can follow.
        self.mid_frame = False
        self.credential: Credential | None = None  # what HELLO presented; None: no auth
        self.tenant: str | None = None  # counted against its max_data_connections quota
        self.peer_common_name: str | None = None  # a verified client certificate's name

    async def send(self, kind: FrameKind, parts: Sequence[bytes | memoryview] = ()) -> None:
        self.mid_frame = True
        await send_frame(self.stream, kind, parts)
        self.mid_frame = False

    async def readable(self) -> None:
        """Until the client has sent a byte, or hung up: the next frame has begun."""
        if self.tls is not None:
            await self.tls.wait_readable()
            return
        try:
            self.sock.recv(1, socket.MSG_PEEK)
            return  # a byte, or b"" at the end: the read that follows tells which
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return  # a reset: the read that follows raises ConnectionClosed
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self.sock.fileno(), wake)
        try:
            await ready
        finally:
            loop.remove_reader(self.sock.fileno())

    async def read_frame(
        self, pacing: TransferPacing, limit: int | None = None
    ) -> tuple[int, memoryview]:
        """The next frame of a transfer: the wait for its first byte is the client's
        turn, and from that byte on it must arrive within the frame timeout."""
        pacing.waiting()
        await self.readable()
        pacing.receiving()
        frame = await self.reader.read(limit)
        pacing.working()
        return frame


def _tailed_message(link: _Link, pacing: TransferPacing, before_tail: memoryview) -> TailedMessage:
    """A PUT_TAIL frame's message, its tail read (within the frame's time, counted from
    the frame's first byte) as the put asks for it."""
    reader = link.reader

    async def arriving() -> None:
        pacing.receiving_rest()
        await reader.await_tail()
        pacing.working()

    async def receive_into(views: list[memoryview]) -> None:
        pacing.receiving_rest()
        await reader.read_tail_into(views)
        pacing.working()

    async def receive(nbytes: int) -> memoryview:
        pacing.receiving_rest()
        tail = await reader.read_tail(nbytes)
        pacing.working()
        return tail

    return TailedMessage(before_tail, reader.tail_bytes, arriving, receive_into, receive)


class DataPlane:
    def __init__(
        self,
        transfers: Transfers,
        lifecycle: Lifecycle,
        limits: Limits,
        auth: Authenticator | None = None,
        tls_context: ssl.SSLContext | None = None,
        quotas: Mapping[str, TenantQuota] | None = None,
        lookups: Lookups | None = None,
    ) -> None:
        self._transfers = transfers
        self._lookups = lookups  # None: LOOKUP frames are refused as unknown kinds
        # A LOOKUP frame is at most this long: max_keys keys and a namespace. Its cost
        # is bounded by these bytes; a longer one is RESOURCE_EXHAUSTED, unread.
        self._lookup_limit = min(
            limits.max_message_bytes, limits.max_keys * (MAX_KEY_BYTES + 3) + 4096
        )
        self.lookups = 0  # LOOKUP frames answered, for tests
        self._tls_context = tls_context  # None: plaintext
        self._quotas = quotas or {}
        # Open connections per tenant with a max_data_connections quota.
        self._tenant_connections: dict[str, int] = {}
        self._auth = auth  # None: no authentication, every connection is OPEN
        self._lifecycle = lifecycle
        self._limits = limits
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        # Connections waiting for their next transfer: a drain closes these at once.
        self._idle: dict[asyncio.Task[None], _Link] = {}
        # Connections not past HELLO yet, oldest first, with their sockets. At the
        # connection limit a new one closes the oldest of these instead of being turned
        # away: silent connections (unauthenticated, as far as anyone knows) cannot keep
        # the slots from clients that prove themselves within moments.
        self._handshaking: dict[asyncio.Task[None], tuple[socket.socket, float]] = {}
        self.handshakes_cut = 0  # connections closed in their handshake to make room
        self.transfers = 0  # puts and gets served, for tests and logs
        self.accepted = 0  # connections served (not those turned away at the cap)
        self.request_metrics: RequestMetrics | None = None  # errors counted here, if on
        # The same-host socket (kvstore.wire.shm), once listening.
        self.shm_path = ""
        self.shm_transfers = 0  # puts and gets whose bytes moved through shared memory
        self.mapped_bytes = MappedBytes()  # of the clients' buffers, all connections
        # Said in the Unix socket's HELLO: clients check they reached this daemon.
        self.instance = secrets.token_bytes(INSTANCE_BYTES)
        self._unix_listener: socket.socket | None = None
        self._unix_accepting: asyncio.Task[None] | None = None

    def counts(self) -> tuple[int, int]:
        """(connections open now, transfers carried), for Stats."""
        return len(self._connections), self.transfers

    async def start(self, host: str, port: int) -> int:
        """Listen on `host:port` (0: any free port); returns the bound port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(64)
            listener.setblocking(False)
        except OSError as error:
            listener.close()
            raise OSError(f"data plane cannot listen on {host}:{port}: {error}") from error
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept_loop(listener))
        bound: int = listener.getsockname()[1]
        return bound

    async def start_unix(self, path: str) -> None:
        """Listen for same-host clients on the Unix socket `path`, readable and writable
        by this user only. A socket file left by a daemon that is gone is replaced."""
        remove_stale_socket(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            bind_private(listener, path)
            listener.listen(64)
            listener.setblocking(False)
        except OSError as error:
            listener.close()
            raise OSError(f"the same-host path cannot listen on {path}: {error}") from error
        self._unix_listener = listener
        self.shm_path = path
        self._unix_accepting = asyncio.create_task(self._accept_loop(listener, unix=True))

    def close_revoked(self) -> int:
        """Close the idle connections whose credential no longer proves their caller (after
        the tokens file is reloaded: a revoked token must not keep its connection slots,
        or its tenant's max_data_connections share, until its next request). Returns how
        many were closed; a connection in a transfer is checked at its next one."""
        if self._auth is None:
            return 0
        closed = 0
        for task, link in list(self._idle.items()):
            if link.credential is None:
                continue  # still in its HELLO: checked there
            try:
                caller = link.credential.caller(self._auth)
            except Unauthenticated:
                caller = None
            # A token moved to another tenant closes too: the connection is counted
            # against the tenant its HELLO proved.
            if caller is None or (link.tenant is not None and caller.tenant != link.tenant):
                task.cancel()
                closed += 1
        if closed:
            logger.info("closed %d idle data-plane connections of revoked tokens", closed)
        return closed

    async def drain(self, grace_s: float) -> None:
        """Stop accepting, close idle connections, and give transfers in flight
        `grace_s` to finish before they are cut."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
        if self._unix_accepting is not None:
            self._unix_accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._unix_accepting
        if self._unix_listener is not None:
            self._unix_listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.shm_path)
        for task in list(self._idle):
            task.cancel()
        if self._connections:
            _, pending = await asyncio.wait(set(self._connections), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _accept_loop(self, listener: socket.socket, *, unix: bool = False) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as error:  # out of file descriptors, say: keep serving
                logger.warning("data plane accept failed: %s", error)
                await asyncio.sleep(0.1)
                continue
            tune_socket(sock)
            full = len(self._connections) >= self._limits.max_data_connections
            if full and not self._cut_oldest_handshake():
                _refuse(
                    sock,
                    self._limits.max_data_connections,
                    plaintext=unix or self._tls_context is None,
                )
                continue
            self.accepted += 1
            task = asyncio.create_task(self._serve(sock, unix=unix))
            self._connections.add(task)
            self._handshaking[task] = (sock, time.monotonic())
            task.add_done_callback(self._connection_ended)

    def _cut_oldest_handshake(self) -> bool:
        """Close the connection that has waited longest for its HELLO, if that is longer
        than _CUT_AFTER_S, freeing its slot now; False if there is none so old. Younger
        ones are left their round trips: a flood of new connections must not cut every
        client that is proving itself."""
        if not self._handshaking:
            return False
        task, (sock, accepted_s) = next(iter(self._handshaking.items()))
        if time.monotonic() - accepted_s < _CUT_AFTER_S:
            return False
        del self._handshaking[task]
        self._connections.discard(task)
        task.cancel()
        # A task cancelled before it ran never reaches its own close.
        task.add_done_callback(lambda _: sock.close())
        self.handshakes_cut += 1
        logger.debug("data plane at its connection limit: closed a connection still in HELLO")
        return True

    def _connection_ended(self, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        entry = self._handshaking.pop(task, None)
        if entry is not None:
            entry[0].close()  # a task cancelled before it ran never reached its own close

    async def _serve(self, sock: socket.socket, *, unix: bool = False) -> None:
        task = asyncio.current_task()
        assert task is not None
        tls = None
        # The same-host socket never leaves the host: it needs no TLS.
        if self._tls_context is not None and not unix:
            try:
                tls = TLSStream(sock, self._tls_context, server_side=True)
            except OSError:  # the client is already gone
                sock.close()
                return
        link = _Link(
            sock,
            self._limits.max_message_bytes,
            tls,
            FdStream(sock) if unix else None,
            self.mapped_bytes,
        )
        reader = link.reader
        try:
            self._idle[task] = link
            try:
                await self._handshake(link)
            finally:
                self._idle.pop(task, None)
            # A drain ends the connection between transfers; the client's pool sees it.
            while not self._lifecycle.draining:
                reader.release_buffer()  # an idle connection holds no megabyte buffer
                self._idle[task] = link
                try:
                    async with asyncio.timeout(_IDLE_TIMEOUT_S):
                        await link.readable()
                except TimeoutError:
                    return  # idle too long: close quietly, the client's pool sees it
                finally:
                    self._idle.pop(task, None)
                # The transfer's deadline runs from its first byte: the client's own
                # (DEFAULT_TRANSFER_S without a DEADLINE frame), capped by the server's
                # limits.max_transfer_s. Idle waits and trickled frames are cut sooner
                # (kvstore.server.pacing); a cut frees what the transfer held.
                if self._lookups is not None and await self._lookup(link):
                    # Answered: no transfer, no pacing. A client that sends its next
                    # lookup as soon as it has this answer finds it already read at the
                    # next wait; let other connections in before it, every request.
                    await asyncio.sleep(0)
                    continue
                async with TransferPacing(self._limits, "transfer") as pacing:
                    pacing.receiving()
                    kind, payload = await reader.read()
                    pacing.working()
                    if kind == FrameKind.REGISTER and link.buffers is not None:
                        await self._register(link, payload)
                        continue  # not a transfer
                    if link.fd_stream is not None:
                        link.fd_stream.close_fds()  # descriptors come with REGISTER only
                    self._lifecycle.refuse_if_draining()
                    if kind == FrameKind.DEADLINE:
                        pacing.set_deadline(_deadline_of(payload))
                        kind, payload = await link.read_frame(pacing)
                    else:
                        pacing.set_deadline(DEFAULT_TRANSFER_S)
                    await self._transfer(link, pacing, kind, payload)
                await asyncio.sleep(0)  # as after a lookup: one request a step at most
                if kind == FrameKind.LOOKUP:
                    continue  # a lookup (over TLS or the same-host socket): no transfer
                self.transfers += 1
                if link.buffers is not None:
                    self.shm_transfers += 1
        except (ConnectionClosed, asyncio.CancelledError):
            pass  # the client went away, or a drain closed an idle connection
        except FrameTooLarge as error:
            await self._reject(link, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except _Rejected as error:
            await self._reject(link, error.code, str(error))
        except Exception as error:
            code, message = status_for(error)
            await self._reject(link, code, message)
        finally:
            if link.buffers is not None:
                # Unmapping a client's buffers takes milliseconds per 64 MiB it touched
                # (munmap releases the GIL): on a thread, not in a step of the loop.
                _close_off_loop(link.buffers)
            if link.fd_stream is not None:
                link.fd_stream.close_fds()
            if link.tenant is not None:
                self._tenant_connections[link.tenant] -= 1
            if link.tls is not None and link.secured:
                link.tls.close_notify()
            link.sock.close()

    async def _lookup(self, link: _Link) -> bool:
        """Answer a LOOKUP frame if the next frame is one (its header is peeked at);
        False, having read nothing, for any other frame."""
        header = _peek_header(link)
        if header is None or header[0] != FrameKind.LOOKUP:
            return False
        assert self._lookups is not None
        try:
            async with asyncio.timeout(self._limits.frame_timeout_s):
                _, payload = await link.reader.read(self._lookup_limit)
            if link.fd_stream is not None:
                link.fd_stream.close_fds()  # descriptors come with REGISTER only
        except TimeoutError:
            raise _Rejected(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"a LOOKUP frame did not arrive whole within {self._limits.frame_timeout_s:g} "
                "s of its first byte (the server's limits.frame_timeout_s)",
            ) from None
        self._lifecycle.refuse_if_draining()
        await self._answer_lookup(link, payload)
        return True

    async def _answer_lookup(self, link: _Link, payload: memoryview) -> None:
        assert self._lookups is not None
        if len(payload) > self._lookup_limit:
            raise FrameTooLarge(FrameKind.LOOKUP, len(payload), self._lookup_limit)
        caller = OPEN
        if link.credential is not None and self._auth is not None:
            caller = link.credential.caller(self._auth)  # a token revoked since HELLO stops it
        reply = self._lookups.answer(parse_request(pb.LookupPrefixRequest, bytes(payload)), caller)
        await link.send(FrameKind.LOOKUP_RESULT, [reply.SerializeToString()])
        self.lookups += 1

    async def _transfer(
        self, link: _Link, pacing: TransferPacing, kind: int, payload: memoryview
    ) -> None:
        # Checked again at every transfer: a connection outlives a revoked or expired token.
        caller = OPEN
        if link.credential is not None and self._auth is not None:
            caller = link.credential.caller(self._auth)
        if kind in (FrameKind.PUT, FrameKind.PUT_TAIL, FrameKind.PUT_SHM):
            pacing.what = "put"
            messages = self._put_messages(link, pacing, kind, payload)
            reply = await self._transfers.put(messages, caller)
            await link.send(FrameKind.PUT_DONE, [reply.SerializeToString()])
        elif kind == FrameKind.LOOKUP and self._lookups is not None:
            # Over TLS or the same-host socket, where the header is not peeked at.
            await self._answer_lookup(link, payload)
        elif kind == FrameKind.GET:
            pacing.what = "get"
            await self._get(link, pacing, payload, caller)
        elif kind == FrameKind.GET_SHM and link.buffers is not None:
            pacing.what = "get"
            await self._get_shm(link, link.buffers, pacing, payload, caller)
        else:
            raise InvalidRequest(
                f"a transfer starts with a PUT or GET frame (after an optional DEADLINE), "
                f"or on the same-host socket PUT_SHM or GET_SHM; not kind {kind}"
            )

    async def _handshake(self, link: _Link) -> None:
        try:
            async with asyncio.timeout(_HELLO_TIMEOUT_S):
                if link.tls is not None:
                    await _secure(link, link.tls)
                # Nothing larger than a HELLO and its token is read, or buffered, before it.
                limit = len(HELLO_PAYLOAD) + MAX_TOKEN_BYTES
                kind, payload = await link.reader.read(limit=limit)
            hello = kind == FrameKind.HELLO and payload[: len(HELLO_PAYLOAD)] == HELLO_PAYLOAD
        except FrameTooLarge:  # an HTTP request, say: its first bytes read as a huge length
            hello = False
        except TimeoutError:
            if not link.secured:  # no TLS yet to carry an ERROR frame
                raise ConnectionClosed("no TLS handshake within the HELLO timeout") from None
            raise _Rejected(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no HELLO frame within {_HELLO_TIMEOUT_S:.0f} s of connecting",
            ) from None
        if not hello:
            raise _Rejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                "not a kvstore data-plane client (or another version of it): a connection "
                f"starts with a HELLO frame carrying {HELLO_PAYLOAD!r} (see kvstore.wire.frames)",
            )
        if self._auth is not None:
            token = bytes(payload[len(HELLO_PAYLOAD) :])
            link.credential = hello_credential(self._auth, token, link.peer_common_name)
            caller = link.credential.caller(self._auth)  # refused now, not at a transfer
            link.tenant = self._admit_tenant(caller.tenant)
        current = asyncio.current_task()
        if current is not None:
            self._handshaking.pop(current, None)  # proven: no longer a connection to cut
        if link.buffers is not None:
            await link.send(FrameKind.HELLO, [HELLO_PAYLOAD, self.instance])
        else:
            await link.send(FrameKind.HELLO, [HELLO_PAYLOAD])

    def _admit_tenant(self, tenant: str | None) -> str | None:
        """Count the connection against its tenant's max_data_connections quota; the
        tenant it was counted for (None: no such quota). Past the quota: refused."""
        quota = self._quotas.get(tenant) if tenant is not None else None
        limit = quota.max_data_connections if quota is not None else None
        if tenant is None or limit is None:
            return None
        open_now = self._tenant_connections.get(tenant, 0)
        if open_now >= limit:
            raise CapacityExhausted(
                f"tenant {tenant!r} is at its max_data_connections quota ({limit} open); "
                f"close idle clients, or raise quotas.{tenant}.max_data_connections "
                f"(transfers fall back to gRPC meanwhile)"
            )
        self._tenant_connections[tenant] = open_now + 1
        return tenant

    async def _register(self, link: _Link, payload: memoryview) -> None:
        """Map the buffer a REGISTER frame passed, and answer with its id."""
        assert link.buffers is not None
        assert link.fd_stream is not None
        fds = link.fd_stream.take_fds()
        try:
            # Checked again, as at every transfer: a revoked or expired token maps nothing.
            if link.credential is not None and self._auth is not None:
                link.credential.caller(self._auth)
            size = decode_buffer_size(payload)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        buffer_id = link.buffers.register(fds, size)
        await link.send(FrameKind.REGISTERED, [BUFFER_ID.pack(buffer_id)])

    async def _put_messages(
        self, link: _Link, pacing: TransferPacing, kind: int, first: memoryview
    ) -> AsyncIterator[memoryview | TailedMessage]:
        payload = first
        while True:
            if kind == FrameKind.PUT_TAIL:
                yield _tailed_message(link, pacing, payload)
                if link.reader.tail_bytes:  # the put must take the tail before the next frame
                    raise RuntimeError("a PUT_TAIL frame's tail was left unread")
            elif kind == FrameKind.PUT_SHM and link.buffers is not None:
                region = decode_region(payload)
                limit = max(self._limits.max_message_bytes, SHM_MESSAGE_BYTES)
                yield link.buffers.view(region, limit)
                # Applied (the put asks for the next message only then): the client may
                # write over the region.
                await link.send(FrameKind.SHM_DONE)
            elif kind == FrameKind.PUT:
                yield payload
            else:
                raise InvalidRequest(
                    "PUT_SHM is for the same-host socket only; this connection has no buffers"
                )
            # Frames already queued (in the socket's buffer or the region) are read
            # without a wait, so a whole put would run as one step of the loop: let
            # lookups in after each message.
            await asyncio.sleep(0)
            if link.fd_stream is not None:
                link.fd_stream.close_fds()  # descriptors come with REGISTER only
            kind, payload = await link.read_frame(pacing)
            if kind == FrameKind.PUT_END:
                return
            if kind not in (FrameKind.PUT, FrameKind.PUT_TAIL, FrameKind.PUT_SHM):
                raise InvalidRequest(
                    f"a put goes on with PUT (or PUT_TAIL, or PUT_SHM) frames and ends with "
                    f"PUT_END, not kind {kind}"
                )

    async def _get(
        self, link: _Link, pacing: TransferPacing, payload: memoryview, caller: Caller
    ) -> None:
        request = parse_request(pb.GetBlocksRequest, bytes(payload))
        async with contextlib.aclosing(self._transfers.get(request, caller)) as messages:
            async for parts in messages:
                pacing.waiting()  # until the client has taken the frame (or most of it)
                await link.send(FrameKind.GET_DATA, parts)
                pacing.working()
        await link.send(FrameKind.GET_END)

    async def _get_shm(
        self,
        link: _Link,
        buffers: ClientBuffers,
        pacing: TransferPacing,
        payload: memoryview,
        caller: Caller,
    ) -> None:
        """A get whose replies are written into the client's region, each named by a
        GET_DATA_SHM frame; the client hands each back with SHM_DONE."""
        region = decode_region(payload)
        target = buffers.view(region, max_length=region.length)
        ring = RegionRing(region.length)
        request = parse_request(pb.GetBlocksRequest, bytes(payload[REGION.size :]))
        # Same host: a memcpy beats any codec, so the bytes go raw whatever was asked.
        get = self._transfers.get(request, caller, may_compress=False)
        async with contextlib.aclosing(get) as messages:
            async for parts in messages:
                length = sum(memoryview(part).nbytes for part in parts)
                try:
                    offset = ring.reserve(length)
                except ValueError:
                    raise InvalidRequest(
                        f"the region for replies ({region.length} bytes) is smaller than a "
                        f"{length}-byte reply; name one of at least max_chunk_bytes + 4 KiB"
                    ) from None
                while offset is None:  # the client still reads older replies
                    await self._await_done(link, pacing, ring)
                    offset = ring.reserve(length)
                await _copy_sliced(target, offset, parts)
                reply = Region(region.buffer_id, region.offset + offset, length)
                pacing.waiting()
                await link.send(FrameKind.GET_DATA_SHM, [reply.encode()])
                pacing.working()
                # A reply's frame is a few bytes and never waits: without this the whole
                # get would be copied in one step of the loop, and lookups behind it.
                await asyncio.sleep(0)
        while ring.num_in_use:  # every reply is handed back before the get ends
            await self._await_done(link, pacing, ring)
        await link.send(FrameKind.GET_END)

    async def _await_done(self, link: _Link, pacing: TransferPacing, ring: RegionRing) -> None:
        kind, _ = await link.read_frame(pacing)
        if kind != FrameKind.SHM_DONE:
            raise InvalidRequest(f"a get through shared memory takes SHM_DONE frames, not {kind}")
        ring.free_oldest()

    async def _reject(self, link: _Link, code: grpc.StatusCode, message: str) -> None:
        """Send ERROR, then let the client read it before the connection closes:
        closing with unread input would reset the connection and could lose it.

        After a frame cut short there is no frame boundary left to put an ERROR at:
        the connection just closes, and the client reports it lost.
        """
        if self.request_metrics is not None:
            self.request_metrics.count_error("data_plane", code.name)
        if link.mid_frame or not link.secured:
            return
        try:
            # The send is bounded too: a client that reads nothing must not hold the
            # connection open with a full socket buffer.
            async with asyncio.timeout(_LINGER_S):
                await link.send(FrameKind.ERROR, [encode_error(code.value[0], message)])
                if link.tls is not None:
                    link.tls.close_notify()
                    link.tls.shutdown(socket.SHUT_WR)
                else:
                    link.sock.shutdown(socket.SHUT_WR)
                scratch = memoryview(bytearray(64 << 10))
                while True:  # discard what the client still sends, until it hangs up
                    await link.reader.read_into(scratch)
        except (ConnectionClosed, OSError, TimeoutError, asyncio.CancelledError):
            pass


def _close_off_loop(buffers: ClientBuffers) -> None:
    """Close `buffers` on the loop's default executor; nothing else holds them now."""
    closing = asyncio.get_running_loop().run_in_executor(None, buffers.close)
    closing.add_done_callback(_log_close_failure)


def _log_close_failure(closing: asyncio.Future[None]) -> None:
    if not closing.cancelled() and closing.exception() is not None:
        logger.warning("unmapping a closed connection's buffers failed: %s", closing.exception())


async def _copy_sliced(target: memoryview, offset: int, parts: list[bytes | memoryview]) -> None:
    """copy_parts, letting the loop run other callbacks (lookups) after each
    LOOP_SLICE_BYTES, as the TCP path's sends do."""
    unyielded = 0
    for part in parts:
        offset += copy_parts(target, offset, [part])
        unyielded += memoryview(part).nbytes
        if unyielded >= LOOP_SLICE_BYTES:
            unyielded = 0
            await asyncio.sleep(0)


def _peek_header(link: _Link) -> tuple[int, int] | None:
    """The next frame's (kind, length) where its header has arrived on a plain TCP or
    same-host socket; None otherwise (TLS, or not all there yet), and the frame goes the
    transfer's way. A peek leaves descriptors sent with the frame (REGISTER) queued."""
    if link.tls is not None:
        return None
    try:
        header = link.sock.recv(HEADER.size, socket.MSG_PEEK)
    except OSError:
        return None
    if len(header) < HEADER.size:
        return None
    kind, length = HEADER.unpack(header)
    return kind, length


def _deadline_of(payload: memoryview) -> float:
    try:
        seconds = decode_deadline(payload)
    except ValueError as error:
        raise InvalidRequest(str(error)) from None
    return seconds


async def _secure(link: _Link, tls: TLSStream) -> None:
    """The TLS handshake; a client that fails it (no certificate, one from another CA,
    not TLS at all) is closed without a word: there is no channel to say it on."""
    try:
        await tls.handshake()
    except OSError as error:  # ssl.SSLError included
        logger.debug("data plane TLS handshake failed: %s", error)
        raise ConnectionClosed(f"TLS handshake failed: {error}") from None
    link.secured = True
    link.peer_common_name = tls.peer_common_name()


def _refuse(sock: socket.socket, limit: int, *, plaintext: bool) -> None:
    """Turn a connection away at once: the client falls back to gRPC. Over TLS it is
    just closed (its handshake fails, which the client treats the same way)."""
    if not plaintext:
        sock.close()
        return
    error = encode_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        f"the data plane has {limit} connections (limits.max_data_connections); use gRPC",
    )
    with contextlib.suppress(OSError):
        sock.send(frame_header(FrameKind.ERROR, len(error)) + error)
    sock.close()
