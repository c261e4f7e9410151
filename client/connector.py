"""KVConnector: moves the blocks of a paged KV cache to and from the store, layer by layer.

The hooks are named after vLLM's v1 KV connector so that a vLLM connector can be a thin
layer on top:

    connector = KVConnector(target, namespace, cache)
    match = connector.lookup(prompt)                 # longest stored prefix
    connector.start_load_kv(match, page_ids)         # returns at once; loads in the background
    connector.start_save_kv(new_keys, new_page_ids, parent_key=...)
    for layer in range(num_layers):                  # the model's forward pass
        connector.wait_for_layer_load(layer)         # blocks until layer's pages are in place
        ...compute layer, write its new K/V into the cache...
        connector.save_kv_layer(layer)               # queues the layer; returns at once
    connector.wait_for_save()                        # the put's result, or KVSaveError

Threads: the model calls the hooks from its own thread. The connector runs a `KVClient` on a
private event loop thread, which receives each layer (`iter_layers`), copies it into the
cache pages and then sets that layer's event, and which sends each queued layer through one
`layer_put` stream. So the model waits on the network only in `wait_for_layer_load`, when a
layer has not arrived yet, and in `wait_for_save`.

Failures never yield wrong data: a load that fails (store down, blocks evicted since the
lookup, a checksum mismatch, a timeout) makes `wait_for_layer_load` raise `KVLoadError` for
every layer not yet in place. The caller then drops the partial forward pass and recomputes
(the disaggregated benchmark's decode worker does this, see kvstore.bench.disagg.serving). A
failed save raises `KVSaveError` from `wait_for_save`; the computed KV is still valid locally.

On CUDA, copies run on the loop thread's current stream, which is the device's default stream:
they are ordered after the model's work as long as the model also uses the default stream.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from kvstore.client._async import KVClient
from kvstore.client._loop import LoopThread
from kvstore.client._options import ClientOptions
from kvstore.client._results import LayerArrival, PrefixMatch, PutResult
from kvstore.client.cost import BandwidthMeter
from kvstore.layout import Namespace

T = TypeVar("T")
Tokens = Sequence[int] | np.ndarray | torch.Tensor


__all__ = [
    "KVConnector",
    "KVLoadError",
    "KVSaveError",
    "KVTransferError",
    "LoadStats",
    "PagedCache",
    "SaveHandle",
]


class PagedCache(Protocol):
    """What the connector needs from a paged KV cache."""

    def page_view(self, layer: int, page: int) -> torch.Tensor:
        """A writable view ``[2, block_tokens, num_kv_heads, head_dim]`` (K then V) of one page
        of one layer: exactly one block-layer of the store."""
        ...


class KVTransferError(Exception):
    """A load or save between the cache and the store failed."""


class KVLoadError(KVTransferError):
    """A layer could not be loaded; its pages hold no usable data. Recompute instead."""


class KVSaveError(KVTransferError):
    """A put of computed blocks failed; nothing of it is visible in the store."""


@dataclass(frozen=True, slots=True)
class LoadStats:
    """One finished load."""

    num_blocks: int
    num_bytes: int
    elapsed_s: float  # start_load_kv until the last layer was in place
    stall_s: float  # time the model thread spent blocked in wait_for_layer_load


class _Op:
    """State shared by the model thread and the loop thread for one load or save."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.task: asyncio.Task[Any] | None = None  # set on the loop when the op starts
        self.future: Future[Any] | None = None


class _Load(_Op):
    def __init__(self, num_layers: int, num_blocks: int) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        self.events = [threading.Event() for _ in range(num_layers)]
        self.loaded = [False] * num_layers
        self.error: BaseException | None = None
        self.finished: float | None = None
        self.stall_s = 0.0

    def layer_loaded(self, layer: int) -> None:
        self.loaded[layer] = True
        if layer == len(self.events) - 1:
            self.finished = time.perf_counter()
        self.events[layer].set()

    def fail(self, error: BaseException) -> None:
        # The error is recorded before any event is set: a woken waiter always sees it.
        if self.error is None:
            self.error = error
        for event in self.events:
            event.set()


