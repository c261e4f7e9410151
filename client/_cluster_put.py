"""A layer put over a cluster: one member layer put per run, all open at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import torch

from kvstore.client._async import KVClient, LayerPut, check_tensor
from kvstore.client._cluster_nodes import NODE_FAILURES, gather_or_cancel
from kvstore.client._errors import InvalidArgument, KVStoreClientError
from kvstore.client._results import PutResult
from kvstore.cluster.placement import Run
from kvstore.codec import KVForm, cpu_contiguous
from kvstore.enums import Durability, PutOutcome

if TYPE_CHECKING:
    from kvstore.client._cluster import ClusterClient


def weakest_durability(results: Sequence[PutResult]) -> Durability | None:
    found = [
        result.durability
        for result in results
        if result.durability is not None and result.num_committed
    ]
    return min(found) if found else None


class ClusterLayerPut(LayerPut):
    """A layer put over a cluster: one member layer put per run, all open at once, each
    fed its runs' slice of every layer (a view, not a copy)."""

    def __init__(self, client: ClusterClient, keys: list[bytes], parent_key: bytes) -> None:
        if not keys:
            raise InvalidArgument("layer_put needs at least one key")
        self._cluster = client
        self._layout = client.namespace.layout
        self._keys = keys
        self._parent_key = parent_key
        self._next_layer = 0
        self._runs: list[Run] = []
        self._puts: dict[int, LayerPut] = {}  # by run start; a failed run's put leaves
        self._parent_missing = False  # no member holds `parent_key`: nothing is sent
        self._failure: KVStoreClientError | None = None  # a caller error a send raised
        self.result: PutResult | None = None

    async def __aenter__(self) -> ClusterLayerPut:
        placement = await self._cluster.start()
        chain_runs = await self._cluster.chain_runs(placement, self._keys, self._parent_key)
        if chain_runs is None:
            self._parent_missing = True
            return self
        self._runs = chain_runs

        async def open_run(run: Run) -> None:
            parent = self._keys[run.start - 1] if run.start else self._parent_key

            async def open_on(node: KVClient) -> LayerPut:
                put = node.layer_put(
                    self._keys[run.start : run.stop], parent_key=parent, parent_remote=bool(parent)
                )
                await put.__aenter__()
                return put

            put = await self._cluster.nodes.call(run.owner, open_on)
            if put is not None:
                self._puts[run.start] = put

        try:
            opened = await asyncio.gather(
                *(open_run(run) for run in self._runs), return_exceptions=True
            )
        except BaseException as error:  # cancelled meanwhile: close what did open
            await self._close_all(type(error), error)
            raise
        failure = next((item for item in opened if isinstance(item, BaseException)), None)
        if failure is not None:
            # `async with` runs no __aexit__ when __aenter__ raises: close the runs that
            # did open here, or their streams would stay open until their deadline.
            await self._close_all(type(failure), failure)
            raise failure
        return self

    async def send_layer(self, layer: int, kv_layer: torch.Tensor) -> None:
        self._raise_if_failed()
        if layer != self._next_layer:
            raise InvalidArgument(f"send layer {self._next_layer} next, not layer {layer}")
        check_tensor(kv_layer, self._layout, KVForm.LAYER, len(self._keys), one_layer=True)
        kv_layer = cpu_contiguous(kv_layer)

        async def send(run: Run, put: LayerPut) -> None:
            try:
                await put.send_layer(layer, kv_layer[run.start : run.stop])
            except NODE_FAILURES as error:
                self._cluster.nodes.failed(run.owner, error)
                del self._puts[run.start]
                with contextlib.suppress(Exception):
                    await put.__aexit__(type(error), error, None)

        try:
            await gather_or_cancel(
                *(send(run, self._puts[run.start]) for run in self._runs if run.start in self._puts)
            )
        except KVStoreClientError as error:  # a caller error: the whole put is over
            self._failure = error
            raise
        self._next_layer += 1

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None and self._failure is not None:  # a caller that went on after it
            await self._close_all(type(self._failure), self._failure)
            self._raise_if_failed()
        if exc is None and self._next_layer != self._layout.num_layers:
            exc = InvalidArgument(
                f"layer_put ended after {self._next_layer} of {self._layout.num_layers} layers"
            )
            await self._close_all(type(exc), exc)
            raise exc
        results = await self._close_all(exc_type, exc)
        if exc is not None:
            return
        outcomes: list[PutOutcome] = []
        if self._parent_missing:  # as one daemon answers a chain whose parent it lacks
            outcomes = [PutOutcome.PARENT_MISSING] * len(self._keys)
        for run in self._runs:
            result = results.get(run.start)
            if result is None:
                outcomes += [PutOutcome.NODE_UNREACHABLE] * (run.stop - run.start)
            else:
                outcomes += result.outcomes
        found = list(results.values())
        self.result = PutResult(
            outcomes=tuple(outcomes),
            num_skipped=0,
            bytes_sent=sum(result.bytes_sent for result in found),
            durability=weakest_durability(found),
        )

    async def _close_all(
        self, exc_type: type[BaseException] | None, exc: BaseException | None
    ) -> dict[int, PutResult]:
        runs = {run.start: run for run in self._runs}

        async def close(start: int, put: LayerPut) -> tuple[int, PutResult | None]:
            try:
                await put.__aexit__(exc_type, exc, None)
            except NODE_FAILURES as error:
                self._cluster.nodes.failed(runs[start].owner, error)
                return start, None
            return start, put.result

        # Every put is closed, whatever another's close raised; then the first error is.
        closed = await asyncio.gather(
            *(close(s, p) for s, p in self._puts.items()), return_exceptions=True
        )
        results: dict[int, PutResult] = {}
        for item in closed:
            if isinstance(item, BaseException):
                raise item
            start, result = item
            if result is not None:
                results[start] = result
        return results
