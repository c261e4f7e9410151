"""The asyncio client: lookups, streaming puts and gets of torch KV tensors.

The policy lives here (which blocks to send, where received bytes go, what to verify);
the transport below it (kvstore.client._transport) decides how the bytes travel.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Sequence
from functools import partial
from types import TracebackType

import grpc
import numpy as np
import torch

from kvstore.allocator import tune_allocator_once
from kvstore.client._auto_transport import AutoTransport
from kvstore.client._credentials import call_metadata, resolve_token
from kvstore.client._dataplane_transport import find_data_plane, target_host
from kvstore.client._errors import InvalidArgument, KVStoreClientError
from kvstore.client._grpc_transport import GrpcTransport, tracked_call
from kvstore.client._options import ClientOptions
from kvstore.client._receive import BlockWriter, LayerReceiver, WireStats
from kvstore.client._replies import prefix_match, put_result, store_stats
from kvstore.client._results import LayerArrival, PrefixMatch, PutResult, StoreStats
from kvstore.client._send import block_headers, layer_messages, put_messages
from kvstore.client._settle import CallSettle
from kvstore.client._tls import load_client_tls, tls_from_environment
from kvstore.client._transport import GetStream, Parts, PutStream, Transport
from kvstore.client._watch import BlockEvents, node_events
from kvstore.client._wire_compression import WireCompressionPolicy, open_get_stream
from kvstore.client.cost import BandwidthMeter
from kvstore.cluster.members import is_cluster_target
from kvstore.codec import ByteMap, KVForm, cpu_contiguous
from kvstore.codec import check_tensor as _check_tensor_core
from kvstore.enums import TierKind
from kvstore.errors import InvalidRequest
from kvstore.keys import chain_keys, validate_key
from kvstore.layout import KVLayout, Namespace
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire.chunks import GetMessage, encode_put_header
from kvstore.wire.compression import LZ4_SHUFFLE
from kvstore.wire.namespace import namespace_to_wire

_TIER_VALUES = frozenset(kind.value for kind in TierKind)


class KVClient:
    """Async client for one namespace of a kvstore server, or of a cluster of them.

    Use as `async with KVClient("127.0.0.1:50051", namespace) as client: ...`. A target
    `etcd://HOST:PORT/PREFIX` (`etcds://` for etcd over TLS; ClientOptions.etcd) or
    `cluster://H1:P1[=SIZE],H2:P2[=SIZE]` names a cluster: the client is then a
    kvstore.client._cluster.ClusterClient, with the same calls. KV tensors
    come in the forms of `kvstore.codec.KVForm`; the default is `sequence`
    (`[num_layers, 2, num_tokens, num_kv_heads, head_dim]`).

    Puts, gets and lookups go through `transport` (kvstore.client._transport); by
    default gRPC on `channel`, with the server's data plane when `options.data_plane`
    allows. Pins, deletes and stats always go over gRPC.
    """

    def __new__(
        cls,
        target: str,
        namespace: Namespace,
        *,
        options: ClientOptions | None = None,
        channel: grpc.aio.Channel | None = None,
        transport: Transport | None = None,
    ) -> KVClient:
        # A cluster target (etcd:// or cluster://) makes the cluster client, a KVClient
        # with the same calls (kvstore.client._cluster).
        if cls is KVClient and is_cluster_target(target):
            from kvstore.client._cluster import ClusterClient  # it imports this module

            return super().__new__(ClusterClient)
        return super().__new__(cls)

    def __init__(
        self,
        target: str,
        namespace: Namespace,
        *,
        options: ClientOptions | None = None,
        channel: grpc.aio.Channel | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.namespace = namespace
        self.target = target
        self.options = options or ClientOptions()
        if self.options.tune_allocator:
            tune_allocator_once()
        limit = self.options.max_message_bytes
        self._owns_channel = channel is None
        tls_options = self.options.tls if self.options.tls is not None else tls_from_environment()
        self._tls = load_client_tls(tls_options) if tls_options is not None else None
        channel_options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
        if channel is not None:
            self._channel = channel
        elif self._tls is None:
            self._channel = grpc.aio.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.aio.secure_channel(
                target,
                self._tls.grpc_credentials,
                options=channel_options + self._tls.channel_options(),
            )
        self._stub = pb_grpc.KVStoreStub(self._channel)
        self._token = resolve_token(self.options.token)
        self._metadata = call_metadata(self._token)
        self._settle = CallSettle()
        self._namespace_wire = namespace_to_wire(namespace)
        self.namespace_bytes = self._namespace_wire.SerializeToString()
        self._layout = namespace.layout
        self.transport = transport or self._default_transport(target)
        self._meter = BandwidthMeter()
        self._meter_node = ""
        self._wire = WireCompressionPolicy(
            self.options.wire_compression, self._layout.dtype.itemsize
        )
        self._wire_stats: WireStats | None = None

    @property
    def bandwidth(self) -> BandwidthMeter:
        """What gets delivered, per node and tier: every complete get is one sample."""
        return self._meter

    @property
    def wire_compression(self) -> WireCompressionPolicy:
        """Whether gets ask for lz4 on the wire, and the rates auto decides from."""
        return self._wire

    @property
    def wire_stats(self) -> WireStats | None:
        """The bytes on the wire of the last get that completed (None before one)."""
        return self._wire_stats

    def _get_request(self, keys: list[bytes]) -> pb.GetBlocksRequest:
        return pb.GetBlocksRequest(
            namespace=self._namespace_wire,
            keys=keys,
            max_chunk_bytes=self.options.chunk_bytes,
            wire_compression=LZ4_SHUFFLE if self._wire.ask() else 0,  # type: ignore[arg-type]
        )

    async def _open_get(self, request: pb.GetBlocksRequest) -> GetStream:
        return await open_get_stream(
            self.transport, request, self.options.timeouts.transfer, self._wire
        )

    def _report_bandwidth_to(self, meter: BandwidthMeter, node: str) -> None:
        """Feed `meter` instead of this client's own, as `node` (a cluster member)."""
        self._meter = meter
        self._meter_node = node

    def _default_transport(self, target: str) -> Transport:
        grpc_transport = GrpcTransport(
            self._channel,
            self._settle,
            num_lookup_streams=self.options.lookup_streams,
            metadata=self._metadata,
        )
        host = target_host(target)
        if not self.options.data_plane or host is None:
            return grpc_transport
        find = partial(
            find_data_plane,
            self._stub,
            host,
            max_frame_bytes=self.options.max_message_bytes,
            timeout_s=self.options.timeouts.control,
            settle=self._settle,
            token=self._token,
            tls=self._tls,
            shared_memory=self.options.shared_memory,
        )
        return AutoTransport(
            grpc_transport, find, require_data_plane=self.options.shared_memory is True
        )

    async def __aenter__(self) -> KVClient:
        return self

    @property
    def data_plane(self) -> str | None:
        """The server's data plane ("host:port") that puts and gets use, once the first
        transfer has found it; None while they go over gRPC."""
        return self.transport.data_plane

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            await self.transport.close()
        finally:
            try:
                if self._owns_channel:
                    await self._channel.close()
            finally:
                await self._settle.wait()

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
        deadline = asyncio.get_running_loop().time() + self.options.timeouts.lookup
        reply = await self.transport.lookup(request, deadline)
        return prefix_match(reply, keys, self._layout.block_tokens)

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
        parent_remote: bool = False,
        form: KVForm = KVForm.BLOCKS,
    ) -> PutResult:
        """Store blocks under caller-chosen keys; `keys[0]` chains from `parent_key`.

        With `parent_remote`, the parent may be stored on another server (a cluster's
        previous run): the server links `keys[0]` to it if it holds it, else stores
        `keys[0]` as the root of its own chain instead of answering PARENT_MISSING.
        """
        check_tensor(kv, self._layout, form, len(keys), at_least=True)
        return await self._put(keys, kv, form, 0, parent_key, parent_remote)

    async def _put(
        self,
        keys: list[bytes],
        kv: torch.Tensor,
        form: KVForm,
        first: int,
        parent_key: bytes,
        parent_remote: bool = False,
    ) -> PutResult:
        """Send blocks `keys[first:]`; block i is index i of `kv`."""
        if first >= len(keys):
            return PutResult(outcomes=(), num_skipped=first, bytes_sent=0)
        source = ByteMap(cpu_contiguous(kv), self._layout, form)
        options = self.options
        header = encode_put_header(
            namespace=self.namespace_bytes, checksum_kind=options.checksum.value
        )

        async def requests() -> AsyncIterator[Parts]:
            for message in put_messages(
                header,
                keys,
                first,
                parent_key,
                source,
                self._layout,
                options.checksum,
                options.chunk_bytes,
                parent_remote=parent_remote,
            ):
                yield message

        reply = await self.transport.put(requests(), options.timeouts.transfer)
        sent = len(keys) - first
        return put_result(reply, first, sent * self._layout.block_bytes, sent)

    def layer_put(
        self, keys: list[bytes], *, parent_key: bytes = b"", parent_remote: bool = False
    ) -> LayerPut:
        """A put that sends one layer of all `keys`' blocks at a time, as prefill computes them.

        async with client.layer_put(keys) as put:
            for layer in range(num_layers):
                ...compute layer...
                await put.send_layer(layer, kv_layer)  # [num_blocks, 2, T, H, D]
        put.result  # after the block

        `parent_key` and `parent_remote` are as in `put_blocks`.
        """
        return LayerPut(self, keys, parent_key, parent_remote)

    # -- gets ---------------------------------------------------------------------------

    async def get_into(
        self, keys: list[bytes] | PrefixMatch, dest: torch.Tensor, *, form: KVForm = KVForm.SEQUENCE
    ) -> int:
        """Fetch the stored prefix of `keys` into `dest`; returns how many blocks arrived.

        The server serves the longest prefix still stored, which may be shorter than
        `keys` if blocks were evicted since a lookup: the caller recomputes the rest.
        Rows of `dest` past the blocks that arrived may have been written (layer 0 of
        an SSD block found unreadable mid-get): they hold no block the caller may use.
        A get that raises (ChecksumError, a lost connection) may have written any of
        `dest` with bytes not yet verified: none of it may be used, as with
        `iter_layers`, where only the layers already yielded are verified.
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
    ) -> AsyncGenerator[LayerArrival, None]:
        """Yield each layer of the stored prefix of `keys` as soon as it has fully arrived.

        Without `dest`, each arrival carries a fresh `[num_blocks, 2, T, H, D]` tensor.
        A consumer that may stop early should close the iterator (`contextlib.aclosing`)
        so the server stops reading at once, not when the iterator is collected.
        """
        return self._stream(keys, dest, form)

    async def _stream(
        self, keys: list[bytes] | PrefixMatch, dest: torch.Tensor | None, form: KVForm
    ) -> AsyncGenerator[LayerArrival, None]:
        if isinstance(keys, PrefixMatch):
            keys = keys.matched_keys
        if not keys:
            return
        for index, key in enumerate(keys):
            _validate_key(key, index)
        if dest is not None:
            check_tensor(dest, self._layout, form, len(keys), at_least=True)
        request = self._get_request(keys)
        started = time.perf_counter()
        replies = await self._open_get(request)
        # A consumer that stops early (once this generator is closed), or a bad stream,
        # closes the replies: that ends the transfer, and the server frees the blocks.
        async with (
            contextlib.aclosing(replies),
            contextlib.aclosing(
                self._receive(
                    replies,
                    dest,
                    form,
                    started,
                    asked=request.wire_compression != 0,
                    num_asked=len(request.keys),
                )
            ) as arrivals,
        ):
            async for arrival in arrivals:
                yield arrival

    async def _stream_to_writer(
        self, keys: list[bytes], writer: BlockWriter
    ) -> AsyncGenerator[LayerArrival, None]:
        """Get the stored prefix of `keys`, block i's layers written to `writer` as block i;
        each arrival says a layer is complete (its `kv` is empty). For the cluster client."""
        request = self._get_request(keys)
        started = time.perf_counter()
        replies = await self._open_get(request)
        receive = self._receive(
            replies,
            None,
            KVForm.LAYER,
            started,
            writer,
            asked=request.wire_compression != 0,
            num_asked=len(request.keys),
        )
        async with (
            contextlib.aclosing(replies),
            contextlib.aclosing(receive) as arrivals,
        ):
            async for arrival in arrivals:
                yield arrival

    async def _receive(
        self,
        replies: AsyncIterable[GetMessage],
        dest: torch.Tensor | None,
        form: KVForm,
        started: float,
        writer: BlockWriter | None = None,
        *,
        asked: bool = False,
        num_asked: int | None = None,
    ) -> AsyncGenerator[LayerArrival, None]:
        """The layers of a get's replies, written into `dest` (or fresh tensors, or
        `writer`), verified. A get that ends complete is a sample of `bandwidth`, timed
        from `started` (before the get was opened), and of the wire compression's rates
        (`asked`: it asked for compression)."""
        receiver: LayerReceiver | None = None
        tiers: list[int] = []
        async for reply in replies:
            if receiver is None:
                tiers = list(reply.tiers)
                receiver = LayerReceiver(
                    self._layout,
                    reply,
                    dest,
                    form,
                    verify=self.options.verify_checksums,
                    writer=writer,
                    stats=WireStats(want_sample=self._wire.wants_sample()),
                    max_blocks=num_asked,
                )
            if receiver.num_blocks == 0:
                continue  # nothing stored; read on to the stream's clean end
            for arrival in receiver.accept(reply):
                yield arrival
        if receiver is not None and receiver.num_blocks:
            arrivals = receiver.finish()
            seconds = time.perf_counter() - started
            self._observe_get(receiver.num_blocks, seconds, tiers)
            self._wire_stats = receiver.stats
            self._wire.observe(receiver.stats, seconds, asked)
            for arrival in arrivals:
                yield arrival

    def _observe_get(self, num_blocks: int, seconds: float, tiers: list[int]) -> None:
        # A get that mixes tiers is as slow as its slowest one: the sample is that tier's
        # (it understates the faster tier's rate, which errs toward recomputing). Tier
        # numbers on the wire are TierKind values, fastest first.
        slowest = max(tiers, default=0)
        tier = TierKind(slowest).name.lower() if slowest in _TIER_VALUES else ""
        self._meter.observe(
            num_blocks * self._layout.block_bytes, seconds, node=self._meter_node, tier=tier
        )

    # -- control ---------------------------------------------------------------------

    async def pin(self, keys: list[bytes], ttl_s: float) -> int:
        """Lease the stored blocks among `keys` for `ttl_s`; returns how many were pinned."""
        ttl_ms = max(1, round(ttl_s * 1000))
        request = pb.PinRequest(namespace=self._namespace_wire, keys=keys, ttl_ms=ttl_ms)
        with tracked_call(self._settle):
            reply = await self._stub.Pin(
                request, timeout=self.options.timeouts.control, metadata=self._metadata
            )
        return int(reply.num_pinned)

    async def unpin(self, keys: list[bytes]) -> int:
        request = pb.UnpinRequest(namespace=self._namespace_wire, keys=keys)
        with tracked_call(self._settle):
            reply = await self._stub.Unpin(
                request, timeout=self.options.timeouts.control, metadata=self._metadata
            )
        return int(reply.num_unpinned)

    async def delete(self, keys: list[bytes]) -> tuple[int, int]:
        """Delete blocks and their descendants; returns (deleted, left because pinned)."""
        request = pb.DeleteRequest(namespace=self._namespace_wire, keys=keys)
        with tracked_call(self._settle):
            reply = await self._stub.Delete(
                request, timeout=self.options.timeouts.control, metadata=self._metadata
            )
        return int(reply.num_deleted), int(reply.num_busy)

    def watch_blocks(self, *, max_events_per_message: int = 0) -> AsyncGenerator[BlockEvents, None]:
        """The namespace's block events, batch by batch, until closed: a snapshot of what
        is stored (SNAPSHOT events, then SNAPSHOT_END), then STORED, REMOVED and
        TIER_CHANGED as they happen. A watcher that falls behind the server's queue gets
        a GAP and a fresh snapshot (kvstore.client.BlockView applies it all).

        Sequence numbers are checked: a jump the server did not announce raises
        ProtocolError. `max_events_per_message` 0 takes the server's limit. Close the
        iterator (`contextlib.aclosing`) to end the watch at once.
        """
        request = pb.WatchBlocksRequest(
            namespace=self._namespace_wire, max_events_per_message=max_events_per_message
        )
        return node_events(
            self._stub, request, self.target, metadata=self._metadata, settle=self._settle
        )

    async def stats(self) -> StoreStats:
        """The server's tiers and counters."""
        with tracked_call(self._settle):
            reply: pb.StatsResponse = await self._stub.Stats(
                pb.StatsRequest(), timeout=self.options.timeouts.control, metadata=self._metadata
            )
        return store_stats(reply)


