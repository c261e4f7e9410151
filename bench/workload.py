"""What a load test runs, and what one worker records while running it.

A `Workload` is a picklable description (it travels to every worker process) of numbered *units*
of work: an agent session, a trace request. The driver (`kvstore.bench.load`) decides when each
unit starts; the workload says what a unit does, usually through `fetch_and_store`, the request
shape both workloads share:

    LookupPrefix(keys) -> get the hit prefix -> put the missed full blocks

A `Recorder` keeps every operation's latency and bytes, every request's hits, and errors by gRPC
status code; `Recorder.result()` packs them into a `WorkerResult` of numpy arrays for the parent.
"""

from __future__ import annotations

import asyncio
import math
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol, TypeVar

import numpy as np
import torch

from kvstore.bench.presets import ModelPreset
from kvstore.client import (
    DType,
    KVClient,
    KVForm,
    KVLayout,
    KVStoreClientError,
    Namespace,
    PutOutcome,
    PutResult,
    TierKind,
)

T = TypeVar("T")

LOOKUP, GET, PUT, PIN, UNPIN = "lookup", "get", "put", "pin", "unpin"
# Report order; the workload's whole-unit operation ("turn", "request") comes last.
BLOCK_OPS = (LOOKUP, GET, PUT, PIN, UNPIN)


# -- layouts scaled to this machine -------------------------------------------------------------


def parse_scale(text: str) -> float:
    """'1/64', '0.015625' or '1' -> a factor in (0, 1]."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError) as error:
        raise ValueError(f"cannot read {text!r} as a scale; write e.g. 1/64 or 0.25") from error
    if not 0 < value <= 1:
        raise ValueError(f"scale must be in (0, 1], got {text}")
    return value


def scaled_layout(
    preset: ModelPreset, scale: float, block_tokens: int, *, num_layers: int | None = None
) -> KVLayout:
    """A bf16 layout with about ``scale`` times ``preset``'s KV bytes per token.

    The preset's layer count is kept (unless ``num_layers`` overrides it), because the store
    moves blocks layer by layer and the per-layer message count is part of the cost; the bytes
    of one token in one layer (``2 * heads * head_dim * 2``) shrink instead, keeping the
    preset's KV-head count where it divides. Below 4 bytes per token and layer (one bf16 K and
    one V) layers are dropped instead. The real bytes per token are `KVLayout.bytes_per_token`.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    layers = num_layers if num_layers is not None else preset.num_layers
    if layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {layers}")
    target_per_token = preset.kv_bytes_per_token * scale
    # Elements of K (and of V) per token and layer; bf16 K plus V is 4 bytes per element.
    elements = round(target_per_token / layers / 4)
    if elements < 1:
        layers, elements = max(1, round(target_per_token / 4)), 1
    heads = next(h for h in range(min(preset.num_kv_heads, elements), 0, -1) if elements % h == 0)
    return KVLayout(
        num_layers=layers,
        num_kv_heads=heads,
        head_dim=elements // heads,
        dtype=DType.BFLOAT16,
        block_tokens=block_tokens,
    )


def page_bytes_for(block_bytes: int, largest: int = 64 << 10) -> int:
    """The server page size that wastes nothing on ``block_bytes`` blocks (a power of two in
    [512, largest] dividing it where one exists)."""
    page = largest
    while page > 512 and block_bytes % page:
        page //= 2
    return page


class Payload:
    """Bytes to put: views of one random tensor of blocks, grown (doubling) when a put needs more.

    The content does not matter to the store, only its size; every put reuses the same memory.
    """

    def __init__(self, layout: KVLayout, seed: int = 0) -> None:
        self._layout = layout
        self._seed = seed
        self._blocks = torch.empty(
            (0, layout.num_layers, *layout.layer_shape), dtype=layout.dtype.torch_dtype
        )

    def blocks(self, num_blocks: int) -> torch.Tensor:
        """A ``[num_blocks, num_layers, 2, T, H, D]`` tensor (a view; do not keep it)."""
        if num_blocks > self._blocks.shape[0]:
            capacity = 1 << max(0, num_blocks - 1).bit_length()
            shape = (capacity, self._layout.num_layers, *self._layout.layer_shape)
            generator = torch.Generator().manual_seed(self._seed)
            nbytes = math.prod(shape) * self._layout.dtype.itemsize
            raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)
            self._blocks = raw.view(self._layout.dtype.torch_dtype).reshape(shape)
        return self._blocks[:num_blocks]


# -- what a worker records ------------------------------------------------------------------------


