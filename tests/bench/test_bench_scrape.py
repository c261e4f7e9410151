"""`kvstore-bench ... --scrape` and `kvstore-bench plot`: a daemon's /metrics sampled
during a run into JSONL, and the rates and percentiles drawn from it."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from kvstore.bench.cli import main
from kvstore.bench.plot import counter_rate, gauge_series, histogram_quantile
from kvstore.bench.scrape import Samples, Scrape, Scraper, read_scrapes
from kvstore.bench.spawn import free_port
from kvstore.server import RunningServer

ServerFactory = Callable[..., Awaitable[RunningServer]]

# A tiny agent session: 512-byte blocks (2 layers x 4 heads x 1 dim, bf16, 16 tokens).
SMALL_SESSION = [
    "--preset", "Llama-3-8B", "--scale", "1/4096", "--layers", "2", "--block-tokens", "16",
    "--system-tokens", "256", "--tool-tokens", "64", "--task-tokens", "16-48",
    "--tool-result-tokens", "32-96", "--reply-tokens", "8-32", "--turns", "3-4",
    "--think-time", "0-0.02", "--processes", "0", "--concurrency", "2", "--sessions", "6",
    "--duration", "10", "--seed", "3", "--no-progress",
]  # fmt: skip


def scrape_at(t_s: float, **values: float) -> Scrape:
    """A scrape with unlabelled samples; `name__le_X=v` is a bucket of le="X"."""
    samples = Samples()
    for key, value in values.items():
        name, _, le = key.partition("__le_")
        labels = frozenset({("le", le.replace("inf", "+Inf"))} if le else ())
        samples.values[(name, labels)] = value
    return Scrape(t_s, samples)


# -- the arithmetic -----------------------------------------------------------------------


def test_counter_rate_per_interval_and_across_a_restart() -> None:
    scrapes = [
        scrape_at(0.0, c_total=0),
        scrape_at(1.0, c_total=10),
        scrape_at(3.0, c_total=30),
        Scrape(3.5, None, "URLError: refused"),  # a failed scrape is skipped
        scrape_at(4.0, c_total=5),  # the daemon restarted: 5 since
    ]
    times, rates = counter_rate(scrapes, "c_total")
    assert times.tolist() == [0.5, 2.0, 3.5]
    assert rates.tolist() == [10.0, 10.0, 5.0]


def test_gauge_series_skips_scrapes_without_it() -> None:
    scrapes = [scrape_at(0.0, g=1), scrape_at(1.0), scrape_at(2.0, g=3)]
    times, values = gauge_series(scrapes, "g")
    assert times.tolist() == [0.0, 2.0]
    assert values.tolist() == [1.0, 3.0]


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    def buckets(t_s: float, below_1: float, below_2: float, total: float) -> Scrape:
        return scrape_at(
            t_s, h_bucket__le_1=below_1, h_bucket__le_2=below_2, h_bucket__le_inf=total
        )

    # Interval 1: 10 observations, 4 under 1 and 6 in (1, 2]. Interval 2: none.
    # Interval 3: 2 observations, both past the last finite bound.
    scrapes = [buckets(0, 0, 0, 0), buckets(1, 4, 10, 10), buckets(2, 4, 10, 10)]
    scrapes.append(buckets(3, 4, 10, 12))
    times, p50 = histogram_quantile(scrapes, "h", 0.5)
    assert times.tolist() == [0.5, 1.5, 2.5]
    # Rank 5 of 10: 1 of the 6 in (1, 2], so 1 + 1/6.
    assert p50[0] == pytest.approx(1 + 1 / 6)
    assert math.isnan(p50[1])
    assert p50[2] == 2.0  # beyond the last finite bucket: its bound, as Prometheus says
    _, p20 = histogram_quantile(scrapes, "h", 0.2)
    assert p20[0] == pytest.approx(0.5)  # rank 2 of the 4 in [0, 1]


# -- the scraper against a real daemon ---------------------------------------------------------


async def test_scraper_writes_one_line_per_scrape_and_a_last_one_at_stop(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = await server_factory(metrics_port=0)
    assert server.metrics is not None
    path = tmp_path / "scrapes.jsonl"
    scraper = Scraper(server.metrics.url, path, interval_s=0.05)
    await asyncio.to_thread(scraper.start)
    await asyncio.sleep(0.3)
    await asyncio.to_thread(scraper.stop)
    scrapes = read_scrapes(path)
    assert len(scrapes) == scraper.num_scrapes >= 3
    assert scraper.num_failed == 0
    assert len(scraper.seconds) == scraper.num_scrapes
    assert [s.t_s for s in scrapes] == sorted(s.t_s for s in scrapes)
    last = scrapes[-1].samples
    assert last is not None
    assert last.value("kvstore_tier_capacity_bytes", tier="dram") == 32 << 20
    assert not any(name.endswith("_created") for name in last.names())


def test_scraper_records_a_failed_scrape_as_an_error_line(tmp_path: Path) -> None:
    path = tmp_path / "scrapes.jsonl"
    scraper = Scraper(f"http://127.0.0.1:{free_port()}/metrics", path, interval_s=10)
    scraper.start()
    scraper.stop()
    scrapes = read_scrapes(path)
    assert len(scrapes) == scraper.num_failed >= 1
    assert all(s.samples is None and "refused" in s.error.lower() for s in scrapes)


def test_scraper_refuses_a_zero_interval(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interval must be > 0"):
        Scraper("http://127.0.0.1:1/metrics", tmp_path / "x.jsonl", interval_s=0)


# -- the commands -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_agent_scrapes_the_target_and_plot_draws_it(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    server = await server_factory(metrics_port=0, store__page_bytes=512)
    assert server.metrics is not None
    out = tmp_path / "run.jsonl"
    argv = ["agent", *SMALL_SESSION, "--target", f"127.0.0.1:{server.port}"]
    argv += ["--scrape", server.metrics.url, "--scrape-out", str(out), "--scrape-interval", "0.2"]
    assert await asyncio.to_thread(main, argv) == 0
    scrapes = read_scrapes(out)
    assert len(scrapes) >= 2
    last = scrapes[-1].samples
    assert last is not None
    # The last scrape is taken after the run: it has every block the run put.
    counters = server.store.counters
    assert last.value("kvstore_blocks_put_total") == counters.blocks_put > 0
    assert last.value("kvstore_lookups_total") == counters.lookups
    png = tmp_path / "run.png"
    assert await asyncio.to_thread(main, ["plot", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scrape_without_a_url_needs_the_run_to_start_its_daemon(tmp_path: Path) -> None:
    argv = ["agent", *SMALL_SESSION, "--target", f"127.0.0.1:{free_port()}", "--scrape"]
    with pytest.raises(SystemExit, match="--scrape with --target needs the daemon's metrics URL"):
        main([*argv, "--scrape-out", str(tmp_path / "x.jsonl")])


@pytest.mark.slow
def test_a_bare_scrape_starts_the_daemon_with_metrics(tmp_path: Path) -> None:
    out = tmp_path / "run.jsonl"
    argv = ["agent", *SMALL_SESSION, "--dram-bytes", "16MiB", "--scrape"]
    assert main([*argv, "--scrape-out", str(out), "--scrape-interval", "0.2"]) == 0
    scrapes = read_scrapes(out)
    assert all(s.samples is not None for s in scrapes), [s.error for s in scrapes]
    last = scrapes[-1].samples
    assert last is not None
    assert last.value("kvstore_tier_capacity_bytes", tier="dram") == 16 << 20
    assert last.value("kvstore_blocks_put_total") > 0


def test_plot_needs_two_scrapes_and_names_a_bad_line(tmp_path: Path) -> None:
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"t_s": 0, "unix_s": 0, "samples": []}) + "\n")
    assert main(["plot", str(one)]) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(one.read_text() + "not json\n")
    with pytest.raises(SystemExit, match="line 2 is not a scrape record"):
        main(["plot", str(bad)])


@pytest.mark.slow
def test_metrics_cost_compares_a_scraped_daemon_with_a_plain_one(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    argv = ["metrics", "--iterations", "20", "--rounds", "4", "--blocks", "2"]
    argv += ["--block-bytes", "64KiB"]
    assert main([*argv, "--scrape-interval", "0.2", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    for name in ("metrics off", "metrics on"):
        row = figures[name]
        assert 0 < row["lookup_p50_ms"] <= row["lookup_p99_ms"]
        assert row["put_gbps"] > 0
        assert row["get_gbps"] > 0
    ratios = figures["ratios"]
    assert ratios["put_gbps_ratio"] > 0
    assert ratios["get_gbps_ratio"] > 0
    assert math.isfinite(ratios["lookup_p50_added_ms"])
    assert 0 < figures["costs"]["observe_lookup_ns"] < 1e6
    assert figures["costs"]["scrape_ms"] > 0
    assert 0 < figures["costs"]["scrape_hold_ms"] < figures["costs"]["scrape_ms"] * 10