class _Save(_Op):
    def __init__(self) -> None:
        super().__init__()
        self.queue: asyncio.Queue[int] = asyncio.Queue()  # bound to the loop on first use
        self.num_queued = 0


class SaveHandle:
    """One save opened by `KVConnector.open_save`: it runs on after the forward pass that
    queued its layers, and is polled (`done`) or waited on (`result`) later."""

    def __init__(self, connector: KVConnector, save: _Save, num_blocks: int) -> None:
        self._connector = connector
        self._save = save
        self.num_blocks = num_blocks

    def done(self) -> bool:
        """Whether the put has finished, committed or failed."""
        return self._save.future is not None and self._save.future.done()

    def result(self, timeout: float | None = None) -> PutResult:
        """The put's result; raises `KVSaveError` if it failed or did not finish in time."""
        assert self._save.future is not None
        try:
            result: PutResult = self._save.future.result(timeout)
            return result
        except TimeoutError:
            raise KVSaveError(f"the save did not finish within {timeout}s") from None
        except Exception as error:
            raise KVSaveError(f"the save failed: {error}") from error

    @property
    def fully_queued(self) -> bool:
        """Whether every layer was queued (`save_kv_layer` reached the last one)."""
        return self._save.num_queued >= self._connector.num_layers

    def abort(self) -> None:
        """Cancel the put and wait until it no longer reads the cache; the server drops it."""
        self._connector._abort_op(self._save)
        self._connector._open_saves = [
            save for save in self._connector._open_saves if save is not self._save
        ]