@dataclass
class WorkerResult:
    """Everything one worker measured, as arrays; times are seconds since the common start."""

    op_names: tuple[str, ...]
    op_kind: np.ndarray  # index into op_names, per operation
    op_start_s: np.ndarray
    op_latency_s: np.ndarray
    op_bytes: np.ndarray
    group_names: tuple[str, ...]
    request_group: np.ndarray  # index into group_names, per request (lookup + get + put)
    request_start_s: np.ndarray
    request_blocks: np.ndarray  # full (cacheable) blocks looked up
    request_lookup_hits: np.ndarray  # blocks the lookup matched
    request_hit_blocks: np.ndarray  # blocks the get served: what the request saved
    request_tokens: np.ndarray
    request_hit_tokens: np.ndarray
    tier_hit_blocks: dict[str, int]
    errors: dict[tuple[str, str], int]  # (operation, status code name) -> count
    put_outcomes: dict[str, int]
    schedule_lag_s: np.ndarray  # open loop: how late each unit started
    num_units_started: int
    num_units_cancelled: int
    max_unit_index: int  # highest unit index started (-1: none)
    # Every error as (seconds since the common start, operation, status code name).
    error_log: tuple[tuple[float, str, str], ...] = ()


@dataclass(frozen=True)
class ProgressSnapshot:
    """What the parent's progress bar shows for one worker."""

    num_requests: int
    num_errors: int
    num_blocks: int
    num_hit_blocks: int
    num_bytes: int
    num_units_started: int


class Recorder:
    """Collects one worker's samples. Not thread-safe: one event loop uses it."""

    def __init__(self, unit_op: str, zero: float) -> None:
        self.unit_op = unit_op
        self._zero = zero  # time.perf_counter() at the common start
        self._op_index: dict[str, int] = {}
        self._op_kind = array("B")
        self._op_start = array("d")
        self._op_latency = array("d")
        self._op_bytes = array("q")
        self._group_index: dict[str, int] = {}
        self._request: dict[str, array[float] | array[int]] = {
            "group": array("B"),
            "start": array("d"),
            "blocks": array("q"),
            "lookup_hits": array("q"),
            "hit_blocks": array("q"),
            "tokens": array("q"),
            "hit_tokens": array("q"),
        }
        self.tier_hit_blocks: Counter[str] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.error_log: list[tuple[float, str, str]] = []
        self.put_outcomes: Counter[str] = Counter()
        self.schedule_lag = array("d")
        self.num_units_started = 0
        self.num_units_cancelled = 0
        self.max_unit_index = -1
        self._num_bytes = 0
        self._num_blocks = 0
        self._num_hit_blocks = 0

    def now(self) -> float:
        """Seconds since the common start."""
        return time.perf_counter() - self._zero

    def sample(self, op: str, start_s: float, latency_s: float, nbytes: int = 0) -> None:
        kind = self._op_index.setdefault(op, len(self._op_index))
        self._op_kind.append(kind)
        self._op_start.append(start_s)
        self._op_latency.append(latency_s)
        self._op_bytes.append(nbytes)
        if op != self.unit_op:
            self._num_bytes += nbytes

    def error(self, op: str, error: KVStoreClientError) -> None:
        self.errors[(op, error.code.name)] += 1
        self.error_log.append((self.now(), op, error.code.name))

    async def measured(
        self, op: str, call: Awaitable[T], nbytes: int | Callable[[T], int] = 0
    ) -> T:
        """Await ``call``, recording its latency (or its error's status code) under ``op``.

        ``nbytes`` is the bytes moved, or a function of the result that gives them.
        """
        start = self.now()
        try:
            result = await call
        except KVStoreClientError as error:
            self.error(op, error)
            raise
        moved = nbytes(result) if callable(nbytes) else nbytes
        self.sample(op, start, self.now() - start, moved)
        return result

    def request(
        self,
        *,
        group: str,
        start_s: float,
        num_blocks: int,
        lookup_hits: int,
        hit_blocks: int,
        num_tokens: int,
        hit_tokens: int,
    ) -> None:
        values = {
            "group": self._group_index.setdefault(group, len(self._group_index)),
            "start": start_s,
            "blocks": num_blocks,
            "lookup_hits": lookup_hits,
            "hit_blocks": hit_blocks,
            "tokens": num_tokens,
            "hit_tokens": hit_tokens,
        }
        for name, value in values.items():
            self._request[name].append(value)  # type: ignore[arg-type]
        self._num_blocks += num_blocks
        self._num_hit_blocks += hit_blocks

    def snapshot(self) -> ProgressSnapshot:
        return ProgressSnapshot(
            num_requests=len(self._request["start"]),
            num_errors=sum(self.errors.values()),
            num_blocks=self._num_blocks,
            num_hit_blocks=self._num_hit_blocks,
            num_bytes=self._num_bytes,
            num_units_started=self.num_units_started,
        )

    def result(self) -> WorkerResult:
        req = {name: np.asarray(values) for name, values in self._request.items()}
        return WorkerResult(
            op_names=tuple(self._op_index),
            op_kind=np.asarray(self._op_kind, dtype=np.uint8),
            op_start_s=np.asarray(self._op_start, dtype=np.float64),
            op_latency_s=np.asarray(self._op_latency, dtype=np.float64),
            op_bytes=np.asarray(self._op_bytes, dtype=np.int64),
            group_names=tuple(self._group_index),
            request_group=req["group"].astype(np.uint8),
            request_start_s=req["start"].astype(np.float64),
            request_blocks=req["blocks"].astype(np.int64),
            request_lookup_hits=req["lookup_hits"].astype(np.int64),
            request_hit_blocks=req["hit_blocks"].astype(np.int64),
            request_tokens=req["tokens"].astype(np.int64),
            request_hit_tokens=req["hit_tokens"].astype(np.int64),
            tier_hit_blocks=dict(self.tier_hit_blocks),
            errors=dict(self.errors),
            put_outcomes=dict(self.put_outcomes),
            schedule_lag_s=np.asarray(self.schedule_lag, dtype=np.float64),
            num_units_started=self.num_units_started,
            num_units_cancelled=self.num_units_cancelled,
            max_unit_index=self.max_unit_index,
            error_log=tuple(self.error_log),
        )


