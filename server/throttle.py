"""A read throttle per tier (`[store] read_bytes_per_s`, `--throttle-read`): emulates a slower
tier or network, so that fetch-or-recompute can be seen on both sides of break-even.

Each throttled tier has one token bucket that every get reading from it shares, on both
transports. A get pays for each message before it is sent; the bucket may go into debt, and
the payer sleeps (asyncio, never blocking the event loop) until the debt is repaid. Payments
queue in the order they were made, so concurrent gets share the rate. Moving ``N`` bytes
from a full bucket takes at least ``(N - burst) / rate`` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from kvstore.enums import TierKind

# The bucket holds this many seconds of its rate: small, so a transfer cannot outrun the
# rate by more than a few milliseconds' worth of bytes.
BURST_S = 0.005


class TokenBucket:
    """``rate_bytes_per_s`` sustained, up to ``burst_bytes`` at once."""

    def __init__(
        self,
        rate_bytes_per_s: float,
        *,
        burst_bytes: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate_bytes_per_s > 0:
            raise ValueError(f"a throttle rate must be positive, got {rate_bytes_per_s!r}")
        self.rate_bytes_per_s = rate_bytes_per_s
        self.burst_bytes = rate_bytes_per_s * BURST_S if burst_bytes is None else burst_bytes
        self._clock = clock
        self._tokens = self.burst_bytes
        self._updated = clock()

    def charge(self, nbytes: float) -> float:
        """Take ``nbytes`` now; the seconds to wait before using them (0: none)."""
        now = self._clock()
        refill = (now - self._updated) * self.rate_bytes_per_s
        self._tokens = min(self.burst_bytes, self._tokens + refill)
        self._updated = now
        self._tokens -= nbytes
        return -self._tokens / self.rate_bytes_per_s if self._tokens < 0 else 0.0


class ReadThrottle:
    """The buckets of the throttled tiers; a tier without one reads at full speed."""

    def __init__(self, rates: Mapping[TierKind, float]) -> None:
        self._buckets = {kind: TokenBucket(rate) for kind, rate in rates.items() if rate}

    @property
    def enabled(self) -> bool:
        return bool(self._buckets)

    async def pace(self, tiers: Sequence[TierKind], nbytes: int) -> None:
        """Pay for a get message of ``nbytes`` whose blocks came from ``tiers`` (one per
        block of the get), then wait until every tier it read from allows it.

        A message's bytes are credited to each tier by its share of the get's blocks: gets
        go layer by layer over every block, so over each layer this is exact.
        """
        if not self._buckets or not tiers or nbytes <= 0:
            return
        wait_s = 0.0
        for kind, count in Counter(tiers).items():
            bucket = self._buckets.get(kind)
            if bucket is not None:
                # Each tier's bucket holds its own rate; the message waits for the slowest.
                wait_s = max(wait_s, bucket.charge(nbytes * count / len(tiers)))
        if wait_s > 0:
            await asyncio.sleep(wait_s)
