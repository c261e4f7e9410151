"""When a get asks for lz4 on the wire: "off" never, "lz4" always, and "auto" where the
rates it measured say a compressed get beats a raw one by its margin."""

from __future__ import annotations

import pytest
import torch
from metered_blocks import FakeClock  # tests/metered_blocks.py

from kvstore.client import ClientOptions
from kvstore.client._receive import WireStats
from kvstore.client._wire_compression import (
    PROBE_EVERY_S,
    UNSUPPORTED_RETRY_S,
    WireCompressionPolicy,
    WireRates,
)

GB = 1e9
MiB = 1 << 20


def smooth(nbytes: int) -> bytes:
    values = torch.rand(nbytes // 2, generator=torch.Generator().manual_seed(0)) * 0.2 + 1.0
    return values.to(torch.float16).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize(
    ("rates", "pays"),
    [
        (WireRates(link=0.1 * GB, encode=1 * GB, decode=3 * GB, ratio=2.0), True),
        (WireRates(link=2 * GB, encode=1 * GB, decode=3 * GB, ratio=2.0), False),  # fast link
        (WireRates(link=0.1 * GB, encode=1 * GB, decode=3 * GB, ratio=1.0), False),  # no shrink
        (WireRates(link=0.1 * GB, encode=0.05 * GB, decode=3 * GB, ratio=2.0), False),  # slow lz4
        (WireRates(link=0.1 * GB, encode=None, decode=3 * GB, ratio=2.0), False),  # unmeasured
        (WireRates(link=None, encode=1 * GB, decode=3 * GB, ratio=2.0), False),
    ],
)
def test_pays_compares_expected_times(rates: WireRates, pays: bool) -> None:
    assert rates.pays(0.5) is pays


def raw_get(seconds: float, nbytes: int = 4 * MiB) -> WireStats:
    """A raw get that streamed `nbytes` after its first message in `seconds`."""
    stats = WireStats()
    stats.first_at, stats.first_bytes = 0.0, MiB
    stats.wire_bytes = nbytes + MiB
    stats.streaming_s = seconds
    return stats


def test_off_never_asks_and_lz4_always_does() -> None:
    assert not WireCompressionPolicy("off", 2).ask()
    assert WireCompressionPolicy("lz4", 2).ask()
    assert not WireCompressionPolicy("off", 2).wants_sample()


def test_auto_asks_once_a_slow_link_and_a_shrinking_sample_are_measured() -> None:
    policy = WireCompressionPolicy("auto", 2)
    assert not policy.ask()  # nothing measured
    assert policy.wants_sample()
    slow = raw_get(4 * MiB / 20e6)  # 20 MB/s
    slow.sample = smooth(256 << 10)
    policy.observe(slow)
    rates = policy.rates
    assert rates.link == pytest.approx(20e6)
    assert rates.ratio is not None
    assert rates.ratio > 1.3
    assert policy.ask()


def test_auto_stays_off_on_a_fast_link_or_for_data_that_do_not_shrink() -> None:
    fast = WireCompressionPolicy("auto", 2)
    stats = raw_get(4 * MiB / 10e9)
    stats.sample = smooth(256 << 10)
    fast.observe(stats)
    assert not fast.ask()

    noise = WireCompressionPolicy("auto", 2)
    stats = raw_get(4 * MiB / 20e6)
    stats.sample = torch.randint(0, 256, (256 << 10,), dtype=torch.uint8).numpy().tobytes()
    noise.observe(stats)
    assert noise.rates.ratio == pytest.approx(1.0)
    assert not noise.ask()


def test_small_gets_are_not_link_samples() -> None:
    policy = WireCompressionPolicy("auto", 2)
    policy.observe(raw_get(1.0, nbytes=64 << 10))  # 64 KiB in a second: latency, not a link
    assert policy.rates.link is None


def test_a_compressed_get_updates_ratio_and_decode_and_discounts_its_codec_time() -> None:
    policy = WireCompressionPolicy("auto", 2)
    policy.probe(smooth(256 << 10))
    encode = policy.rates.encode
    assert encode is not None
    stats = raw_get(0.0, nbytes=2 * MiB)
    stats.first_bytes = 0
    stats.compressed_raw_bytes, stats.compressed_wire_bytes = 4 * MiB, 2 * MiB
    stats.decode_s = 0.01
    stats.streaming_s = 0.1 + 0.01 + 4 * MiB / encode
    policy.observe(stats)
    rates = policy.rates
    assert rates.link == pytest.approx(3 * MiB / 0.1, rel=1e-6)
    assert rates.decode is not None


def test_samples_are_wanted_again_after_a_while() -> None:
    clock = FakeClock()
    policy = WireCompressionPolicy("auto", 2, clock=clock)
    policy.probe(smooth(64 << 10))
    assert not policy.wants_sample()
    clock.now += PROBE_EVERY_S
    assert policy.wants_sample()


def test_a_server_without_the_field_is_not_asked_for_a_while() -> None:
    clock = FakeClock()
    policy = WireCompressionPolicy("lz4", 2, clock=clock)
    policy.mark_unsupported()
    assert not policy.ask()
    clock.now += UNSUPPORTED_RETRY_S
    assert policy.ask()


def test_options_reject_an_unknown_setting() -> None:
    with pytest.raises(ValueError, match="wire_compression must be one of auto, off, lz4"):
        ClientOptions(wire_compression="zstd")  # type: ignore[arg-type]