class LayerPut:
    """A put stream fed one layer of many blocks at a time (see KVClient.layer_put)."""

    def __init__(
        self, client: KVClient, keys: list[bytes], parent_key: bytes, parent_remote: bool = False
    ) -> None:
        if not keys:
            raise InvalidArgument("layer_put needs at least one key")
        self._transport = client.transport
        self._options = client.options
        self._namespace_bytes = client.namespace_bytes
        self._layout = client.namespace.layout
        self._keys = keys
        self._parent_key = parent_key
        self._parent_remote = parent_remote
        self._next_layer = 0
        self._stream: PutStream | None = None
        # The error a send raised: the stream is gone, so every later call raises it.
        self._failure: KVStoreClientError | None = None
        self.result: PutResult | None = None

    async def __aenter__(self) -> LayerPut:
        header = encode_put_header(
            namespace=self._namespace_bytes,
            checksum_kind=self._options.checksum.value,
            blocks=block_headers(
                self._keys, 0, len(self._keys), self._parent_key, self._parent_remote
            ),
        )
        stream = await self._transport.open_put(self._options.timeouts.transfer)
        try:
            await stream.send([header])
        except BaseException:
            stream.cancel()
            raise
        self._stream = stream
        return self

    async def send_layer(self, layer: int, kv_layer: torch.Tensor) -> None:
        """Send layer `layer` (`[num_blocks, 2, T, H, D]`) of every block; layers go in order.

        Once a send has failed (the server refused the put, the connection was lost),
        the put is over: this and the put's end raise that failure again."""
        self._raise_if_failed()
        if layer != self._next_layer:
            raise InvalidArgument(f"send layer {self._next_layer} next, not layer {layer}")
        check_tensor(kv_layer, self._layout, KVForm.LAYER, len(self._keys), one_layer=True)
        assert self._stream is not None, "send_layer runs inside `async with`"
        source = ByteMap(cpu_contiguous(kv_layer), self._layout, KVForm.LAYER)
        options = self._options
        try:
            for message in layer_messages(
                layer, source, len(self._keys), self._layout, options.checksum, options.chunk_bytes
            ):
                await self._stream.send(message)
        except KVStoreClientError as error:
            self._failure = error
            self._stream.cancel()
            raise
        self._next_layer += 1

    def _raise_if_failed(self) -> None:
        failure = self._failure
        if failure is not None:
            raise type(failure)(
                f"this layer put already failed at layer {self._next_layer}, "
                f"and sends nothing more: {failure.details}"
            ) from failure

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        stream = self._stream
        assert stream is not None
        if exc is not None:
            if self._failure is None:  # a failed send cancelled the stream already
                stream.cancel()  # the server frees whatever this put had reserved
            return
        self._raise_if_failed()  # a caller that went on after a failed send
        if self._next_layer != self._layout.num_layers:
            stream.cancel()
            raise InvalidArgument(
                f"layer_put ended after {self._next_layer} of {self._layout.num_layers} layers"
            )
        reply = await stream.finish()
        self.result = put_result(
            reply, 0, len(self._keys) * self._layout.block_bytes, len(self._keys)
        )


def _validate_key(key: bytes, index: int) -> None:
    try:
        validate_key(key, f"keys[{index}]")
    except InvalidRequest as error:
        raise InvalidArgument(str(error)) from None


def check_tensor(
    tensor: torch.Tensor,
    layout: KVLayout,
    form: KVForm,
    num_blocks: int,
    *,
    at_least: bool = False,
    one_layer: bool = False,
) -> None:
    """kvstore.codec.check_tensor, raising the client's InvalidArgument like every other check.

    The `layer` form holds one layer: only a call that moves one layer (`one_layer`) takes
    it; a whole-block put or get would read or write every layer through it."""
    if form is KVForm.LAYER and not one_layer:
        raise InvalidArgument(
            "the layer form holds one layer of each block; whole-block puts and gets take "
            "the blocks or sequence form (layer_put sends one layer at a time)"
        )
    try:
        _check_tensor_core(tensor, layout, form, num_blocks, at_least=at_least)
    except InvalidRequest as error:
        raise InvalidArgument(str(error)) from None
