"""Mooncake (FAST'25) request traces: loading, cache hit-rate prediction, block keys.

Each JSONL line is one request::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, ...]}

``timestamp`` is the arrival time in milliseconds; each hash id stands for one block of
``block_tokens`` (512) prompt tokens and is chained: equal ids mean equal blocks *and* equal
prefixes before them. The last block is partial when ``input_length`` is not a multiple of the
block size; a partial block is never stored, so it never hits.

Everything here is pure: the network replay lives elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

BLOCK_TOKENS = 512
_MAX_HASH_ID = 2**64 - 1  # block keys encode the id as a u64
_KEY_DOMAIN = b"kvstore.bench.trace.v1\x00"
_KEY_BYTES = 16


class TraceFormatError(ValueError):
    """A trace line that is not a valid request; the message names the file and line number."""

    def __init__(self, path: str, line_number: int, reason: str) -> None:
        # Line 0: the file itself (it could not be opened or read).
        where = f"{path}:{line_number}" if line_number else path
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.line_number = line_number
        self.reason = reason


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def full_block_ids(self, block_tokens: int = BLOCK_TOKENS) -> tuple[int, ...]:
        """The ids of the blocks that hold ``block_tokens`` tokens (the cacheable ones)."""
        return self.hash_ids[: self.input_length // block_tokens]


@dataclass(frozen=True)
class CacheHitStats:
    """Prefix-cache hits over a trace.

    ``num_blocks`` counts every block looked up, partial ones included; ``num_cacheable_blocks``
    only the full ones, which are all a cache can ever return. ``block_hit_rate`` is over the
    cacheable blocks, ``token_hit_rate`` over all input tokens (the share of prefill saved).
    """

    num_requests: int
    num_blocks: int
    num_cacheable_blocks: int
    num_hit_blocks: int
    num_tokens: int
    num_hit_tokens: int
    num_unique_blocks: int
    num_evicted_blocks: int
    capacity_blocks: int | None

    @property
    def block_hit_rate(self) -> float:
        """Hit blocks / full blocks looked up (0 for an empty trace)."""
        return self.num_hit_blocks / self.num_cacheable_blocks if self.num_cacheable_blocks else 0.0

    @property
    def token_hit_rate(self) -> float:
        """Hit tokens / input tokens (0 for an empty trace)."""
        return self.num_hit_tokens / self.num_tokens if self.num_tokens else 0.0


def load_trace(
    path: str | os.PathLike[str], *, block_tokens: int = BLOCK_TOKENS
) -> list[TraceRequest]:
    """Read a Mooncake JSONL trace, in file order; blank lines are skipped.

    Raises `TraceFormatError` (naming the 1-based line) for a line that is not a JSON object with
    a non-negative numeric ``timestamp``, integer ``input_length >= 1`` and ``output_length >= 0``,
    and ``ceil(input_length / block_tokens)`` non-negative integer ``hash_ids``.
    """
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    name = os.fspath(path)
    requests = []
    line_number = 0
    try:
        with open(path, encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceFormatError(name, line_number, f"invalid JSON: {exc.msg}") from exc
                try:
                    requests.append(_parse_request(record, block_tokens))
                except ValueError as exc:
                    raise TraceFormatError(name, line_number, str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise TraceFormatError(name, line_number + 1, f"not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise TraceFormatError(name, 0, f"cannot read the trace: {exc.strerror or exc}") from exc
    return requests


def _parse_request(record: Any, block_tokens: int) -> TraceRequest:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [
        k for k in ("timestamp", "input_length", "output_length", "hash_ids") if k not in record
    ]
    if missing:
        raise ValueError(f"missing field(s): {', '.join(missing)}")
    timestamp = record["timestamp"]
    if (
        not isinstance(timestamp, int | float)
        or isinstance(timestamp, bool)
        or not math.isfinite(timestamp)
        or timestamp < 0
    ):
        raise ValueError(f"timestamp must be a non-negative number, got {timestamp!r}")
    input_length = _int_field(record, "input_length", minimum=1)
    output_length = _int_field(record, "output_length", minimum=0)
    hash_ids = record["hash_ids"]
    if not isinstance(hash_ids, list):
        raise ValueError(f"hash_ids must be a list, got {type(hash_ids).__name__}")
    for hash_id in hash_ids:
        if not _is_int(hash_id) or not 0 <= hash_id <= _MAX_HASH_ID:
            raise ValueError(f"hash_ids must be integers in [0, 2**64), got {hash_id!r}")
    expected = -(-input_length // block_tokens)
    if len(hash_ids) != expected:
        raise ValueError(
            f"input_length {input_length} needs {expected} hash_ids of {block_tokens} tokens, "
            f"got {len(hash_ids)}"
        )
    return TraceRequest(float(timestamp), input_length, output_length, tuple(hash_ids))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(record: dict[str, Any], key: str, *, minimum: int) -> int:
    value = record[key]
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def infinite_cache_hit_rate(
    requests: Iterable[TraceRequest], block_tokens: int = BLOCK_TOKENS
) -> CacheHitStats:
    """Hits with an unbounded cache that stores every full block of every request.

    Requests are taken in order. A request hits the longest prefix of its full blocks that earlier
    requests stored; since ids are chained, the first miss ends the hit even if later ids were
    seen. Hit tokens are hit blocks times ``block_tokens``.
    """
    return _simulate(requests, None, block_tokens)


def lru_cache_hit_rate(
    requests: Iterable[TraceRequest], capacity_blocks: int, block_tokens: int = BLOCK_TOKENS
) -> CacheHitStats:
    """Hits with an LRU cache of ``capacity_blocks`` blocks, evicting chain tails first.

    After each request its full blocks are touched from tail to head, so a chain's head is always
    more recent than its tail (and than any child another request hangs off it): eviction takes
    tails first and never strands a child without its parent. A request longer than the cache
    keeps only its first ``capacity_blocks`` blocks. With ``capacity_blocks`` at least the number
    of unique blocks this equals `infinite_cache_hit_rate`.
    """
    if capacity_blocks <= 0:
        raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
    return _simulate(requests, capacity_blocks, block_tokens)


def _simulate(
    requests: Iterable[TraceRequest], capacity_blocks: int | None, block_tokens: int
) -> CacheHitStats:
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    cache: OrderedDict[int, None] = OrderedDict()  # least recently used first
    seen: set[int] = set()
    num_requests = num_blocks = num_cacheable = num_hits = num_tokens = num_evicted = 0
    for request in requests:
        blocks = request.full_block_ids(block_tokens)
        hits = _hit_prefix_length(blocks, cache)
        num_requests += 1
        num_blocks += len(request.hash_ids)
        num_cacheable += len(blocks)
        num_hits += hits
        num_tokens += request.input_length
        seen.update(blocks)

        kept = list(dict.fromkeys(blocks))
        if capacity_blocks is not None:
            kept = kept[:capacity_blocks]
            # Make room before inserting, and only at the expense of other requests' blocks:
            # touching this request's resident blocks first moves them out of eviction's way.
            for block_id in kept:
                if block_id in cache:
                    cache.move_to_end(block_id)
            num_new = sum(1 for block_id in kept if block_id not in cache)
            for _ in range(len(cache) + num_new - capacity_blocks):
                cache.popitem(last=False)
                num_evicted += 1
        for block_id in reversed(kept):
            cache[block_id] = None
            cache.move_to_end(block_id)
    return CacheHitStats(
        num_requests=num_requests,
        num_blocks=num_blocks,
        num_cacheable_blocks=num_cacheable,
        num_hit_blocks=num_hits,
        num_tokens=num_tokens,
        num_hit_tokens=num_hits * block_tokens,
        num_unique_blocks=len(seen),
        num_evicted_blocks=num_evicted,
        capacity_blocks=capacity_blocks,
    )


def _hit_prefix_length(blocks: Sequence[int], cache: OrderedDict[int, None]) -> int:
    for index, block_id in enumerate(blocks):
        if block_id not in cache:
            return index
    return len(blocks)


def block_keys_for_request(request: TraceRequest, namespace_salt: bytes) -> list[bytes]:
    """One stable 16-byte key per hash id of ``request`` (partial last block included).

    ``key = SHA-256(domain || len(salt) as u32 || salt || hash_id as u64, little-endian)[:16]``:
    the same id gives the same key in every request and process, and different salts give
    disjoint key sets, so replays into one store do not see each other's blocks.
    """
    prefix = hashlib.sha256(_KEY_DOMAIN)
    prefix.update(len(namespace_salt).to_bytes(4, "little"))
    prefix.update(namespace_salt)
    keys = []
    for hash_id in request.hash_ids:
        hasher = prefix.copy()
        hasher.update(hash_id.to_bytes(8, "little"))
        keys.append(hasher.digest()[:_KEY_BYTES])
    return keys
