"""`--plot PATH.png`: latency over time per operation, and the prefix hit rate over time.

matplotlib is optional (``pip install 'kvstore[plot]'``) and imported only here, when asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvstore.bench.report import LoadReport
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(
            "kvstore-bench: --plot needs matplotlib: pip install 'kvstore[plot]'"
        ) from error
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
