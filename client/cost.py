"""Fetch or recompute: how much of a stored prefix is worth loading.

A worker that finds ``num_matched`` blocks of its prompt stored can load them, or recompute their
tokens in its own prefill. Loading takes ``overhead + bytes / bandwidth``; recomputing takes
``tokens / prefill rate``. `plan_fetch` loads the longest prefix whose fetch finishes no later than
recomputing that same prefix would, so a store never makes a turn slower than no store at all.

The bandwidth comes from a `BandwidthMeter` the client feeds with every get it serves (per node
and tier); the prefill rate from a `PrefillModel`, configured or measured by the worker. With no
bandwidth sample and no configured prior the plan recomputes: an unmeasured store is not trusted.

Prefill cost is taken as linear in tokens (``tokens_per_s``): the fixed per-forward cost is paid
whether the prefix is fetched or not (the suffix, at least one token, is always computed), so it
never enters the decision. Attention makes long prefixes cost more per token than that; the linear
rate, measured at the context length served, is the part that matters here.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

NodeTier = tuple[str, str]


class BandwidthMeter:
    """A moving measure of the bytes per second gets deliver, per ``(node, tier)``.

    Each sample (``nbytes`` moved in ``seconds``) is weighted by ``2 ** (-age / half_life_s)``,
    and the rate is ``sum(weight * bytes) / sum(weight * seconds)``: a byte-weighted throughput
    that equals total bytes over total seconds while samples are fresh and forgets old ones with
    the given half-life. Transfers smaller than ``min_bytes`` are dominated by per-call latency;
    they are pooled per key until ``min_bytes`` have accumulated, then count as one sample.

    Safe to call from several threads (the sync client's loop thread observes, callers read).
    """

    def __init__(
        self,
        *,
        half_life_s: float = 30.0,
        min_bytes: int = 64 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(half_life_s) and half_life_s > 0):
            raise ValueError(f"half_life_s must be a positive number, got {half_life_s!r}")
        if min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, got {min_bytes!r}")
        self._half_life_s = half_life_s
        self._min_bytes = min_bytes
        self._clock = clock
        self._lock = threading.Lock()
        # (node, tier) -> [decayed bytes, decayed seconds, time of last decay]
        self._sums: dict[NodeTier, list[float]] = {}
        # (node, tier) -> [pooled bytes, pooled seconds] of transfers below min_bytes
        self._pending: dict[NodeTier, list[float]] = {}

    @property
    def half_life_s(self) -> float:
        return self._half_life_s

    def observe(self, nbytes: int, seconds: float, *, node: str = "", tier: str = "") -> None:
        """Record that ``nbytes`` arrived in ``seconds`` from ``node``'s ``tier``."""
        if nbytes < 0 or not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"need nbytes >= 0 and seconds >= 0, got {nbytes!r}, {seconds!r}")
        if nbytes == 0:
            return
        key = (node, tier)
        with self._lock:
            pending = self._pending.setdefault(key, [0.0, 0.0])
            pending[0] += nbytes
            pending[1] += seconds
            # A sample with no measurable time says nothing about a rate; keep pooling.
            if pending[0] < self._min_bytes or pending[1] <= 0:
                return
            sample_bytes, sample_s = pending
            del self._pending[key]
            now = self._clock()
            sums = self._sums.get(key)
            if sums is None:
                self._sums[key] = [sample_bytes, sample_s, now]
                return
            self._decay(sums, now)
            sums[0] += sample_bytes
            sums[1] += sample_s

    def rate(self, *, node: str | None = None, tier: str | None = None) -> float | None:
        """Bytes/s delivered by ``node`` (None: any) from ``tier`` (None: any); None, no sample.

        Pooling over several keys weighs each by its bytes: the rate a mixed workload saw.
        """
        now = self._clock()
        total_bytes = total_s = 0.0
        with self._lock:
            for (key_node, key_tier), sums in self._sums.items():
                if node is not None and key_node != node:
                    continue
                if tier is not None and key_tier != tier:
                    continue
                self._decay(sums, now)
                total_bytes += sums[0]
                total_s += sums[1]
        if total_s <= 0:
            return None
        return total_bytes / total_s

    def snapshot(self) -> dict[NodeTier, float]:
        """The rate of every ``(node, tier)`` with a sample."""
        with self._lock:
            keys = list(self._sums)
        found = {key: self.rate(node=key[0], tier=key[1]) for key in keys}
        return {key: rate for key, rate in found.items() if rate is not None}

    def _decay(self, sums: list[float], now: float) -> None:
        age = now - sums[2]
        if age > 0:
            factor = 0.5 ** (age / self._half_life_s)
            sums[0] *= factor
            sums[1] *= factor
            sums[2] = now


