"""`--plot PATH.png`: latency over time per operation, and the prefix hit rate over time;
`kvstore-bench plot FILE.jsonl`: a daemon's metrics over a run, from `--scrape`'s file.

matplotlib is optional (``pip install 'kvstore[plot]'``) and imported only here, when asked for.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from kvstore.bench.report import LoadReport
from kvstore.bench.scrape import Scrape, read_scrapes
from kvstore.bench.workload import WorkerResult

_MAX_BINS = 60
_SAMPLES_PER_BIN = 8  # on average, so that a bin's p99 means something
_MAX_POINTS = 20_000  # scatter points per operation; more are thinned evenly


def time_bins(
    end_s: float, max_bins: int = _MAX_BINS, num_samples: int | None = None
) -> np.ndarray:
    """Bin edges from 0 to ``end_s``: at most ``max_bins`` bins, none shorter than 0.5 s, and
    (given ``num_samples``) wide enough to hold a few samples each on average."""
    width = max(0.5, end_s / max_bins)
    if num_samples:
        width = max(width, end_s * _SAMPLES_PER_BIN / num_samples)
    return np.arange(0.0, max(end_s, width) + width, width)


def binned_percentile(
    starts: np.ndarray, values: np.ndarray, edges: np.ndarray, q: float
) -> np.ndarray:
    """The ``q``-th percentile of ``values`` per bin of ``starts`` (NaN for an empty bin)."""
    which = np.digitize(starts, edges) - 1
    out = np.full(edges.size - 1, np.nan)
    for index in range(out.size):
        chosen = values[which == index]
        if chosen.size:
            out[index] = np.percentile(chosen, q)
    return out


def binned_ratio(
    starts: np.ndarray, numerators: np.ndarray, denominators: np.ndarray, edges: np.ndarray
) -> np.ndarray:
    """sum(numerators) / sum(denominators) per bin (NaN where the denominator is 0)."""
    which = np.clip(np.digitize(starts, edges) - 1, 0, edges.size - 2)
    top = np.bincount(which, weights=numerators, minlength=edges.size - 1)
    bottom = np.bincount(which, weights=denominators, minlength=edges.size - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(bottom > 0, top / np.maximum(bottom, 1), np.nan)


def write_plot(merged: WorkerResult, report: LoadReport, path: str | Path) -> None:
    """Two panels over run time: p50/p99 latency per operation (log scale), block hit rate."""
    plt = _pyplot()
    end_s = max(report.wall_s, float(merged.op_start_s.max(initial=0.0)))
    edges = time_bins(end_s, num_samples=int(merged.request_start_s.size))
    centers = (edges[:-1] + edges[1:]) / 2
    figure: Any
    figure, (latency_axis, hit_axis) = plt.subplots(2, 1, sharex=True, figsize=(10, 7))
    for index, op in enumerate(merged.op_names):
        select = merged.op_kind == index
        starts, latencies_ms = merged.op_start_s[select], merged.op_latency_s[select] * 1e3
        step = max(1, starts.size // _MAX_POINTS)
        color = f"C{index}"
        latency_axis.scatter(
            starts[::step], latencies_ms[::step], s=3, alpha=0.25, linewidths=0, color=color
        )
        for q, style in ((50, "-"), (99, "--")):
            latency_axis.plot(
                centers,
                binned_percentile(starts, latencies_ms, edges, q),
                linestyle=style,
                color=color,
                label=f"{op} p{q}",
            )
    latency_axis.set_yscale("log")
    latency_axis.set_ylabel("latency (ms)")
    latency_axis.legend(ncol=2, fontsize="small")
    modes = {"open": "open loop", "closed": "closed loop", "timed": "trace timestamps"}
    latency_axis.set_title(f"kvstore-bench {report.workload}: {modes.get(report.mode, '')}")
    rates = binned_ratio(
        merged.request_start_s,
        merged.request_hit_blocks.astype(np.float64),
        merged.request_blocks.astype(np.float64),
        edges,
    )
    hit_axis.plot(centers, rates * 100, marker=".", label="measured, per interval")
    hit_axis.axhline(
        report.hit_rate.blocks * 100,
        color="gray",
        label=f"measured overall {report.hit_rate.blocks:.1%}",
    )
    for index, (name, (blocks, _)) in enumerate(report.reference.items()):
        color = f"C{index + 1}"
        hit_axis.axhline(blocks * 100, linestyle=":", color=color, label=f"{name} {blocks:.1%}")
    hit_axis.set_ylim(0, 100)
    hit_axis.set_ylabel("prefix hit rate (% of blocks)")
    hit_axis.set_xlabel("time since start (s)")
    hit_axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -- `kvstore-bench plot FILE.jsonl`: a daemon's metrics over a run (kvstore.bench.scrape) --


def counter_rate(scrapes: list[Scrape], name: str, **labels: str) -> tuple[np.ndarray, np.ndarray]:
    """(interval midpoints, per-second increase of counter `name{labels}`) between
    consecutive scrapes that both have it. A decrease is a restart of the daemon: the
    increase is then the new value, as Prometheus's `rate` takes it."""
    points = _series(scrapes, name, labels)
    times, rates = [], []
    for (t0, v0), (t1, v1) in itertools.pairwise(points):
        if t1 <= t0:
            continue
        times.append((t0 + t1) / 2)
        rates.append((v1 - v0 if v1 >= v0 else v1) / (t1 - t0))
    return np.asarray(times, dtype=np.float64), np.asarray(rates, dtype=np.float64)


