"""A blocking facade over KVClient: each method runs the async one on a private loop thread."""

from __future__ import annotations

from collections.abc import Coroutine, Generator, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import torch

from kvstore.client._async import KVClient, LayerPut
from kvstore.client._blocking_lookup import BlockingLookups
from kvstore.client._loop import LoopThread
from kvstore.client._options import ClientOptions
from kvstore.client._results import LayerArrival, PrefixMatch, PutResult, StoreStats
from kvstore.client._watch import BlockEvents
from kvstore.client.cost import BandwidthMeter
from kvstore.codec import KVForm
from kvstore.layout import Namespace

T = TypeVar("T")
Tokens = Sequence[int] | np.ndarray | torch.Tensor


class SyncKVClient:
    """The same calls as KVClient, blocking. Close it (or use `with`) to stop its thread."""

    def __init__(
        self, target: str, namespace: Namespace, *, options: ClientOptions | None = None
    ) -> None:
        self._loop = LoopThread("kvstore-client")
        try:
            self._client: KVClient = self._loop.open_client(target, namespace, options)
        except BaseException:
            self._loop.stop()  # a client that failed to open leaves no thread behind
            raise
        self._lookups = BlockingLookups(self._client)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(coroutine)

    def __enter__(self) -> SyncKVClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.running:
            self._lookups.close()
            self._run(self._client.close())
            self._loop.stop()

    @property
    def namespace(self) -> Namespace:
        return self._client.namespace

    @property
    def bandwidth(self) -> BandwidthMeter:
        """The async client's meter (safe to read from any thread)."""
        return self._client.bandwidth

    def keys(self, tokens: Tokens) -> list[bytes]:
        return self._client.keys(tokens)

    def lookup(self, tokens: Tokens) -> PrefixMatch:
        return self.lookup_keys(self._client.keys(tokens))

    def lookup_keys(self, keys: list[bytes]) -> PrefixMatch:
        """From this thread where it can (kvstore.client._blocking_lookup), else on the
        client's loop; the answer and the errors are the same."""
        match = self._lookups.lookup_keys(keys)
        if match is None:
            match = self._run(self._client.lookup_keys(keys))
        return match

    def put(
        self,
        tokens: Tokens,
        kv: torch.Tensor,
        *,
        form: KVForm = KVForm.SEQUENCE,
        skip_cached: bool = True,
    ) -> PutResult:
        return self._run(self._client.put(tokens, kv, form=form, skip_cached=skip_cached))

    def put_blocks(
        self,
        keys: list[bytes],
        kv: torch.Tensor,
        *,
        parent_key: bytes = b"",
        parent_remote: bool = False,
        form: KVForm = KVForm.BLOCKS,
    ) -> PutResult:
        return self._run(
            self._client.put_blocks(
                keys, kv, parent_key=parent_key, parent_remote=parent_remote, form=form
            )
        )

    def layer_put(
        self, keys: list[bytes], *, parent_key: bytes = b"", parent_remote: bool = False
    ) -> SyncLayerPut:
        """KVClient.layer_put, blocking: `with client.layer_put(keys) as put: ...`."""
        return SyncLayerPut(
            self._loop,
            self._client.layer_put(keys, parent_key=parent_key, parent_remote=parent_remote),
        )

    def get_into(
        self,
        keys: list[bytes] | PrefixMatch,
        dest: torch.Tensor,
        *,
        form: KVForm = KVForm.SEQUENCE,
    ) -> int:
        return self._run(self._client.get_into(keys, dest, form=form))

    def iter_layers(
        self,
        keys: list[bytes] | PrefixMatch,
        dest: torch.Tensor | None = None,
        *,
        form: KVForm = KVForm.SEQUENCE,
    ) -> Iterator[LayerArrival]:
        stream = self._client.iter_layers(keys, dest, form=form)
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(stream.aclose())

    def watch_blocks(
        self, *, max_events_per_message: int = 0
    ) -> Generator[BlockEvents, None, None]:
        """KVClient.watch_blocks, blocking; close the iterator to end the watch."""
        stream = self._client.watch_blocks(max_events_per_message=max_events_per_message)
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(stream.aclose())

    def pin(self, keys: list[bytes], ttl_s: float) -> int:
        return self._run(self._client.pin(keys, ttl_s))

    def unpin(self, keys: list[bytes]) -> int:
        return self._run(self._client.unpin(keys))

    def delete(self, keys: list[bytes]) -> tuple[int, int]:
        return self._run(self._client.delete(keys))

    def stats(self) -> StoreStats:
        return self._run(self._client.stats())


class SyncLayerPut:
    """LayerPut, blocking (see SyncKVClient.layer_put)."""

    def __init__(self, loop: LoopThread, put: LayerPut) -> None:
        self._loop = loop
        self._put = put

    @property
    def result(self) -> PutResult | None:
        """The put's result, once the `with` block has ended without an error."""
        return self._put.result

    def __enter__(self) -> SyncLayerPut:
        self._loop.run(self._put.__aenter__())
        return self

    def send_layer(self, layer: int, kv_layer: torch.Tensor) -> None:
        self._loop.run(self._put.send_layer(layer, kv_layer))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._loop.run(self._put.__aexit__(exc_type, exc, traceback))
