"""Whether a get asks the server for lz4 on the wire (ClientOptions.wire_compression).

"lz4" always asks, "off" never does, and "auto" asks where the measured rates say it
pays. First a model: a raw get streams in ``raw / link``, a compressed one in about
``max(raw / (ratio * link), raw / encode) + raw / decode`` (the server encodes the next
message while the link carries the last; this client decodes on its loop, between
reads), and auto asks when the first exceeds the second by `margin`. Which needs a link
slower than the codec and data that shrink.

Then the verdict of the gets themselves: once both a raw and a compressed get have
run within `VERDICT_S`, auto asks only if the compressed ones delivered more raw
bytes per second, by `VERDICT_MARGIN`. That catches what the model misses: on loopback
the "link" is the same CPUs the codec runs on. A verdict ages out, so a decision is
tried again.

The rates, per client (so per server node):

- link: bytes received per second by gets of at least 1 MiB on the wire, less the time
  spent decoding;
- ratio, decode: from the compressed replies received, and before any from a probe;
- encode (and first ratio and decode): a probe, on this client, of lz4 over a sample of
  a received reply (its first `SAMPLE_BYTES`), taken at first use and again after
  `PROBE_EVERY_S`;
- delivered: raw bytes per second of gets of at least 1 MiB, raw gets and gets that
  asked for compression apart.

Through shared memory a get never asks (the daemon would not compress there either).
A server from before the field answers INVALID_ARGUMENT: the get is sent again without
it (`open_get_stream`), and auto stops asking that server for `UNSUPPORTED_RETRY_S`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from kvstore.client._errors import InvalidArgument
from kvstore.client._receive import WireStats
from kvstore.client._transport import BlockTransport, GetStream
from kvstore.client.cost import BandwidthMeter
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import GetMessage
from kvstore.wire.compression import LZ4_SHUFFLE, WireEncoder, decode_wire_data

WireCompressionMode = Literal["auto", "off", "lz4"]
WIRE_COMPRESSION_MODES: tuple[WireCompressionMode, ...] = ("auto", "off", "lz4")
# Auto tries lz4 when a raw get is expected to take (1 + margin) times a compressed one.
DEFAULT_MARGIN = 0.2
# What recent gets that asked for lz4 must deliver over raw ones for auto to keep asking
# (single gets on a busy host vary by more than the model's margin).
VERDICT_MARGIN = 0.25
PROBE_EVERY_S = 60.0
# Gets of fewer bytes on the wire are not samples of the link: their time is mostly
# fixed costs (request, lookup), which compression cannot cut.
MIN_SAMPLE_BYTES = 1 << 20
UNSUPPORTED_RETRY_S = 300.0
VERDICT_S = 60.0
_RECENT = 8
# How much of the weight of earlier ratio and decode samples a new one leaves.
_KEEP = 0.75
# What a server that predates `wire_compression` says (kvstore.wire.namespace).
_UNKNOWN_FIELD = "GetBlocksRequest has unknown field number(s) [4]"


@dataclass(frozen=True, slots=True)
class WireRates:
    """What auto decides from: bytes per second (None: not measured yet) and the ratio."""

    link: float | None
    encode: float | None
    decode: float | None
    ratio: float | None  # raw bytes / bytes on the wire, of gets that asked
    # Raw bytes per second of recent gets, raw and asking for lz4 (the verdict).
    delivered_raw: float | None = None
    delivered_lz4: float | None = None

    def pays(self, margin: float) -> bool:
        """Whether a compressed get is expected to beat a raw one by `margin`."""
        link, encode, decode, ratio = self.link, self.encode, self.decode, self.ratio
        if link is None or encode is None or decode is None or ratio is None:
            return False
        raw_s = 1.0 / link
        compressed_s = max(1.0 / (ratio * link), 1.0 / encode) + 1.0 / decode
        return compressed_s * (1.0 + margin) < raw_s

    def verdict(self, margin: float = VERDICT_MARGIN) -> bool | None:
        """Whether recent gets that asked for lz4 beat recent raw ones by `margin`;
        None: not both measured."""
        if self.delivered_raw is None or self.delivered_lz4 is None:
            return None
        return self.delivered_lz4 > self.delivered_raw * (1.0 + margin)


class _Recent:
    """Bytes per second of the samples of the last `VERDICT_S` (at most `_RECENT`)."""

    def __init__(self) -> None:
        self._samples: list[tuple[float, float, float]] = []  # (bytes, seconds, at)

    def add(self, nbytes: float, seconds: float, at: float) -> None:
        self._samples = [*self._samples[-(_RECENT - 1) :], (nbytes, seconds, at)]

    def rate(self, now: float) -> float | None:
        fresh = [sample for sample in self._samples if now - sample[2] < VERDICT_S]
        seconds = sum(sample[1] for sample in fresh)
        return sum(sample[0] for sample in fresh) / seconds if seconds > 0 else None


class _Average:
    """sum(weight * numerator) / sum(weight * denominator), older samples weighing less."""

    def __init__(self) -> None:
        self._sums = [0.0, 0.0]

    def add(self, numerator: float, denominator: float) -> None:
        self._sums = [self._sums[0] * _KEEP + numerator, self._sums[1] * _KEEP + denominator]

    def value(self) -> float | None:
        return self._sums[0] / self._sums[1] if self._sums[1] > 0 else None


class WireCompressionPolicy:
    """Decides, get by get, whether to ask for compression; fed by each finished get."""

    def __init__(
        self,
        mode: WireCompressionMode,
        element_bytes: int,
        *,
        margin: float = DEFAULT_MARGIN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in WIRE_COMPRESSION_MODES:
            raise ValueError(f"wire_compression must be one of {WIRE_COMPRESSION_MODES}")
        self.mode = mode
        self._element_bytes = element_bytes
        self._margin = margin
        self._clock = clock
        self._lock = threading.Lock()
        self._link = BandwidthMeter()
        self._ratio = _Average()
        self._decode = _Average()
        self._encode = _Average()
        self._delivered = {False: _Recent(), True: _Recent()}  # by: compression was asked
        self._probed_at: float | None = None
        self._unsupported_until = -math.inf

    @property
    def rates(self) -> WireRates:
        now = self._clock()
        with self._lock:
            return WireRates(
                self._link.rate(),
                self._encode.value(),
                self._decode.value(),
                self._ratio.value(),
                self._delivered[False].rate(now),
                self._delivered[True].rate(now),
            )

    def ask(self) -> bool:
        """Whether the next get asks for LZ4_SHUFFLE."""
        if self.mode == "off" or self._clock() < self._unsupported_until:
            return False
        if self.mode == "lz4":
            return True
        rates = self.rates
        if not rates.pays(self._margin):
            return False
        verdict = rates.verdict()
        return True if verdict is None else verdict

    def wants_sample(self) -> bool:
        """Whether the next get should keep a sample of its bytes for a probe."""
        if self.mode != "auto":
            return False
        return self._probed_at is None or self._clock() - self._probed_at >= PROBE_EVERY_S

    def mark_unsupported(self) -> None:
        """The server does not know the field: stop asking it for a while."""
        self._unsupported_until = self._clock() + UNSUPPORTED_RETRY_S

    def observe(self, stats: WireStats, seconds: float, asked: bool) -> None:
        """A finished get of `seconds` (`asked`: it asked for compression): its bytes
        and its decoding."""
        sample = stats.wire_bytes >= MIN_SAMPLE_BYTES and seconds > 0
        with self._lock:
            if sample:
                self._delivered[asked].add(stats.raw_bytes, seconds, self._clock())
            if stats.compressed_raw_bytes:
                self._ratio.add(stats.raw_bytes, stats.wire_bytes)
                if stats.decode_s > 0:
                    self._decode.add(stats.compressed_raw_bytes, stats.decode_s)
            link_s = seconds - stats.decode_s
            if sample and link_s > 0:
                self._link.observe(stats.wire_bytes, link_s)
        if stats.sample:
            self.probe(stats.sample)

    def probe(self, sample: bytes) -> None:
        """Measure lz4 on `sample` (raw layer bytes): encode, decode and ratio."""
        self._probed_at = self._clock()
        encoder = WireEncoder(self._element_bytes, min_saving=0.0)
        started = time.perf_counter()
        compression, raw_bytes, parts = encoder.encode([sample])
        encoded_s = time.perf_counter() - started
        if compression != LZ4_SHUFFLE:  # grew: lz4 would send it raw
            with self._lock:
                self._ratio.add(len(sample), len(sample))
                self._encode.add(len(sample), encoded_s)
            return
        started = time.perf_counter()
        decode_wire_data(compression, parts[0], raw_bytes, self._element_bytes, raw_bytes)
        decoded_s = time.perf_counter() - started
        with self._lock:
            self._ratio.add(raw_bytes, len(parts[0]))
            if encoded_s > 0:
                self._encode.add(raw_bytes, encoded_s)
            if decoded_s > 0:
                self._decode.add(raw_bytes, decoded_s)


class _FirstThenRest:
    """A get stream whose first reply was read ahead (to see whether the server took the
    request)."""

    def __init__(self, first: GetMessage, stream: GetStream, iterator: AsyncIterator[GetMessage]):
        self._first: GetMessage | None = first
        self._stream = stream
        self._iterator = iterator

    def __aiter__(self) -> _FirstThenRest:
        return self

    async def __anext__(self) -> GetMessage:
        first, self._first = self._first, None
        if first is not None:
            return first
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _Empty:
    def __aiter__(self) -> _Empty:
        return self

    async def __anext__(self) -> GetMessage:
        raise StopAsyncIteration

    async def aclose(self) -> None:
        return None


async def open_get_stream(
    transport: BlockTransport,
    request: pb.GetBlocksRequest,
    timeout_s: float,
    policy: WireCompressionPolicy,
) -> GetStream:
    """The get's replies; a request that asks for compression is sent again without
    it if the server does not know the field."""
    stream = await transport.open_get(request, timeout_s)
    if not request.wire_compression:
        return stream
    iterator = aiter(stream)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        await stream.aclose()
        return _Empty()
    except InvalidArgument as error:
        await stream.aclose()
        if _UNKNOWN_FIELD not in str(error):
            raise
        policy.mark_unsupported()
        plain = pb.GetBlocksRequest()
        plain.CopyFrom(request)
        plain.ClearField("wire_compression")
        return await transport.open_get(plain, timeout_s)
    except BaseException:
        await stream.aclose()
        raise
    return _FirstThenRest(first, stream, iterator)