def gauge_series(scrapes: list[Scrape], name: str, **labels: str) -> tuple[np.ndarray, np.ndarray]:
    """(scrape times, values) of gauge `name{labels}` where the scrape has it."""
    points = _series(scrapes, name, labels)
    return (
        np.asarray([t for t, _ in points], dtype=np.float64),
        np.asarray([v for _, v in points], dtype=np.float64),
    )


def histogram_quantile(scrapes: list[Scrape], name: str, q: float) -> tuple[np.ndarray, np.ndarray]:
    """The `q` quantile (0..1) of histogram `name` over each interval between scrapes,
    interpolated linearly inside its bucket as Prometheus's `histogram_quantile` does;
    NaN for an interval with no observation."""
    usable = [scrape.samples for scrape in scrapes if scrape.samples is not None]
    times = [scrape.t_s for scrape in scrapes if scrape.samples is not None]
    bucket = f"{name}_bucket"
    midpoints, values = [], []
    for index, (before, after) in enumerate(itertools.pairwise(usable)):
        # Each bucket by its upper bound, with the `le` text it is labelled by.
        les = sorted(
            (_bound(le), le)
            for sample_name, labels in after.values
            if sample_name == bucket
            for key, le in labels
            if key == "le"
        )
        counts = []
        for _, le in les:
            now = after.value(bucket, le=le)
            then = before.value(bucket, le=le) if before.has(bucket, le=le) else 0.0
            counts.append(now - then if now >= then else now)
        midpoints.append((times[index] + times[index + 1]) / 2)
        values.append(_quantile_of_buckets([bound for bound, _ in les], counts, q))
    return np.asarray(midpoints, dtype=np.float64), np.asarray(values, dtype=np.float64)


