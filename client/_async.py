"""The asyncio client: lookups, streaming puts and gets of torch KV tensors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType

import grpc
import numpy as np
import torch

from kvstore.checksum import (
    ChecksumKind,
    Hasher,
    checksum,
    checksum_kind_from_wire,
    new_hasher,
)
from kvstore.chunkwire import (
    GetMessage,
    WireChunk,
    WireRun,
    chunk_parts,
    decode_get_message,
    encode_put_header,
    run_parts,
)
from kvstore.client._errors import ChecksumError, InvalidArgument, translate_rpc_errors
from kvstore.client._options import ClientOptions
from kvstore.client._results import LayerArrival, PrefixMatch, PutResult
from kvstore.client._wire import namespace_to_wire
from kvstore.codec import ByteMap, KVForm, cpu_contiguous
from kvstore.codec import check_tensor as _check_tensor_core
from kvstore.errors import InvalidRequest
from kvstore.keys import chain_keys, validate_key
from kvstore.layout import KVLayout, Namespace
from kvstore.put import PutOutcome
from kvstore.tiers.base import TierKind
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

_TIER_BY_NUMBER = {kind.value: kind for kind in TierKind}


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
        # The block-carrying RPCs bypass the generated classes: see kvstore.chunkwire.
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
        self._namespace_wire = namespace_to_wire(namespace)
        self._namespace_bytes = self._namespace_wire.SerializeToString()
        self._layout = namespace.layout

    async def __aenter__(self) -> KVClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

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
        with translate_rpc_errors():
            reply = await self._stub.LookupPrefix(request, timeout=self.options.timeouts.lookup)
        return PrefixMatch(
            keys=keys,
            num_matched=reply.num_matched,
            tiers=tuple(map(_TIER_BY_NUMBER.__getitem__, reply.tiers)),
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
                for message in _run_messages(
                    header, keys, first, parent_key, source, layout, kind, chunk_bytes
                ):
                    yield message
                return
            batch = _MessageBatch(chunk_bytes, header)
            for declared, index in enumerate(range(first, len(keys))):
                # Declared just before its bytes, so the server reserves room as it goes.
                batch.declare(keys[index], keys[index - 1] if index else parent_key)
                for layer in range(layout.num_layers):
                    runs = source.runs(index, layer, chunk_bytes)
                    for message in batch.add_layer(declared, layer, runs, kind):
                        yield message
            yield batch.flush()

        with translate_rpc_errors():
            reply = await self._put_blocks(requests(), timeout=self.options.timeouts.transfer)
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
        with translate_rpc_errors():
            call = self._get_blocks(request, timeout=self.options.timeouts.transfer)
            receiver: _LayerReceiver | None = None
            async for reply in call:
                if receiver is None:
                    receiver = _LayerReceiver(self, reply, dest, form)
                    if receiver.num_blocks == 0:
                        return
                for arrival in receiver.accept(reply):
                    yield arrival
            if receiver is not None:
                for arrival in receiver.finish():
                    yield arrival

    # -- control ---------------------------------------------------------------------

    async def pin(self, keys: list[bytes], ttl_s: float) -> int:
        """Lease the stored blocks among `keys` for `ttl_s`; returns how many were pinned."""
        ttl_ms = max(1, round(ttl_s * 1000))
        request = pb.PinRequest(namespace=self._namespace_wire, keys=keys, ttl_ms=ttl_ms)
        with translate_rpc_errors():
            reply = await self._stub.Pin(request, timeout=self.options.timeouts.control)
        return int(reply.num_pinned)

    async def unpin(self, keys: list[bytes]) -> int:
        request = pb.UnpinRequest(namespace=self._namespace_wire, keys=keys)
        with translate_rpc_errors():
            reply = await self._stub.Unpin(request, timeout=self.options.timeouts.control)
        return int(reply.num_unpinned)

    async def delete(self, keys: list[bytes]) -> tuple[int, int]:
        """Delete blocks and their descendants; returns (deleted, left because pinned)."""
        request = pb.DeleteRequest(namespace=self._namespace_wire, keys=keys)
        with translate_rpc_errors():
            reply = await self._stub.Delete(request, timeout=self.options.timeouts.control)
        return int(reply.num_deleted), int(reply.num_busy)

    async def stats(self) -> pb.StatsResponse:
        with translate_rpc_errors():
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
        self.result: PutResult | None = None

    async def __aenter__(self) -> LayerPut:
        client = self._client
        self._call = client._put_blocks(timeout=client.options.timeouts.transfer)
        parents = [self._parent_key, *self._keys[:-1]]
        header = encode_put_header(
            namespace=client._namespace_bytes,
            checksum_kind=client.options.checksum.value,
            blocks=list(zip(self._keys, parents, strict=True)),
        )
        with translate_rpc_errors():
            await self._call.write([header])
        return self

    async def send_layer(self, layer: int, kv_layer: torch.Tensor) -> None:
        """Send layer `layer` (`[num_blocks, 2, T, H, D]`) of every block; layers go in order."""
        if layer != self._next_layer:
            raise InvalidArgument(f"send layer {self._next_layer} next, not layer {layer}")
        check_tensor(kv_layer, self._layout, KVForm.LAYER, len(self._keys))
        assert self._call is not None
        options = self._client.options
        source = ByteMap(cpu_contiguous(kv_layer), self._layout, KVForm.LAYER)
        layer_bytes = self._layout.layer_bytes
        with translate_rpc_errors():
            if 2 * layer_bytes <= options.chunk_bytes:
                per_run = options.chunk_bytes // layer_bytes
                for start in range(0, len(self._keys), per_run):
                    end = min(len(self._keys), start + per_run)
                    # The tensor holds this layer of every block back to back: one view.
                    data = source.view[start * layer_bytes : end * layer_bytes]
                    checksums = [
                        checksum(options.checksum, data[i * layer_bytes : (i + 1) * layer_bytes])
                        for i in range(end - start)
                    ]
                    await self._call.write(run_parts(5, layer, start, checksums, [data]))
                self._next_layer += 1
                return
        batch = _MessageBatch(options.chunk_bytes, b"")
        with translate_rpc_errors():
            for block in range(len(self._keys)):
                runs = source.runs(block, 0, options.chunk_bytes)
                for message in batch.add_layer(block, layer, runs, options.checksum):
                    await self._call.write(message)
            if batch.has_content:
                await self._call.write(batch.flush())
        self._next_layer += 1

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._call is not None
        if exc is not None:
            # The server frees whatever this put had reserved.
            self._call.cancel()
            return
        if self._next_layer != self._layout.num_layers:
            self._call.cancel()
            raise InvalidArgument(
                f"layer_put ended after {self._next_layer} of {self._layout.num_layers} layers"
            )
        with translate_rpc_errors():
            await self._call.done_writing()
            reply = await self._call
        self.result = PutResult(
            outcomes=tuple(PutOutcome(value) for value in reply.outcomes),
            num_skipped=0,
            bytes_sent=len(self._keys) * self._layout.block_bytes,
        )


def _run_messages(
    header: bytes,
    keys: list[bytes],
    first: int,
    parent_key: bytes,
    source: ByteMap,
    layout: KVLayout,
    kind: ChecksumKind,
    chunk_bytes: int,
) -> list[list[bytes | memoryview]]:
    """Put messages for small layers: groups of blocks, one LayerRun per layer per group.

    A group is declared just before its first layer, so the server reserves room as
    the put goes.
    """
    per_run = max(1, chunk_bytes // layout.layer_bytes)
    messages: list[list[bytes | memoryview]] = []
    prefix = header
    for start in range(first, len(keys), per_run):
        end = min(len(keys), start + per_run)
        declarations = encode_put_header(
            blocks=[
                (keys[index], keys[index - 1] if index else parent_key)
                for index in range(start, end)
            ]
        )
        for layer in range(layout.num_layers):
            views: list[bytes | memoryview] = []
            checksums: list[int] = []
            for index in range(start, end):
                hasher = new_hasher(kind)
                for _, view in source.runs(index, layer, layout.layer_bytes):
                    hasher.update(view)
                    views.append(view)
                checksums.append(hasher.value())
            parts: list[bytes | memoryview] = [prefix + declarations] if layer == 0 else []
            parts.extend(run_parts(5, layer, start - first, checksums, views))
            messages.append(parts)
            prefix = b""
    return messages


class _MessageBatch:
    """Packs block declarations and layer chunks into messages of about `chunk_bytes`.

    A message is a list of wire parts (see kvstore.chunkwire); the tensor bytes are not
    copied until gRPC serializes the message.
    """

    def __init__(self, chunk_bytes: int, header: bytes) -> None:
        self._chunk_bytes = chunk_bytes
        self._parts: list[bytes | memoryview] = [header] if header else []
        self._size = 0

    @property
    def has_content(self) -> bool:
        return bool(self._parts)

    def declare(self, key: bytes, parent_key: bytes) -> None:
        self._parts.append(encode_put_header(blocks=[(key, parent_key)]))

    def add_layer(
        self, block: int, layer: int, runs: list[tuple[int, memoryview]], kind: ChecksumKind
    ) -> list[list[bytes | memoryview]]:
        """Queue one block-layer given as (offset, bytes) runs; returns the messages now full."""
        hasher = new_hasher(kind)
        for _, data in runs:
            hasher.update(data)
        layer_checksum = hasher.value()
        full: list[list[bytes | memoryview]] = []
        for offset, data in runs:
            if self._size and self._size + len(data) > self._chunk_bytes:
                full.append(self.flush())
            self._parts.extend(chunk_parts(4, block, layer, offset, layer_checksum, [data]))
            self._size += len(data)
        return full

    def flush(self) -> list[bytes | memoryview]:
        parts, self._parts, self._size = self._parts, [], 0
        return parts


class _LayerReceiver:
    """Writes a GetBlocks stream into tensors and reports each layer once it is complete."""

    def __init__(
        self, client: KVClient, first: GetMessage, dest: torch.Tensor | None, form: KVForm
    ) -> None:
        layout = client.namespace.layout
        self.num_blocks = first.num_blocks
        self._layout = layout
        self._verify = client.options.verify_checksums
        self._form = form
        self._dest = dest
        self._host: torch.Tensor | None = None
        self._map: ByteMap | None = None
        if dest is not None:
            if dest.device.type == "cpu" and dest.is_contiguous():
                self._host = dest
            else:
                # Bytes land in host memory first; each finished layer is copied over.
                self._host = torch.empty(
                    dest.shape, dtype=dest.dtype, pin_memory=torch.cuda.is_available()
                )
            self._map = ByteMap(self._host, layout, form)
        self._layer_buffer: torch.Tensor | None = None
        self._current_layer = 0
        self._hashers: list[Hasher | None] = [None] * self.num_blocks
        self._expected = [0] * self.num_blocks
        self._filled = [0] * self.num_blocks
        self._kind = ChecksumKind.XXH3_64

    def accept(self, reply: GetMessage) -> list[LayerArrival]:
        arrivals: list[LayerArrival] = []
        if reply.checksum_kind:
            self._kind = checksum_kind_from_wire(reply.checksum_kind)
        for chunk in reply.chunks:
            if chunk.layer != self._current_layer:
                arrivals.append(self._next_layer(chunk.layer))
            self._write(chunk)
        for run in reply.runs:
            if run.layer != self._current_layer:
                arrivals.append(self._next_layer(run.layer))
            self._write_run(run)
        return arrivals

    def _next_layer(self, layer: int) -> LayerArrival:
        """Complete the current layer; the stream must go on with the very next one."""
        if layer != self._current_layer + 1:
            raise ChecksumError(
                f"the stream jumped from layer {self._current_layer} to layer {layer}"
            )
        arrival = self._complete_layer()
        self._current_layer = layer
        return arrival

    def finish(self) -> list[LayerArrival]:
        if self._current_layer != self._layout.num_layers - 1:
            raise ChecksumError(
                f"the stream ended in layer {self._current_layer} of {self._layout.num_layers}"
            )
        return [self._complete_layer()]

    def _layer_map(self) -> tuple[ByteMap, int]:
        """The map to write the current layer into, and the layer index within it."""
        if self._map is not None:
            return self._map, self._current_layer
        if self._layer_buffer is None:
            self._layer_buffer = torch.empty(
                (self.num_blocks, *self._layout.layer_shape), dtype=self._layout.dtype.torch_dtype
            )
            self._layer_buffer_map = ByteMap(self._layer_buffer, self._layout, KVForm.LAYER)
        return self._layer_buffer_map, 0

    def _write(self, chunk: WireChunk) -> None:
        block = chunk.block_index
        if not 0 <= block < self.num_blocks:
            raise ChecksumError(f"server sent block {block} of {self.num_blocks}")
        filled = self._filled[block]
        if chunk.offset != filled:
            raise ChecksumError(f"block {block} layer {chunk.layer}: chunk out of order")
        data = chunk.data
        if chunk.offset == 0:
            self._expected[block] = chunk.layer_checksum
            self._hashers[block] = new_hasher(self._kind)
        if self._verify:
            hasher = self._hashers[block]
            assert hasher is not None
            hasher.update(data)
        byte_map, layer = self._layer_map()
        byte_map.write(block, layer, chunk.offset, data)
        self._filled[block] = filled + len(data)

    def _write_run(self, run: WireRun) -> None:
        first, count = run.first_block, run.num_blocks
        layer_bytes = self._layout.layer_bytes
        if first < 0 or first + count > self.num_blocks or len(run.layer_checksums) != count:
            raise ChecksumError(f"server sent a malformed run of blocks {first}..{first + count}")
        if len(run.data) != count * layer_bytes:
            raise ChecksumError(f"a run of {count} blocks carries {len(run.data)} bytes")
        for index in range(count):
            block = first + index
            if self._filled[block]:
                raise ChecksumError(f"block {block} layer {run.layer} arrived twice")
            self._expected[block] = run.layer_checksums[index]
            hasher = new_hasher(self._kind)
            if self._verify:
                hasher.update(run.data[index * layer_bytes : (index + 1) * layer_bytes])
            self._hashers[block] = hasher
            self._filled[block] = layer_bytes
        byte_map, layer = self._layer_map()
        byte_map.write_run(first, count, layer, run.data)

    def _complete_layer(self) -> LayerArrival:
        layer = self._current_layer
        layer_bytes = self._layout.layer_bytes
        for block in range(self.num_blocks):
            if self._filled[block] != layer_bytes:
                raise ChecksumError(f"block {block} layer {layer} arrived incomplete")
            hasher = self._hashers[block]
            if self._verify and (hasher is None or hasher.value() != self._expected[block]):
                raise ChecksumError(
                    f"block {block} layer {layer}: received bytes fail their {self._kind.name} "
                    f"checksum; the data was not used"
                )
            self._filled[block] = 0
            self._hashers[block] = None
        return LayerArrival(layer=layer, num_blocks=self.num_blocks, kv=self._layer_view(layer))

    def _layer_view(self, layer: int) -> torch.Tensor:
        if self._host is None:
            assert self._layer_buffer is not None
            buffer, self._layer_buffer = self._layer_buffer, None
            return buffer
        assert self._dest is not None
        tokens = self.num_blocks * self._layout.block_tokens
        if self._form is KVForm.SEQUENCE:
            host, dest = self._host[layer, :, :tokens], self._dest[layer, :, :tokens]
        elif self._form is KVForm.BLOCKS:
            host, dest = self._host[: self.num_blocks, layer], self._dest[: self.num_blocks, layer]
        else:
            host, dest = self._host[: self.num_blocks], self._dest[: self.num_blocks]
        if self._host is not self._dest:
            dest.copy_(host, non_blocking=True)
        return dest


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
