"""`kvstore-bench disagg sweep`: TTFT against the store's read bandwidth, with the break-even
the cost model (kvstore.client.cost) predicts beside the one measured.

One prompt is stored; then, for each read rate, a kvstore-server is spawned as a separate
process with `--throttle-read dram=RATE` and the same request is served three ways:

- **fetch**: load the whole stored prefix (layer by layer, overlapped with the suffix);
- **no store**: prefill the whole prompt, no lookup;
- **planned**: the vLLM connector's scheduler side (through kvstore.bench.disagg.engine) looks
  up and plans with the bandwidth the fetches measured and the prefill rate this rate's
  no-store runs showed (a worker measuring its own prefills), and loads only what it says
  (all of it, or nothing at this prompt's single rate). Each planned run is paired with a
  no-store run timed beside it, in alternating order, and the column "planned/no store"
  is the median of those pairs' ratios.

The predicted break-even is ``block_bytes * tokens_per_s / block_tokens`` with the prefill
rate of two timed prefills before the sweep (the whole prompt, and the suffix a hit leaves
to compute); it is printed again at the rate the sweep's no-store runs showed, since a
shared machine's speed drifts. The measured crossover is where fetch stops being slower
than no store, interpolated between neighbouring rates.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from kvstore.bench.disagg.engine import Engine
from kvstore.bench.disagg.model import PagedKVCache, Transformer
from kvstore.bench.disagg.serving import (
    cache_for,
    model_config,
    namespace_for,
    random_prompt,
    recompute,
)
from kvstore.bench.spawn import spawned_server
from kvstore.client import PrefillModel, break_even_bandwidth
from kvstore.units import parse_size

DEFAULT_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
DEFAULT_PROMPT_TOKENS = 2048


@dataclass(frozen=True)
class SweepPoint:
    """One throttled rate: medians over the repeats."""

    rate_bytes_per_s: float  # the daemon's --throttle-read
    measured_bytes_per_s: float | None  # what the connector's meter saw
    fetch_ttft_s: float
    no_store_ttft_s: float
    planned_ttft_s: float
    # The median over the repeats of planned / no store, each pair timed back to back
    # (in alternating order): drift of a shared machine's speed cancels within a pair.
    planned_over_no_store: float
    # Of planned_ttft_s, the median time the scheduler side took to count the match: the
    # request's lookup and plan, what a planned request adds over no store.
    planned_match_s: float
    num_load_blocks: int  # what the plan loaded
    decision: str
    # The prefill rate the plan used: the worker's own, from this rate's no-store runs.
    plan_tokens_per_s: float


@dataclass(frozen=True)
class SweepReport:
    model: str
    dtype: str
    device: str
    prompt_tokens: int
    num_matched_blocks: int
    block_bytes: int
    block_tokens: int
    prefill_tokens_per_s: float
    prefill_fixed_s: float
    predicted_break_even_bytes_per_s: float
    # The same formula over the prefill rate the sweep's own no-store runs showed: the
    # prediction with the machine's speed during the sweep, not before it.
    in_sweep_break_even_bytes_per_s: float
    measured_break_even_bytes_per_s: float | None  # None: no crossover inside the rates
    crossover_note: str
    points: list[SweepPoint]


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The options only `disagg sweep` takes."""
    parser.add_argument(
        "--rates",
        type=_rates,
        metavar="RATE[,RATE...]",
        help="sweep: read rates of the store's DRAM, e.g. 20MB,80MB (default: --factors "
        "times the predicted break-even)",
    )
    parser.add_argument(
        "--factors",
        type=_factors,
        default=DEFAULT_FACTORS,
        metavar="F[,F...]",
        help="sweep: rates as multiples of the predicted break-even (default "
        f"{','.join(f'{f:g}' for f in DEFAULT_FACTORS)})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="sweep: runs per rate, their median (default 3); miss: pairs per save mode "
        "(default 15)",
    )


