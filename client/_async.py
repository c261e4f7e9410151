"""The asyncio client: lookups, streaming puts and gets of torch KV tensors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Sequence
from itertools import chain, repeat
from types import TracebackType

import grpc
import numpy as np
import torch

from kvstore.allocator import tune_allocator_once
from kvstore.checksum import checksums_of_slices
from kvstore.client._dataplane import DataConnection, DataPlanePool, DataPlaneUnreachable
from kvstore.client._errors import InvalidArgument, translate_rpc_errors
from kvstore.client._lookup_stream import LookupStreams
from kvstore.client._options import ClientOptions
from kvstore.client._receive import LayerReceiver
from kvstore.client._results import LayerArrival, PrefixMatch, PutResult
from kvstore.client._send import MessageBatch, run_messages
from kvstore.client._settle import CallSettle
from kvstore.codec import ByteMap, KVForm, cpu_contiguous
from kvstore.codec import check_tensor as _check_tensor_core
from kvstore.enums import PutOutcome, TierKind
from kvstore.errors import InvalidRequest
from kvstore.keys import chain_keys, validate_key
from kvstore.layout import KVLayout, Namespace
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire.chunks import (
    PUT_RUNS,
    GetMessage,
    decode_get_message,
    encode_put_header,
    run_parts,
)
from kvstore.wire.frames import VERSION as DATAPLANE_VERSION
from kvstore.wire.frames import FrameKind
from kvstore.wire.namespace import namespace_to_wire

_TIER_BY_NUMBER = {kind.value: kind for kind in TierKind}
logger = logging.getLogger("kvstore.client")
# After the data plane could not be reached, use gRPC this long before asking again.
_DATA_PLANE_RETRY_S = 30.0


class KVClient:
    """Async client for one namespace of a kvstore server.

    Use as `async with KVClient("127.0.0.1:50051", namespace) as client: ...`. KV tensors
    come in the forms of `kvstore.codec.KVForm`; the default is `sequence`
    (`[num_layers, 2, num_tokens, num_kv_heads, head_dim]`).
    """

    def __init__(
        self,
        target: str,
        namespace: Namespace,
        *,
        options: ClientOptions | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.namespace = namespace
        self.options = options or ClientOptions()
        if self.options.tune_allocator:
            tune_allocator_once()
        limit = self.options.max_message_bytes
        self._owns_channel = channel is None
        self._channel = channel or grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
        )
        self._stub = pb_grpc.KVStoreStub(self._channel)
        # The block-carrying RPCs bypass the generated classes: see kvstore.wire.chunks.
        self._put_blocks = self._channel.stream_unary(
            "/kvstore.v1.KVStore/PutBlocks",
            request_serializer=_join,
            response_deserializer=pb.PutBlocksResponse.FromString,
        )
        self._get_blocks = self._channel.unary_stream(
            "/kvstore.v1.KVStore/GetBlocks",
            request_serializer=pb.GetBlocksRequest.SerializeToString,
            response_deserializer=decode_get_message,
        )
        self._settle = CallSettle()
        self._lookup_streams = LookupStreams(
            self._channel, self.options.lookup_streams, self._settle
        )
        self._namespace_wire = namespace_to_wire(namespace)
        self._namespace_bytes = self._namespace_wire.SerializeToString()
        self._layout = namespace.layout
        self._target_host = _target_host(target)
        self._data_plane: DataPlanePool | None = None
        self._data_plane_asked_at: float | None = None
        self._data_plane_lock = asyncio.Lock()

    async def __aenter__(self) -> KVClient:
        return self

    @property
    def data_plane(self) -> str | None:
        """The server's data plane ("host:port") that puts and gets use, once the first
        transfer has found it; None while they go over gRPC."""
        pool = self._data_plane
        return None if pool is None else f"{pool.host}:{pool.port}"

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._data_plane is not None:
            self._data_plane.close()
        try:
            await self._lookup_streams.close()
        finally:
            try:
                if self._owns_channel:
                    await self._channel.close()
            finally:
                await self._settle.wait()

    @contextlib.contextmanager
    def _rpc(self) -> Iterator[None]:
        """Around every call: gRPC errors become client errors, and a call cancelled
        midway makes close() wait for gRPC to finish it (kvstore.client._settle)."""
        with self._settle.tracking(), translate_rpc_errors():
            yield

    async def _data_connection(self, seconds: float) -> DataConnection | None:
        """A data-plane connection for one transfer due within `seconds`, or None: use gRPC."""
        if not self.options.data_plane:
            return None
        loop = asyncio.get_running_loop()
        pool = await self._data_plane_pool(loop.time())
        if pool is None:
            return None
        now = loop.time()
        try:
            # A new connection gets the control deadline, not the whole transfer's:
            # the transfer still has its time for gRPC if this fails.
            return await pool.acquire(now + seconds, now + self.options.timeouts.control)
        except DataPlaneUnreachable as error:
            logger.warning("%s; using gRPC for %.0f s", error, _DATA_PLANE_RETRY_S)
            # Transfers already on the data plane finish there.
            pool.retire()
            if self._data_plane is pool:
                self._data_plane = None
                self._data_plane_asked_at = loop.time()  # the back-off starts now
            return None

    async def _data_plane_pool(self, now: float) -> DataPlanePool | None:
        """The server's data plane, asked for over gRPC once (again after a failure)."""
        if self._data_plane is not None:
            return self._data_plane
        async with self._data_plane_lock:
            asked_at = self._data_plane_asked_at
            if self._data_plane is not None or self._target_host is None:
                return self._data_plane
            if asked_at is not None and now - asked_at < _DATA_PLANE_RETRY_S:
                return None
            self._data_plane_asked_at = now
            try:
                with self._settle.tracking():
                    reply = await self._stub.GetDataPlane(
                        pb.DataPlaneRequest(), timeout=self.options.timeouts.control
                    )
            except grpc.aio.AioRpcError:
                return None  # an older server, or none at all: the gRPC call will say
            if reply.port and reply.version == DATAPLANE_VERSION:
                self._data_plane = DataPlanePool(
                    self._target_host, reply.port, self.options.max_message_bytes
                )
            return self._data_plane

    # -- keys and lookups -------------------------------------------------------------

    def keys(self, tokens: Sequence[int] | np.ndarray | torch.Tensor) -> list[bytes]:
        """Chained prefix-hash keys of every full block of `tokens`."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        try:
            return chain_keys(
                tokens,
                self._layout.block_tokens,
                extra=self.options.key_extra,
                algorithm=self.options.hash_algorithm,
            )
        except InvalidRequest as error:
            raise InvalidArgument(str(error)) from None

    async def lookup(self, tokens: Sequence[int] | np.ndarray | torch.Tensor) -> PrefixMatch:
        """How many leading full blocks of `tokens` the store holds, and where."""
        return await self.lookup_keys(self.keys(tokens))

    async def lookup_keys(self, keys: list[bytes]) -> PrefixMatch:
        request = pb.LookupPrefixRequest(namespace=self._namespace_wire, keys=keys)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.timeouts.lookup
        reply = await self._lookup_streams.lookup(request, deadline)
        if reply is None:
            with self._rpc():
                reply = await self._stub.LookupPrefix(
                    request, timeout=max(0.0, deadline - loop.time())
                )
        return PrefixMatch(
            keys=keys,
            num_matched=reply.num_matched,
            tiers=_expand_tier_runs(reply.tier_runs),
            block_tokens=self._layout.block_tokens,
        )

    # -- puts -------------------------------------------------------------------------

    async def put(
        self,
        tokens: Sequence[int] | np.ndarray | torch.Tensor,
        kv: torch.Tensor,
        *,
        form: KVForm = KVForm.SEQUENCE,
        skip_cached: bool = True,
    ) -> PutResult:
        """Store the KV of every full block of `tokens`.

        `kv` holds the whole sequence (`sequence` form, at least as many tokens as the
        full blocks) or its blocks (`blocks` form). With `skip_cached`, one lookup first
        finds the stored prefix and only the blocks after it are sent.
        """
        keys = self.keys(tokens)
        check_tensor(kv, self._layout, form, len(keys), at_least=True)
        first = (await self.lookup_keys(keys)).num_matched if skip_cached else 0
        return await self._put(keys, kv, form, first, b"")

    async def put_blocks(
        self,
        keys: list[bytes],
        kv: torch.Tensor,
        *,
        parent_key: bytes = b"",
        form: KVForm = KVForm.BLOCKS,
    ) -> PutResult:
        """Store blocks under caller-chosen keys; `keys[0]` chains from `parent_key`."""
        check_tensor(kv, self._layout, form, len(keys), at_least=True)
        return await self._put(keys, kv, form, 0, parent_key)

    async def _put(
        self, keys: list[bytes], kv: torch.Tensor, form: KVForm, first: int, parent_key: bytes
    ) -> PutResult:
        """Send blocks `keys[first:]`; block i is index i of `kv`."""
        if first >= len(keys):
            return PutResult(outcomes=(), num_skipped=first, bytes_sent=0)
        source = ByteMap(cpu_contiguous(kv), self._layout, form)
        layout = self._layout
        kind = self.options.checksum
        chunk_bytes = self.options.chunk_bytes

        async def requests() -> AsyncIterator[list[bytes | memoryview]]:
            header = encode_put_header(namespace=self._namespace_bytes, checksum_kind=kind.value)
            if 2 * layout.layer_bytes <= chunk_bytes:
                for message in run_messages(
                    header, keys, first, parent_key, source, layout, kind, chunk_bytes
                ):
                    yield message
                return
            batch = MessageBatch(chunk_bytes, header)
            for declared, index in enumerate(range(first, len(keys))):
                # Declared just before its bytes, so the server reserves room as it goes.
                batch.declare(keys[index], keys[index - 1] if index else parent_key)
                for layer in range(layout.num_layers):
                    runs = source.runs(index, layer, chunk_bytes)
                    for message in batch.add_layer(declared, layer, runs, kind):
                        yield message
            yield batch.flush()

        timeout = self.options.timeouts.transfer
        connection = await self._data_connection(timeout)
        if connection is not None:
            try:
                reply = await connection.put(requests())
            finally:
                connection.release()
        else:
            with self._rpc():
                reply = await self._put_blocks(requests(), timeout=timeout)
        return PutResult(
            outcomes=tuple(PutOutcome(value) for value in reply.outcomes),
            num_skipped=first,
            bytes_sent=(len(keys) - first) * layout.block_bytes,
        )

    def layer_put(self, keys: list[bytes], *, parent_key: bytes = b"") -> LayerPut:
        """A put that sends one layer of all `keys`' blocks at a time, as prefill computes them.

        async with client.layer_put(keys) as put:
            for layer in range(num_layers):
                ...compute layer...
                await put.send_layer(layer, kv_layer)  # [num_blocks, 2, T, H, D]
        put.result  # after the block
        """
        return LayerPut(self, keys, parent_key)

    # -- gets ---------------------------------------------------------------------------

    async def get_into(
        self, keys: list[bytes] | PrefixMatch, dest: torch.Tensor, *, form: KVForm = KVForm.SEQUENCE
    ) -> int:
        """Fetch the stored prefix of `keys` into `dest`; returns how many blocks arrived.

        The server serves the longest prefix still stored, which may be shorter than
        `keys` if blocks were evicted since a lookup: the caller recomputes the rest.
        """
        num_blocks = 0
        async for arrival in self._stream(keys, dest, form):
            num_blocks = arrival.num_blocks
        return num_blocks

    def iter_layers(
        self,
        keys: list[bytes] | PrefixMatch,
        dest: torch.Tensor | None = None,
        *,
        form: KVForm = KVForm.SEQUENCE,
    ) -> AsyncIterator[LayerArrival]:
        """Yield each layer of the stored prefix of `keys` as soon as it has fully arrived.

        Without `dest`, each arrival carries a fresh `[num_blocks, 2, T, H, D]` tensor.
        A consumer that may stop early should close the iterator (`contextlib.aclosing`)
        so the server stops reading at once, not when the iterator is collected.
        """
        return self._stream(keys, dest, form)

    async def _stream(
        self, keys: list[bytes] | PrefixMatch, dest: torch.Tensor | None, form: KVForm
    ) -> AsyncIterator[LayerArrival]:
        if isinstance(keys, PrefixMatch):
            keys = keys.matched_keys
        if not keys:
            return
        for index, key in enumerate(keys):
            _validate_key(key, index)
        if dest is not None:
            check_tensor(dest, self._layout, form, len(keys), at_least=True)
        request = pb.GetBlocksRequest(
            namespace=self._namespace_wire, keys=keys, max_chunk_bytes=self.options.chunk_bytes
        )
        timeout = self.options.timeouts.transfer
        connection = await self._data_connection(timeout)
        if connection is not None:
            replies = connection.get(request)
            try:
                async with contextlib.aclosing(self._receive(replies, dest, form)) as arrivals:
                    async for arrival in arrivals:
                        yield arrival
            finally:
                # An early stop closes the connection: the server then frees the blocks.
                await replies.aclose()
                connection.release()
            return
        call = self._get_blocks(request, timeout=timeout)
        try:
            with self._rpc():
                async with contextlib.aclosing(self._receive(call, dest, form)) as arrivals:
                    async for arrival in arrivals:
                        yield arrival
        finally:
            # A consumer that stops early (once this generator is closed), or a bad
            # stream, ends the call: the server then frees the blocks it was reading.
            if call.cancel():
                self._settle.note_cancel()

    async def _receive(
        self, replies: AsyncIterator[GetMessage], dest: torch.Tensor | None, form: KVForm
    ) -> AsyncGenerator[LayerArrival, None]:
        """The layers of a get's replies, written into `dest` (or fresh tensors), verified."""
        receiver: LayerReceiver | None = None
        async for reply in replies:
            if receiver is None:
                receiver = LayerReceiver(
                    self._layout, reply, dest, form, verify=self.options.verify_checksums
                )
            if receiver.num_blocks == 0:
                continue  # nothing stored; read on to the stream's clean end
            for arrival in receiver.accept(reply):
                yield arrival
        if receiver is not None and receiver.num_blocks:
            for arrival in receiver.finish():
                yield arrival

    # -- control ---------------------------------------------------------------------

    async def pin(self, keys: list[bytes], ttl_s: float) -> int:
        """Lease the stored blocks among `keys` for `ttl_s`; returns how many were pinned."""
        ttl_ms = max(1, round(ttl_s * 1000))
        request = pb.PinRequest(namespace=self._namespace_wire, keys=keys, ttl_ms=ttl_ms)
        with self._rpc():
            reply = await self._stub.Pin(request, timeout=self.options.timeouts.control)
        return int(reply.num_pinned)

    async def unpin(self, keys: list[bytes]) -> int:
        request = pb.UnpinRequest(namespace=self._namespace_wire, keys=keys)
        with self._rpc():
            reply = await self._stub.Unpin(request, timeout=self.options.timeouts.control)
        return int(reply.num_unpinned)

    async def delete(self, keys: list[bytes]) -> tuple[int, int]:
        """Delete blocks and their descendants; returns (deleted, left because pinned)."""
        request = pb.DeleteRequest(namespace=self._namespace_wire, keys=keys)
        with self._rpc():
            reply = await self._stub.Delete(request, timeout=self.options.timeouts.control)
        return int(reply.num_deleted), int(reply.num_busy)

    async def stats(self) -> pb.StatsResponse:
        with self._rpc():
            reply: pb.StatsResponse = await self._stub.Stats(
                pb.StatsRequest(), timeout=self.options.timeouts.control
            )
        return reply