def _quantile_of_buckets(bounds: list[float], cumulative: list[float], q: float) -> float:
    if not cumulative or cumulative[-1] <= 0:
        return float("nan")
    rank = q * cumulative[-1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound, as Prometheus
            inside = count - lower_count
            fraction = (rank - lower_count) / inside if inside > 0 else 1.0
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, count
    return lower_bound


def _bound(text: str) -> float:
    return math.inf if text == "+Inf" else float(text)


def _series(scrapes: list[Scrape], name: str, labels: dict[str, str]) -> list[tuple[float, float]]:
    return [
        (scrape.t_s, scrape.samples.value(name, **labels))
        for scrape in scrapes
        if scrape.samples is not None and scrape.samples.has(name, **labels)
    ]


def _tiers(scrapes: list[Scrape]) -> list[str]:
    found = {
        dict(labels)["tier"]
        for scrape in scrapes
        if scrape.samples is not None
        for name, labels in scrape.samples.values
        if name == "kvstore_tier_capacity_bytes"
    }
    return [tier for tier in ("hbm", "dram", "ssd") if tier in found]


def write_metrics_plot(scrapes: list[Scrape], path: str | Path, title: str = "") -> None:
    """Five panels over the run: request rates, GB/s moved, p50/p99 latency per
    operation, each tier's use, and the daemon's RSS and event-loop lag."""
    plt = _pyplot()
    figure: Any
    figure, axes = plt.subplots(5, 1, sharex=True, figsize=(10, 14))
    rates, moved, latency, tiers, health = axes
    for label, name in (
        ("lookups", "kvstore_lookups_total"),
        ("blocks put", "kvstore_blocks_put_total"),
        ("blocks got", "kvstore_blocks_got_total"),
    ):
        rates.plot(*counter_rate(scrapes, name), label=label)
    rates.set_ylabel("per second")
    rates.legend(fontsize="small")
    for label, name in (
        ("put", "kvstore_block_bytes_put_total"),
        ("get", "kvstore_block_bytes_got_total"),
    ):
        times, per_s = counter_rate(scrapes, name)
        moved.plot(times, per_s / 1e9, label=label)
    moved.set_ylabel("block GB/s")
    moved.legend(fontsize="small")
    for index, op in enumerate(("lookup", "put", "get")):
        for q, style in ((0.5, "-"), (0.99, "--")):
            times, seconds = histogram_quantile(scrapes, f"kvstore_{op}_seconds", q)
            latency.plot(
                times, seconds * 1e3, linestyle=style, color=f"C{index}", label=f"{op} p{q * 100:g}"
            )
    latency.set_yscale("log")
    latency.set_ylabel("server latency (ms)\n(histogram buckets)")
    latency.legend(ncol=3, fontsize="small")
    for tier in _tiers(scrapes):
        times, used = gauge_series(scrapes, "kvstore_tier_used_bytes", tier=tier)
        _, capacity = gauge_series(scrapes, "kvstore_tier_capacity_bytes", tier=tier)
        if capacity.size == used.size and capacity.size:
            tiers.plot(times, 100 * used / np.maximum(capacity, 1), label=f"{tier} used")
        eviction_times, evictions = counter_rate(scrapes, "kvstore_tier_evictions_total", tier=tier)
        if evictions.any():
            tiers.plot(eviction_times, evictions, linestyle=":", label=f"{tier} evictions/s")
    tiers.set_ylabel("% of capacity; evictions/s")
    tiers.legend(fontsize="small")
    times, rss = gauge_series(scrapes, "process_resident_memory_bytes")
    health.plot(times, rss / (1 << 20), color="C0", label="RSS (MiB)")
    health.set_ylabel("RSS (MiB)")
    lag_axis = health.twinx()
    times, lag = gauge_series(scrapes, "kvstore_event_loop_lag_max_seconds")
    lag_axis.plot(times, lag * 1e3, color="C3", label="loop lag, max of 10 s (ms)")
    lag_axis.set_ylabel("loop lag (ms)")
    health.legend(loc="upper left", fontsize="small")
    lag_axis.legend(loc="upper right", fontsize="small")
    health.set_xlabel("time since the first scrape (s)")
    failed = sum(1 for scrape in scrapes if scrape.samples is None)
    rates.set_title(
        (title or "kvstore daemon metrics")
        + f": {len(scrapes)} scrapes"
        + (f", {failed} failed" if failed else "")
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(
            "kvstore-bench: plotting needs matplotlib: pip install 'kvstore[plot]'"
        ) from error
    return plt


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scrapes", type=Path, help="JSONL file that --scrape wrote")
    parser.add_argument(
        "--out", type=Path, help="the PNG to write (default: the JSONL file's name, .png)"
    )
    parser.add_argument("--title", default="", help="the figure's title")


def run_plot(args: argparse.Namespace) -> int:
    """`kvstore-bench plot FILE.jsonl`: draw a run's scrapes; 1 if there is nothing to draw."""
    try:
        scrapes = read_scrapes(args.scrapes)
    except OSError as error:
        raise SystemExit(f"kvstore-bench plot: cannot read {args.scrapes}: {error}") from None
    except ValueError as error:
        raise SystemExit(f"kvstore-bench plot: {args.scrapes}: {error}") from None
    if sum(1 for scrape in scrapes if scrape.samples is not None) < 2:
        print(
            f"kvstore-bench plot: {args.scrapes} holds fewer than 2 successful scrapes; "
            f"nothing to draw",
            file=sys.stderr,
        )
        return 1
    out = args.out or args.scrapes.with_suffix(".png")
    write_metrics_plot(scrapes, out, args.title)
    print(f"wrote {out}")
    return 0