def run_sweep(args: argparse.Namespace, model_name: str) -> SweepReport:
    """The sweep the parsed `args` describe; spawns one daemon per rate."""
    if args.repeats is None:
        args.repeats = 3
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    config = model_config(model_name, args.dtype)
    model = Transformer(config, device=args.device)
    prompt_tokens = args.prompt_tokens or DEFAULT_PROMPT_TOKENS
    block_tokens = config.page_tokens
    # A request computes at least the last token: a hit covers the full blocks before it.
    num_matched = (prompt_tokens - 1) // block_tokens
    if num_matched < 1:
        raise ValueError(f"--prompt-tokens must exceed one block ({block_tokens} tokens)")
    prompt = random_prompt(config, prompt_tokens, args.seed)
    cache = cache_for(model, prompt_tokens + 1)
    prefill = measure_prefill(model, cache, prompt, num_matched * block_tokens, args.repeats)
    block_bytes = config.num_layers * config.page_nbytes
    predicted = break_even_bandwidth(
        block_bytes=block_bytes, block_tokens=block_tokens, prefill=prefill
    )
    rates = args.rates or [factor * predicted for factor in args.factors]
    points = [
        _sweep_point(args, model, cache, prompt, rate, num_matched, block_bytes, prefill)
        for rate in sorted(rates)
    ]
    crossover, note = measured_crossover(points)
    no_store_s = statistics.median(point.no_store_ttft_s for point in points)
    in_sweep = in_sweep_prefill(prefill, no_store_s, num_matched * block_tokens, prompt_tokens)
    return SweepReport(
        model=model_name,
        dtype=args.dtype,
        device=args.device,
        prompt_tokens=prompt_tokens,
        num_matched_blocks=num_matched,
        block_bytes=block_bytes,
        block_tokens=block_tokens,
        prefill_tokens_per_s=prefill.tokens_per_s,
        prefill_fixed_s=prefill.fixed_s,
        predicted_break_even_bytes_per_s=predicted,
        in_sweep_break_even_bytes_per_s=break_even_bandwidth(
            block_bytes=block_bytes, block_tokens=block_tokens, prefill=in_sweep
        ),
        measured_break_even_bytes_per_s=crossover,
        crossover_note=note,
        points=points,
    )


def measure_prefill(
    model: Transformer, cache: PagedKVCache, prompt: torch.Tensor, num_hit_tokens: int, repeats: int
) -> PrefillModel:
    """The prefill rate of the `num_hit_tokens` a hit saves: whole prompt against the suffix
    left after a hit, both timed here (medians; one warm-up first)."""
    suffix = prompt[num_hit_tokens:]
    for _ in range(2):  # warm-up: allocations, kernels, the allocator's caches
        recompute(model, cache, prompt, 1)
    whole_s = _median(repeats, lambda: recompute(model, cache, prompt, 1).ttft_s)
    suffix_s = _median(repeats, lambda: recompute(model, cache, suffix, 1).ttft_s)
    saved_s = max(whole_s - suffix_s, 1e-9)
    tokens_per_s = num_hit_tokens / saved_s
    return PrefillModel(
        tokens_per_s=tokens_per_s, fixed_s=max(0.0, suffix_s - len(suffix) / tokens_per_s)
    )


def _sweep_point(
    args: argparse.Namespace,
    model: Transformer,
    cache: PagedKVCache,
    prompt: torch.Tensor,
    rate: float,
    num_matched: int,
    block_bytes: int,
    prefill: PrefillModel,
) -> SweepPoint:
    config = model.config
    flags = ["--dram-bytes", args.server_dram_bytes, "--log-level", "warning"]
    flags += ["--throttle-read", f"dram={max(1, round(rate))}"]
    namespace = namespace_for(config, tenant=f"sweep-{uuid.uuid4().hex[:12]}")
    with spawned_server(flags) as target:
        # A prefill rate of 1 token/s makes the connector's plan fetch every stored block.
        with Engine(model, cache, target, namespace, prefill_tokens_per_s=1.0) as engine:
            engine.serve(prompt, 1, load=False)
            fetch, no_store = [], []
            for _ in range(args.repeats):
                fetch.append(engine.serve(prompt, 1, save=False).ttft_s)
                no_store.append(recompute(model, cache, prompt, 1).ttft_s)
            measured = engine.worker.worker_side.stats().get("fetch_bytes_per_s")
        # The worker plans with the prefill rate it just measured, as a serving worker
        # would: the machine's speed now, not at start-up; and the bandwidth the fetches
        # above measured. The scheduler side's lookup and plan count toward TTFT.
        current = in_sweep_prefill(
            prefill, statistics.median(no_store), num_matched * config.page_tokens, len(prompt)
        )
        settings: dict[str, Any] = {"prefill_tokens_per_s": current.tokens_per_s}
        if measured is not None:
            settings["fetch_bytes_per_s"] = measured
        planned, ratios, runs = [], [], []
        with Engine(model, cache, target, namespace, **settings) as engine:
            for repeat in range(args.repeats):
                if repeat % 2:
                    baseline_s = recompute(model, cache, prompt, 1).ttft_s
                run = engine.serve(prompt, 1, save=False)
                if not repeat % 2:
                    baseline_s = recompute(model, cache, prompt, 1).ttft_s
                runs.append(run)
                planned.append(run.ttft_s)
                ratios.append(run.ttft_s / baseline_s)
    last = runs[-1]
    return SweepPoint(
        rate_bytes_per_s=rate,
        measured_bytes_per_s=measured,
        fetch_ttft_s=statistics.median(fetch),
        no_store_ttft_s=statistics.median(no_store),
        planned_ttft_s=statistics.median(planned),
        planned_over_no_store=statistics.median(ratios),
        planned_match_s=statistics.median(run.match_s for run in runs),
        num_load_blocks=last.num_reused_tokens // config.page_tokens,
        decision=last.decision,
        plan_tokens_per_s=current.tokens_per_s,
    )


