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
    VERDICT_S,
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
    assert rates.pays(0.2) is pays


def raw_get(nbytes: int = 4 * MiB) -> WireStats:
    """A get whose `nbytes` all came raw."""
    stats = WireStats()
    stats.wire_bytes = stats.raw_bytes = nbytes
    return stats


def test_off_never_asks_and_lz4_always_does() -> None:
    assert not WireCompressionPolicy("off", 2).ask()
    assert WireCompressionPolicy("lz4", 2).ask()
    assert not WireCompressionPolicy("off", 2).wants_sample()


def test_auto_asks_once_a_slow_link_and_a_shrinking_sample_are_measured() -> None:
    policy = WireCompressionPolicy("auto", 2)
    assert not policy.ask()  # nothing measured
    assert policy.wants_sample()
    slow = raw_get()
    slow.sample = smooth(256 << 10)
    policy.observe(slow, 4 * MiB / 20e6, False)  # 20 MB/s
    rates = policy.rates
    assert rates.link == pytest.approx(20e6)
    assert rates.ratio is not None
    assert rates.ratio > 1.3
    assert policy.ask()


def test_auto_stays_off_on_a_fast_link_or_for_data_that_do_not_shrink() -> None:
    fast = WireCompressionPolicy("auto", 2)
    stats = raw_get()
    stats.sample = smooth(256 << 10)
    fast.observe(stats, 4 * MiB / 10e9, False)
    assert not fast.ask()

    noise = WireCompressionPolicy("auto", 2)
    stats = raw_get()
    stats.sample = torch.randint(0, 256, (256 << 10,), dtype=torch.uint8).numpy().tobytes()
    noise.observe(stats, 4 * MiB / 20e6, False)
    assert noise.rates.ratio == pytest.approx(1.0)
    assert not noise.ask()


def test_small_gets_are_not_link_samples() -> None:
    policy = WireCompressionPolicy("auto", 2)
    policy.observe(raw_get(64 << 10), 1.0, False)  # 64 KiB in a second: latency, not a link
    assert policy.rates.link is None


def test_a_compressed_get_updates_ratio_and_decode_and_discounts_its_decoding() -> None:
    policy = WireCompressionPolicy("auto", 2)
    stats = WireStats()
    stats.wire_bytes, stats.raw_bytes = 3 * MiB, 5 * MiB
    stats.compressed_raw_bytes, stats.compressed_wire_bytes = 4 * MiB, 2 * MiB
    stats.decode_s = 0.01
    policy.observe(stats, 0.1 + 0.01, True)
    rates = policy.rates
    assert rates.link == pytest.approx(3 * MiB / 0.1, rel=1e-6)
    assert rates.decode == pytest.approx(4 * MiB / 0.01)
    assert rates.ratio == pytest.approx(5 / 3)
    assert rates.delivered_lz4 == pytest.approx(5 * MiB / 0.11)
    assert rates.delivered_raw is None


def test_the_gets_verdict_overrules_the_model_until_it_ages_out() -> None:
    clock = FakeClock()
    policy = WireCompressionPolicy("auto", 2, clock=clock)
    slow = raw_get()
    slow.sample = smooth(256 << 10)
    policy.observe(slow, 4 * MiB / 20e6, False)  # a raw get at 20 MB/s...
    assert policy.ask()  # ...so the model expects lz4 to win
    policy.observe(raw_get(), 4 * MiB / 10e6, True)  # but one asking got 10 MB/s of KV
    assert policy.rates.verdict() is False
    assert not policy.ask()
    clock.now += VERDICT_S
    policy.observe(raw_get(), 4 * MiB / 20e6, False)
    assert policy.ask()  # the compressed get's sample aged out: try it again
    policy.observe(raw_get(), 4 * MiB / 40e6, True)  # and now it wins
    assert policy.rates.verdict() is True
    assert policy.ask()


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