class KVConnector:
    """Loads and saves the blocks of `cache` for one namespace of a kvstore server.

    One load and one save may be in flight at a time. Page ids index `cache.page_view`;
    block `i` of a load or save goes to or comes from `page_ids[i]`. Close the connector
    (or use `with`) to stop its thread.
    """

    def __init__(
        self,
        target: str,
        namespace: Namespace,
        cache: PagedCache,
        *,
        options: ClientOptions | None = None,
    ) -> None:
        self.namespace = namespace
        self._layout = namespace.layout
        self._cache = cache
        self._loop = LoopThread("kvstore-connector")
        self._client: KVClient = self._loop.open_client(target, namespace, options)
        self._load: _Load | None = None
        self._save: _Save | None = None
        # Every save still waiting for layers, `_save` among them: save_kv_layer feeds each.
        self._open_saves: list[_Save] = []
        self._handles: list[SaveHandle] = []

    def __enter__(self) -> KVConnector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Abort what is in flight, close the channel and stop the loop thread."""
        if not self._loop.running:
            return
        self.abort()
        self._call(self._client.close())
        self._loop.stop()

    @property
    def num_layers(self) -> int:
        return self._layout.num_layers

    @property
    def bandwidth(self) -> BandwidthMeter:
        """What this connector's loads delivered, per node and tier (kvstore.client.cost)."""
        return self._client.bandwidth

    # -- lookups -------------------------------------------------------------------------

    def keys(self, tokens: Tokens) -> list[bytes]:
        """Chained prefix-hash keys of every full block of `tokens`."""
        return self._client.keys(tokens)

    def lookup(self, tokens: Tokens) -> PrefixMatch:
        """The longest stored prefix of `tokens`' full blocks that is worth loading.

        At least one token is always left to compute, because the model needs the last
        position's logits: a prompt of exactly k stored blocks matches k - 1 of them.
        Raises a `KVStoreClientError` (e.g. `Unavailable`) if the store cannot answer.
        """
        keys = self.keys(tokens)
        loadable = max(0, (len(tokens) - 1) // self._layout.block_tokens)
        if loadable == 0:
            return PrefixMatch(
                keys=keys, num_matched=0, tiers=(), block_tokens=self._layout.block_tokens
            )
        match = self._call(self._client.lookup_keys(keys[:loadable]))
        return PrefixMatch(
            keys=keys,
            num_matched=match.num_matched,
            tiers=match.tiers,
            block_tokens=match.block_tokens,
        )

    def get_num_new_matched_tokens(self, tokens: Tokens, num_computed_tokens: int = 0) -> int:
        """Tokens beyond the `num_computed_tokens` already in the cache that the store can
        provide (vLLM's scheduler-side hook of the same name)."""
        return max(0, self.lookup(tokens).num_matched_tokens - num_computed_tokens)

    # -- loading -------------------------------------------------------------------------

    def start_load_kv(self, keys: list[bytes] | PrefixMatch, page_ids: Sequence[int]) -> None:
        """Start fetching `keys`' blocks (a match's matched keys) into `page_ids`; returns
        at once. Layer l is usable after `wait_for_layer_load(l)` returns."""
        if isinstance(keys, PrefixMatch):
            keys = keys.matched_keys
        if len(keys) != len(page_ids):
            raise ValueError(f"{len(keys)} keys but {len(page_ids)} pages to load into")
        if self._load is not None and self._load.finished is None and self._load.error is None:
            raise RuntimeError("a load is already in flight; wait for it or abort() first")
        self._check_pages(page_ids)
        load = _Load(self._layout.num_layers, len(keys))
        self._load = load
        if not keys:
            load.finished = load.started
            for layer in range(self._layout.num_layers):
                load.layer_loaded(layer)
            return
        load.future = self._submit(self._run_load(load, list(keys), list(page_ids)))

    def wait_for_layer_load(self, layer: int, timeout: float | None = None) -> None:
        """Block until layer `layer` of the current load is in the cache.

        Returns at once when no load was started. Raises `KVLoadError` if the layer
        could not be loaded (or did not arrive within `timeout` seconds).
        """
        load = self._load
        if load is None:
            return
        if not load.events[layer].is_set():
            waited_from = time.perf_counter()
            arrived = load.events[layer].wait(timeout)
            load.stall_s += time.perf_counter() - waited_from
            if not arrived:
                raise KVLoadError(f"layer {layer} did not arrive within {timeout}s")
        if not load.loaded[layer]:
            raise KVLoadError(f"layer {layer} was not loaded: {load.error}") from load.error

    def wait_for_load(self, timeout: float | None = None) -> LoadStats:
        """Block until every layer is in place and end the load; its figures (zeros when no
        load was started). Raises `KVLoadError`; call `abort()` after a failed load."""
        load = self._load
        if load is None:
            return LoadStats(num_blocks=0, num_bytes=0, elapsed_s=0.0, stall_s=0.0)
        for layer in range(self._layout.num_layers):
            self.wait_for_layer_load(layer, timeout)
        assert load.finished is not None
        self._load = None
        return LoadStats(
            num_blocks=load.num_blocks,
            num_bytes=load.num_blocks * self._layout.block_bytes,
            elapsed_s=load.finished - load.started,
            stall_s=load.stall_s,
        )

    def load_in_flight(self) -> bool:
        """Whether a load was started and has not been ended by `wait_for_load` or an abort."""
        return self._load is not None

    def abort_load(self) -> None:
        """Cancel the load (if any) and wait until it no longer writes the cache."""
        if self._load is not None:
            self._abort_op(self._load)
        self._load = None

    async def _run_load(self, load: _Load, keys: list[bytes], page_ids: list[int]) -> None:
        load.task = asyncio.current_task()
        stream = self._client.iter_layers(keys)
        try:
            async for arrival in stream:
                if arrival.num_blocks != len(keys):
                    raise KVLoadError(
                        f"the store served {arrival.num_blocks} of {len(keys)} blocks "
                        "(evicted since the lookup?)"
                    )
                self._copy_in(arrival, page_ids)
                load.layer_loaded(arrival.layer)
            if not all(load.loaded):
                raise KVLoadError(f"the store served none of the {len(keys)} blocks")
        except asyncio.CancelledError:
            load.fail(KVLoadError("the load was aborted"))
            raise
        except Exception as error:
            load.fail(error)
        finally:
            await stream.aclose()

    def _copy_in(self, arrival: LayerArrival, page_ids: list[int]) -> None:
        for block, page in enumerate(page_ids):
            self._cache.page_view(arrival.layer, page).copy_(arrival.kv[block])

    # -- saving --------------------------------------------------------------------------

    def start_save_kv(
        self, keys: list[bytes], page_ids: Sequence[int], *, parent_key: bytes = b""
    ) -> None:
        """Open a put of the full blocks `keys` held in `page_ids`; `keys[0]` chains from
        `parent_key`. Layers follow through `save_kv_layer`. The pages must not change
        until `wait_for_save` returns: they are read while later layers compute."""
        if len(keys) != len(page_ids):
            raise ValueError(f"{len(keys)} keys but {len(page_ids)} pages to save")
        if not keys:
            raise ValueError("nothing to save: no full blocks")
        if self._save is not None:
            raise RuntimeError("a save is already in flight; call wait_for_save() first")
        self._save = self._start_save(keys, page_ids, parent_key)

    def open_save(
        self,
        keys: list[bytes],
        page_ids: Sequence[int],
        *,
        parent_key: bytes = b"",
        after: SaveHandle | None = None,
        skip_stored: bool = False,
        layers_ready: int = 0,
    ) -> SaveHandle:
        """Like `start_save_kv`, but any number may be open at once, each fed by the same
        `save_kv_layer` calls, and none is waited on by `wait_for_save`: poll or wait on the
        returned handle. The pages must not change until the handle is done.

        `after`: the save that stores `parent_key`; this one's put opens once that one has
        ended, since the server refuses a block whose parent is not stored (PARENT_MISSING).
        `skip_stored`: look the keys up first (on the connector's thread, not the caller's)
        and send only the blocks after the stored prefix.
        `layers_ready`: layers 0.. of the pages are in place already (the forward pass has
        ended): the put takes them without `save_kv_layer` calls, and the connector's
        thread is woken once, not once per layer.
        """
        if not 0 <= layers_ready <= self._layout.num_layers:
            raise ValueError(f"layers_ready must be 0..{self._layout.num_layers}")
        if len(keys) != len(page_ids):
            raise ValueError(f"{len(keys)} keys but {len(page_ids)} pages to save")
        if not keys:
            raise ValueError("nothing to save: no full blocks")
        previous = after._save if after is not None else None
        save = self._start_save(keys, page_ids, parent_key, previous, skip_stored, layers_ready)
        handle = SaveHandle(self, save, len(keys))
        self._handles = [h for h in self._handles if not h.done()] + [handle]
        return handle

    def _start_save(
        self,
        keys: list[bytes],
        page_ids: Sequence[int],
        parent_key: bytes,
        previous: _Save | None = None,
        skip_stored: bool = False,
        layers_ready: int = 0,
    ) -> _Save:
        self._check_pages(page_ids)
        save = _Save()
        # Queued here, before the put exists: later layers' put_nowait calls reach the
        # loop after them. Safe off the loop: the queue is new and nothing waits on it.
        for layer in range(layers_ready):
            save.queue.put_nowait(layer)
        save.num_queued = layers_ready
        if layers_ready < self._layout.num_layers:
            self._open_saves.append(save)
        save.future = self._submit(
            self._run_save(save, list(keys), list(page_ids), parent_key, previous, skip_stored)
        )
        return save

    def save_kv_layer(self, layer: int) -> None:
        """Queue layer `layer` of every open save for sending; returns at once.

        Layers go in order 0, 1, ... Calls with no save started, or after every layer has
        been queued, do nothing, so the model may call this on every forward pass.
        """
        for save in self._open_saves:
            if layer != save.num_queued:
                raise ValueError(f"save layer {save.num_queued} next, not layer {layer}")
        for save in self._open_saves:
            save.num_queued += 1
            self._loop.call_soon(save.queue.put_nowait, layer)
        self._open_saves = [
            save for save in self._open_saves if save.num_queued < self._layout.num_layers
        ]

    def wait_for_save(self, timeout: float | None = None) -> PutResult | None:
        """Wait for the current save's put to finish; its result, or None if no save was
        started. Raises `KVSaveError` if the put failed or did not finish in `timeout`."""
        save = self._save
        if save is None:
            return None
        if save.num_queued != self._layout.num_layers:
            raise RuntimeError(
                f"only {save.num_queued} of {self._layout.num_layers} layers were saved"
            )
        assert save.future is not None
        try:
            result: PutResult = save.future.result(timeout)
        except TimeoutError:
            self._abort_op(save)
            raise KVSaveError(f"the save did not finish within {timeout}s") from None
        except Exception as error:
            raise KVSaveError(f"the save failed: {error}") from error
        finally:
            self._save = None
        return result

    async def _run_save(
        self,
        save: _Save,
        keys: list[bytes],
        page_ids: list[int],
        parent_key: bytes,
        previous: _Save | None = None,
        skip_stored: bool = False,
    ) -> PutResult:
        save.task = asyncio.current_task()
        if previous is not None and previous.future is not None:
            # Its failure shows in this put's outcomes (PARENT_MISSING), not as an error here.
            await asyncio.wait([asyncio.wrap_future(previous.future)])
        num_stored = (await self._client.lookup_keys(keys)).num_matched if skip_stored else 0
        if num_stored:
            parent_key = keys[num_stored - 1]
            keys, page_ids = keys[num_stored:], page_ids[num_stored:]
        if not keys:
            # Every block is stored; the layers queued for this save are never read.
            return PutResult(outcomes=(), num_skipped=num_stored, bytes_sent=0)
        async with self._client.layer_put(keys, parent_key=parent_key) as put:
            for _ in range(self._layout.num_layers):
                layer = await save.queue.get()
                kv = torch.stack([self._cache.page_view(layer, page) for page in page_ids])
                await put.send_layer(layer, kv)
        assert put.result is not None
        return replace(put.result, num_skipped=put.result.num_skipped + num_stored)

    # -- control -------------------------------------------------------------------------

    def abort(self) -> None:
        """Cancel the load and the save in flight and wait until neither touches the cache
        any more; the server drops the aborted put. Safe to call when nothing is running."""
        for op in (self._load, self._save):
            if op is not None:
                self._abort_op(op)
        for handle in self._handles:
            handle.abort()
        self._load = None
        self._save = None
        self._open_saves = []
        self._handles = []

    def _abort_op(self, op: _Op) -> None:
        if op.future is None or op.future.done():
            return
        # Scheduled after the op's own start (the loop runs callbacks in FIFO order), so
        # op.task is set by the time this runs unless the op already finished.
        self._call(_cancel(op))

    def _check_pages(self, page_ids: Sequence[int]) -> None:
        """Page ids in the cache (a negative one would index from its end: the wrong
        page, silently), of the namespace's layout, each named once: two blocks loaded
        into one page would leave one of them wrong, and one page saved as two blocks
        would store its bytes under the other block's key."""
        if not page_ids:
            return
        lowest, highest = min(page_ids), max(page_ids)
        if lowest < 0:
            raise ValueError(f"page id {lowest} is negative; page ids count from 0")
        try:
            view = self._cache.page_view(0, highest)
        except IndexError:
            raise ValueError(f"page id {highest} is past the cache's last page") from None
        if len(set(page_ids)) != len(page_ids):
            twice = next(page for page, count in Counter(page_ids).items() if count > 1)
            raise ValueError(f"page {twice} is named more than once; each block needs its own")
        shape, dtype = self._layout.layer_shape, self._layout.dtype.torch_dtype
        if tuple(view.shape) != shape or view.dtype != dtype:
            raise ValueError(
                f"cache pages are {tuple(view.shape)} {view.dtype}; the namespace's layout "
                f"needs {shape} {dtype}"
            )

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        return self._loop.submit(coroutine)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._submit(coroutine).result()


async def _cancel(op: _Op) -> None:
    task = op.task
    if task is None or task.done():
        return
    # A cancelled save leaves LayerPut with an exception, so it cancels the stream and the
    # server drops the partial put.
    task.cancel()
    await asyncio.wait([task])