def in_sweep_prefill(
    prefill: PrefillModel, no_store_s: float, num_hit_tokens: int, num_prompt_tokens: int
) -> PrefillModel:
    """The prefill rate of the hit tokens from a no-store TTFT: the whole prompt's time less
    the suffix's (as `prefill`, timed before the sweep, gives it)."""
    suffix_s = prefill.seconds(num_prompt_tokens - num_hit_tokens)
    return PrefillModel(tokens_per_s=num_hit_tokens / max(no_store_s - suffix_s, 1e-9))


def measured_crossover(points: list[SweepPoint]) -> tuple[float | None, str]:
    """The rate where fetching stops losing to no store: between the neighbouring rates whose
    difference changes sign, interpolated in log(rate)."""
    ordered = sorted(points, key=lambda point: point.rate_bytes_per_s)
    gains = [point.no_store_ttft_s - point.fetch_ttft_s for point in ordered]
    if all(gain > 0 for gain in gains):
        return None, "fetch won at every rate: the crossover is below the lowest rate"
    if all(gain <= 0 for gain in gains):
        return None, "fetch lost at every rate: the crossover is above the highest rate"
    # The last rate at which fetching lost; the next one up won.
    index = max(i for i, gain in enumerate(gains[:-1]) if gain <= 0 and gains[i + 1] > 0)
    low, high = ordered[index].rate_bytes_per_s, ordered[index + 1].rate_bytes_per_s
    loss, win = gains[index], gains[index + 1]
    share = -loss / (win - loss) if win != loss else 0.5
    crossover = math.exp(math.log(low) + share * (math.log(high) - math.log(low)))
    return crossover, f"between {_rate(low)} and {_rate(high)}"


def report_json(report: SweepReport) -> dict[str, object]:
    return dataclasses.asdict(report)


def print_report(report: SweepReport, console: Console) -> None:
    title = (
        f"disagg sweep: {report.model} {report.dtype} on {report.device}, "
        f"{report.prompt_tokens} tokens ({report.num_matched_blocks} blocks stored, "
        f"{report.block_bytes / 1e6:.2f} MB each)"
    )
    table = Table(title=title)
    columns = (
        "DRAM read rate",
        "measured",
        "fetch TTFT",
        "no store",
        "planned",
        "of which match",
        "plan",
        "planned/no store, paired",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "plan" else "right")
    for point in report.points:
        table.add_row(
            _rate(point.rate_bytes_per_s),
            _rate(point.measured_bytes_per_s) if point.measured_bytes_per_s else "-",
            f"{point.fetch_ttft_s * 1e3:.0f} ms",
            f"{point.no_store_ttft_s * 1e3:.0f} ms",
            f"{point.planned_ttft_s * 1e3:.0f} ms",
            f"{point.planned_match_s * 1e3:.2f} ms",
            "fetch" if point.num_load_blocks else "recompute",
            f"{point.planned_over_no_store:.3f}",
        )
    console.print(table)
    console.print(
        f"prefill here: {report.prefill_tokens_per_s:,.0f} tokens/s "
        f"(+{report.prefill_fixed_s * 1e3:.0f} ms a forward)"
    )
    console.print(
        f"break-even predicted: {_rate(report.predicted_break_even_bytes_per_s)} "
        f"(block bytes x prefill tokens/s / block tokens); "
        f"{_rate(report.in_sweep_break_even_bytes_per_s)} at the prefill rate the "
        f"no-store runs showed"
    )
    measured = report.measured_break_even_bytes_per_s
    console.print(
        f"break-even measured:  {_rate(measured) if measured else '-'} ({report.crossover_note})"
    )


def _median(repeats: int, run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(repeats))


def _rate(bytes_per_s: float) -> str:
    if bytes_per_s >= 1e9:
        return f"{bytes_per_s / 1e9:.2f} GB/s"
    return f"{bytes_per_s / 1e6:.1f} MB/s"


def _rates(text: str) -> list[float]:
    try:
        rates = [float(parse_size(part.strip())) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive rates like 20MB,80MB, got {text!r}")
    return rates


def _factors(text: str) -> tuple[float, ...]:
    try:
        factors = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.5,1,2, got {text!r}") from None
    if not factors or min(factors) <= 0 or not all(math.isfinite(f) for f in factors):
        raise argparse.ArgumentTypeError(f"expected positive factors, got {text!r}")
    return factors