class LayerPut:
    """A put stream fed one layer of many blocks at a time (see KVClient.layer_put)."""

    def __init__(self, client: KVClient, keys: list[bytes], parent_key: bytes) -> None:
        if not keys:
            raise InvalidArgument("layer_put needs at least one key")
        self._client = client
        self._keys = keys
        self._parent_key = parent_key
        self._layout = client.namespace.layout
        self._next_layer = 0
        self._call: grpc.aio.StreamUnaryCall | None = None
        self._data: DataConnection | None = None  # the data plane carries it instead
        self.result: PutResult | None = None

    async def __aenter__(self) -> LayerPut:
        client = self._client
        parents = [self._parent_key, *self._keys[:-1]]
        header = encode_put_header(
            namespace=client._namespace_bytes,
            checksum_kind=client.options.checksum.value,
            blocks=list(zip(self._keys, parents, strict=True)),
        )
        timeout = client.options.timeouts.transfer
        self._data = await client._data_connection(timeout)
        if self._data is not None:
            try:
                await self._data.send(FrameKind.PUT, [header])
            except BaseException:
                self._data.release()
                raise
            return self
        self._call = client._put_blocks(timeout=timeout)
        # In flight from here to __aexit__, also between layers: close() waits for it.
        client._settle.opened()
        try:
            with client._rpc():
                await self._call.write([header])
        except BaseException:
            self._cancel()
            client._settle.closed()
            raise
        return self

    async def _write(self, parts: list[bytes | memoryview]) -> None:
        if self._data is not None:
            await self._data.send(FrameKind.PUT, parts)
            return
        assert self._call is not None
        with self._client._rpc():
            await self._call.write(parts)

    async def send_layer(self, layer: int, kv_layer: torch.Tensor) -> None:
        """Send layer `layer` (`[num_blocks, 2, T, H, D]`) of every block; layers go in order."""
        if layer != self._next_layer:
            raise InvalidArgument(f"send layer {self._next_layer} next, not layer {layer}")
        check_tensor(kv_layer, self._layout, KVForm.LAYER, len(self._keys))
        options = self._client.options
        source = ByteMap(cpu_contiguous(kv_layer), self._layout, KVForm.LAYER)
        layer_bytes = self._layout.layer_bytes
        if 2 * layer_bytes <= options.chunk_bytes:
            per_run = options.chunk_bytes // layer_bytes
            for start in range(0, len(self._keys), per_run):
                end = min(len(self._keys), start + per_run)
                # The tensor holds this layer of every block back to back: one view.
                data = source.view[start * layer_bytes : end * layer_bytes]
                checksums = checksums_of_slices(options.checksum, data, layer_bytes)
                await self._write(run_parts(PUT_RUNS, layer, start, checksums, [data]))
            self._next_layer += 1
            return
        batch = MessageBatch(options.chunk_bytes, b"")
        for block in range(len(self._keys)):
            runs = source.runs(block, 0, options.chunk_bytes)
            for message in batch.add_layer(block, layer, runs, options.checksum):
                await self._write(message)
        if batch.has_content:
            await self._write(batch.flush())
        self._next_layer += 1

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            reply = await self._finish(exc)
        finally:
            if self._data is not None:
                self._data.release()
            else:
                self._client._settle.closed()
        if reply is None:
            return
        self.result = PutResult(
            outcomes=tuple(PutOutcome(value) for value in reply.outcomes),
            num_skipped=0,
            bytes_sent=len(self._keys) * self._layout.block_bytes,
        )

    async def _finish(self, exc: BaseException | None) -> pb.PutBlocksResponse | None:
        """The server's reply, or None when the put was abandoned because of `exc`."""
        if exc is not None:
            # The server frees whatever this put had reserved.
            self._cancel()
            return None
        if self._next_layer != self._layout.num_layers:
            self._cancel()
            raise InvalidArgument(
                f"layer_put ended after {self._next_layer} of {self._layout.num_layers} layers"
            )
        if self._data is not None:
            return await self._data.finish_put()
        assert self._call is not None
        with self._client._rpc():
            await self._call.done_writing()
            reply: pb.PutBlocksResponse = await self._call
        return reply

    def _cancel(self) -> None:
        if self._data is not None:
            self._data.close()  # the server sees the connection end and frees the put
            return
        assert self._call is not None
        if self._call.cancel():
            self._client._settle.note_cancel()


