"""A get of one chain from all its owners at once, assembled layer by layer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import torch

from kvstore.client._cluster_nodes import (
    NODE_FAILURES,
    NodePool,
    OwnerRuns,
    by_owner,
    cancel_and_wait,
)
from kvstore.client._results import LayerArrival
from kvstore.cluster.placement import Run
from kvstore.codec import ByteMap, KVForm
from kvstore.layout import KVLayout


@dataclass
class OwnerProgress:
    owner: OwnerRuns
    num_served: int = -1  # blocks the member serves of its runs; -1: not known yet
    num_layers_done: int = 0
    failed: bool = False
    finished: bool = False
    # An error that is not a node's failure (a bad checksum, a refused credential): the
    # whole get raises it.
    error: BaseException | None = None


class _PlacedWriter:
    """Writes a member's blocks (its runs back to back) at their places in the chain."""

    def __init__(self, positions: list[int], target: Callable[[int], tuple[ByteMap, int]]) -> None:
        self._positions = positions
        self._target = target

    def write(self, block: int, layer: int, offset: int, data: memoryview | bytes) -> None:
        byte_map, index = self._target(layer)
        byte_map.write(self._positions[block], index, offset, data)

    def write_run(self, first_block: int, num_blocks: int, layer: int, data: memoryview) -> None:
        byte_map, index = self._target(layer)
        positions = self._positions
        layer_bytes = len(data) // num_blocks if num_blocks else 0
        start = first_block
        end = first_block + num_blocks
        while start < end:
            # The longest stretch whose places are consecutive in the chain: one copy.
            stop = start + 1
            while stop < end and positions[stop] == positions[stop - 1] + 1:
                stop += 1
            piece = data[(start - first_block) * layer_bytes : (stop - first_block) * layer_bytes]
            byte_map.write_run(positions[start], stop - start, index, piece)
            start = stop


class ChainGather:
    """One get of a chain from all its owners at once, layer by layer."""

    def __init__(
        self,
        nodes: NodePool,
        layout: KVLayout,
        keys: list[bytes],
        runs: list[Run],
        dest: torch.Tensor | None,
        form: KVForm,
    ) -> None:
        self._nodes = nodes
        self._keys = keys
        self._runs = runs
        self._dest = dest
        self._form = form
        self._layout = layout
        self._host: torch.Tensor | None = None
        self._host_map: ByteMap | None = None
        self._layer_buffers: dict[int, tuple[torch.Tensor, ByteMap]] = {}
        if dest is not None:
            if dest.device.type == "cpu" and dest.is_contiguous():
                self._host = dest
            else:
                self._host = torch.empty(
                    dest.shape, dtype=dest.dtype, pin_memory=torch.cuda.is_available()
                )
            self._host_map = ByteMap(self._host, layout, form)
        self._progress = [OwnerProgress(owner) for owner in by_owner(runs).values()]
        self._changed = asyncio.Event()

    def _target(self, layer: int) -> tuple[ByteMap, int]:
        if self._host_map is not None:
            return self._host_map, layer
        found = self._layer_buffers.get(layer)
        if found is None:
            buffer = torch.empty(
                (len(self._keys), *self._layout.layer_shape),
                dtype=self._layout.dtype.torch_dtype,
            )
            found = self._layer_buffers[layer] = (
                buffer,
                ByteMap(buffer, self._layout, KVForm.LAYER),
            )
        return found[1], 0

    async def _drive(self, progress: OwnerProgress) -> None:
        owner = progress.owner
        nodes = self._nodes
        if not nodes.reachable(owner.member):
            progress.failed = True
            return
        writer = _PlacedWriter(owner.positions(), self._target)
        try:
            with nodes.lease(owner.member) as node:
                arrivals = node._stream_to_writer(owner.keys(self._keys), writer)
                async with contextlib.aclosing(arrivals):
                    async for arrival in arrivals:
                        progress.num_served = arrival.num_blocks
                        progress.num_layers_done = arrival.layer + 1
                        self._changed.set()
            progress.finished = True
        except NODE_FAILURES as error:
            nodes.failed(owner.member, error)
            progress.failed = True
        except Exception as error:
            progress.error = error
            progress.failed = True
        finally:
            if progress.num_served < 0:
                progress.num_served = 0
            self._changed.set()

    def _ready(self, layer: int) -> bool:
        return all(p.failed or p.finished or p.num_layers_done > layer for p in self._progress)

    def _prefix(self, layer: int) -> int:
        """Blocks of the chain, from its start, whose layer `layer` has arrived."""
        by_node = {p.owner.member.node_id: p for p in self._progress}
        offsets: dict[str, int] = {}
        num_blocks = 0
        for run in self._runs:
            progress = by_node[run.owner.node_id]
            offset = offsets.get(run.owner.node_id, 0)
            offsets[run.owner.node_id] = offset + (run.stop - run.start)
            size = run.stop - run.start
            delivered = progress.num_layers_done > layer
            present = max(0, min(progress.num_served - offset, size)) if delivered else 0
            num_blocks += present
            if present < size:
                break
        return num_blocks

    async def arrivals(self) -> AsyncGenerator[LayerArrival, None]:
        tasks = [
            asyncio.get_running_loop().create_task(self._drive(progress))
            for progress in self._progress
        ]
        try:
            num_blocks = len(self._keys)
            for layer in range(self._layout.num_layers):
                while not self._ready(layer):
                    self._changed.clear()
                    await self._changed.wait()
                for progress in self._progress:
                    # A fault comes after the layers its node delivered whole: they are
                    # verified, and the caller may use them.
                    if progress.error is not None and progress.num_layers_done <= layer:
                        raise progress.error
                num_blocks = min(num_blocks, self._prefix(layer))
                if num_blocks == 0:
                    return
                yield LayerArrival(
                    layer=layer, num_blocks=num_blocks, kv=self._view(layer, num_blocks)
                )
        finally:
            # Stopped early (or done): end every member's stream, so the nodes free the
            # blocks at once.
            await cancel_and_wait(tasks)

    def _view(self, layer: int, num_blocks: int) -> torch.Tensor:
        if self._host is None:
            return self._layer_buffers[layer][0][:num_blocks]
        assert self._dest is not None
        tokens = num_blocks * self._layout.block_tokens
        if self._form is KVForm.SEQUENCE:
            host, dest = self._host[layer, :, :tokens], self._dest[layer, :, :tokens]
        elif self._form is KVForm.BLOCKS:
            host, dest = self._host[:num_blocks, layer], self._dest[:num_blocks, layer]
        else:
            host, dest = self._host[:num_blocks], self._dest[:num_blocks]
        if self._host is not self._dest:
            dest.copy_(host, non_blocking=True)
        return dest