@dataclass(frozen=True)
class PrefillModel:
    """The model's prefill rate: ``fixed_s + num_tokens / tokens_per_s`` per forward."""

    tokens_per_s: float
    fixed_s: float = 0.0  # per-forward overhead

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tokens_per_s) and self.tokens_per_s > 0):
            raise ValueError(f"tokens_per_s must be a positive number, got {self.tokens_per_s!r}")
        if not (math.isfinite(self.fixed_s) and self.fixed_s >= 0):
            raise ValueError(f"fixed_s must be >= 0, got {self.fixed_s!r}")

    def seconds(self, num_tokens: int) -> float:
        """Seconds one forward over ``num_tokens`` new tokens takes."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens!r}")
        return self.fixed_s + num_tokens / self.tokens_per_s

    def marginal_seconds(self, num_tokens: int) -> float:
        """What ``num_tokens`` more tokens add to a forward that runs anyway."""
        return self.seconds(num_tokens) - self.fixed_s

    @classmethod
    def measured(cls, num_tokens: int, seconds: float) -> PrefillModel:
        """The rate of one timed prefill of ``num_tokens`` tokens, its overhead folded in."""
        if num_tokens <= 0 or not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(
                f"a measured prefill needs num_tokens > 0 and seconds > 0, "
                f"got {num_tokens!r}, {seconds!r}"
            )
        return cls(tokens_per_s=num_tokens / seconds)

    @classmethod
    def from_flops(cls, *, flops_per_token: float, flops_per_s: float) -> PrefillModel:
        """The rate of a part that achieves ``flops_per_s`` on ``flops_per_token`` per token."""
        for name, value in (("flops_per_token", flops_per_token), ("flops_per_s", flops_per_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        return cls(tokens_per_s=flops_per_s / flops_per_token)


@dataclass(frozen=True)
class FetchPlan:
    """How much of a match to load, and why."""

    num_load_blocks: int  # prefix of the match to load (0..matched)
    fetch_s: float  # predicted time to fetch those blocks
    recompute_s: float  # predicted time to recompute those blocks' tokens instead
    reason: str  # "fetch", "fetch prefix: ...", "recompute: no bandwidth sample", ...
    # The whole match, for reports: None when a block's rate is unknown.
    match_fetch_s: float | None = None
    match_recompute_s: float = 0.0

    @property
    def saved_s(self) -> float:
        """Predicted prefill time the plan saves against recomputing (0 when it loads nothing)."""
        return self.recompute_s - self.fetch_s


def plan_fetch(
    *,
    num_matched_blocks: int,
    block_bytes: int,
    block_tokens: int,
    bandwidth_bytes_per_s: float | None,
    prefill: PrefillModel,
    per_fetch_overhead_s: float = 0.0,
    bandwidth_source: str = "",
) -> FetchPlan:
    """Load the longest prefix of the match whose fetch is no slower than recomputing it.

    One bandwidth for every block: the fetch grows by the same step per block, so the answer is
    all of the match or none of it (small matches recompute when ``per_fetch_overhead_s`` is more
    than what they save). ``bandwidth_bytes_per_s`` None (no sample, no configured prior) plans a
    recompute. ``bandwidth_source`` ("measured", "configured prior") is named in the reason.
    See `plan_fetch_blocks` for blocks served at different rates.
    """
    _require_ints(0, num_matched_blocks=num_matched_blocks)
    return plan_fetch_blocks(
        block_bandwidths=[bandwidth_bytes_per_s] * num_matched_blocks,
        block_bytes=block_bytes,
        block_tokens=block_tokens,
        prefill=prefill,
        per_fetch_overhead_s=per_fetch_overhead_s,
        bandwidth_source=bandwidth_source,
    )


def plan_fetch_blocks(
    *,
    block_bandwidths: Sequence[float | None],
    block_bytes: int,
    block_tokens: int,
    prefill: PrefillModel,
    per_fetch_overhead_s: float = 0.0,
    bandwidth_source: str = "",
) -> FetchPlan:
    """`plan_fetch` for a match whose blocks come at their own rates (e.g. per tier).

    ``block_bandwidths[i]`` is the rate block ``i`` is expected to arrive at (None: unknown).
    Blocks load in chain order, so an unknown rate ends what may be fetched. The plan is the
    longest prefix ``k`` with ``overhead + sum(block_bytes / bw[:k]) <= k * recompute(block)``:
    a fast DRAM head may load while a slow SSD tail is recomputed.
    """
    _require_ints(1, block_bytes=block_bytes, block_tokens=block_tokens)
    if not (math.isfinite(per_fetch_overhead_s) and per_fetch_overhead_s >= 0):
        raise ValueError(f"per_fetch_overhead_s must be >= 0, got {per_fetch_overhead_s!r}")
    if not block_bandwidths:
        return FetchPlan(0, 0.0, 0.0, "recompute: nothing matched")

    recompute_block_s = prefill.marginal_seconds(block_tokens)
    best = 0
    fetch_s = per_fetch_overhead_s
    best_fetch_s = 0.0
    num_known = 0
    for index, bandwidth in enumerate(block_bandwidths):
        if bandwidth is None:
            break
        if not (bandwidth > 0):
            raise ValueError(f"a bandwidth must be positive, got {bandwidth!r} for block {index}")
        num_known += 1
        fetch_s += block_bytes / bandwidth
        if fetch_s <= (index + 1) * recompute_block_s:
            best, best_fetch_s = index + 1, fetch_s

    num_matched = len(block_bandwidths)
    match_fetch_s = fetch_s if num_known == num_matched else None
    match_recompute_s = num_matched * recompute_block_s
    source = f" ({bandwidth_source} bandwidth)" if bandwidth_source else ""
    if best == 0:
        if num_known == 0:
            reason = "recompute: no bandwidth sample and no configured prior"
        else:
            reason = (
                f"recompute: fetching {num_known} block(s) takes {fetch_s * 1e3:.3g} ms{source}, "
                f"recomputing them {num_known * recompute_block_s * 1e3:.3g} ms"
            )
        return FetchPlan(0, 0.0, 0.0, reason, match_fetch_s, match_recompute_s)
    if best == num_matched:
        reason = f"fetch{source}"
    else:
        reason = f"fetch prefix: {best} of {num_matched} blocks{source}"
    return FetchPlan(
        best, best_fetch_s, best * recompute_block_s, reason, match_fetch_s, match_recompute_s
    )


def break_even_bandwidth(*, block_bytes: int, block_tokens: int, prefill: PrefillModel) -> float:
    """Bytes/s above which fetching a block beats recomputing it (no per-fetch overhead).

    Fetch takes ``block_bytes / BW``, recompute ``block_tokens / tokens_per_s``; they are equal at
    ``BW* = block_bytes * tokens_per_s / block_tokens``: the KV bytes per token times the prefill
    rate. Neither the prefix length nor the tier enters.
    """
    _require_ints(1, block_bytes=block_bytes, block_tokens=block_tokens)
    return block_bytes * prefill.tokens_per_s / block_tokens


def _require_ints(minimum: int, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