def _join(parts: list[bytes | memoryview]) -> bytes:
    return b"".join(parts)


def _validate_key(key: bytes, index: int) -> None:
    try:
        validate_key(key, f"keys[{index}]")
    except InvalidRequest as error:
        raise InvalidArgument(str(error)) from None


def check_tensor(
    tensor: torch.Tensor, layout: KVLayout, form: KVForm, num_blocks: int, *, at_least: bool = False
) -> None:
    """kvstore.codec.check_tensor, raising the client's InvalidArgument like every other check."""
    try:
        _check_tensor_core(tensor, layout, form, num_blocks, at_least=at_least)
    except InvalidRequest as error:
        raise InvalidArgument(str(error)) from None


def _expand_tier_runs(runs: Iterable[pb.TierRun]) -> tuple[TierKind, ...]:
    return tuple(
        chain.from_iterable(repeat(_TIER_BY_NUMBER[run.tier], run.num_blocks) for run in runs)
    )


def _target_host(target: str) -> str | None:
    """The host in a gRPC target ("host:port", "[::1]:port", "dns:///host:port"), where
    the data plane listens too; None for targets it cannot be read from (unix sockets,
    lists of addresses)."""
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if "," in target or target.startswith("unix") or "/" in target:
        return None
    host, _, _ = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or None