# -- the workload protocol and the shared request ----------------------------------------------


@dataclass
class UnitContext:
    """What a running unit may use; one per worker, shared by its concurrent units."""

    client: KVClient
    recorder: Recorder
    payload: Payload
    deadline_s: float  # seconds since the common start; math.inf when unbounded
    worker_index: int
    num_workers: int

    def time_left(self) -> float:
        return self.deadline_s - self.recorder.now()

    async def sleep(self, seconds: float) -> bool:
        """Sleep ``seconds`` or until the deadline; False when the deadline cut it short."""
        left = self.time_left()
        await asyncio.sleep(max(0.0, min(seconds, left)))
        return seconds < left


class Workload(Protocol):
    """A picklable description of numbered units of work (see the module docstring)."""

    @property
    def name(self) -> str: ...

    @property
    def unit_name(self) -> str:
        """What one unit is called in reports ("session", "request")."""
        ...

    @property
    def unit_op(self) -> str:
        """The name the whole unit's latency is reported under ("turn", "request")."""
        ...

    @property
    def namespace(self) -> Namespace: ...

    def num_units(self) -> int | None:
        """How many units exist; None when the workload can make them forever."""
        ...

    def arrival_offsets_s(self) -> Sequence[float] | None:
        """Each unit's own arrival time (a trace's timestamps), or None."""
        ...

    def describe(self) -> dict[str, object]:
        """The workload's settings, for the report."""
        ...

    async def run_unit(self, index: int, context: UnitContext) -> None: ...


@dataclass(frozen=True)
class RequestOutcome:
    num_blocks: int
    hit_blocks: int


async def fetch_and_store(
    context: UnitContext, keys: list[bytes], *, num_tokens: int, group: str
) -> RequestOutcome | None:
    """One request: look ``keys`` up, get the hit prefix, put the blocks after it.

    ``keys`` are the request's full blocks only (a partial last block is never stored). Hits
    are the blocks the get served, which can be fewer than the lookup matched if blocks were
    evicted in between: those the request recomputes and puts again. The whole request is
    recorded under the workload's unit operation. On a gRPC error the request is recorded as
    failed under that status code and None is returned; the caller carries on.
    """
    recorder, client = context.recorder, context.client
    layout = client.namespace.layout
    start = recorder.now()
    moved = 0
    try:
        matched, served = 0, 0
        tiers: tuple[TierKind, ...] = ()
        if keys:
            match = await recorder.measured(LOOKUP, client.lookup_keys(keys))
            matched, tiers = match.num_matched, match.tiers
        if matched:
            served = await recorder.measured(
                GET, _get(client, keys[:matched]), lambda num: num * layout.block_bytes
            )
            moved += served * layout.block_bytes
        missed = keys[served:]
        if missed:
            result = await recorder.measured(
                PUT,
                client.put_blocks(
                    missed,
                    context.payload.blocks(len(missed)),
                    parent_key=keys[served - 1] if served else b"",
                    form=KVForm.BLOCKS,
                ),
                lambda result: _bytes_reaching_a_server(result, layout.block_bytes),
            )
            recorder.put_outcomes.update(outcome.name for outcome in result.outcomes)
            moved += _bytes_reaching_a_server(result, layout.block_bytes)
    except KVStoreClientError as error:
        recorder.error(recorder.unit_op, error)
        return None
    for tier in tiers[:served]:
        recorder.tier_hit_blocks[tier.name] += 1
    recorder.sample(recorder.unit_op, start, recorder.now() - start, moved)
    recorder.request(
        group=group,
        start_s=start,
        num_blocks=len(keys),
        lookup_hits=matched,
        hit_blocks=served,
        num_tokens=num_tokens,
        hit_tokens=served * layout.block_tokens,
    )
    return RequestOutcome(num_blocks=len(keys), hit_blocks=served)


async def _get(client: KVClient, keys: list[bytes]) -> int:
    # Layer by layer into fresh per-layer tensors, not into one context-sized buffer per
    # in-flight request: a 128K-token context would otherwise pin its whole size per session.
    num_blocks = 0
    async for arrival in client.iter_layers(keys, form=KVForm.BLOCKS):
        num_blocks = arrival.num_blocks
    return num_blocks


def _bytes_reaching_a_server(result: PutResult, block_bytes: int) -> int:
    """A put's bytes that a server received: a cluster client does not send the blocks
    of a node it cannot reach (NODE_UNREACHABLE), and they must not count as moved."""
    sent = sum(outcome is not PutOutcome.NODE_UNREACHABLE for outcome in result.outcomes)
    return sent * block_bytes
