"""`kvstore-bench disagg miss`: what a miss costs the first token, by save mode.

A miss must never be slower than serving without a store: it costs one lookup (none with
the connector's `block_view`) and the saves of what it computes. Each round serves a
fresh prompt (a miss) through the vLLM connector once per variant (saves during or after
the pass; after it with the block view; the block view with no save, which isolates what
the saves cost), each timed beside the same prompt served
by the same engine with no connector at all ("no store", `Engine.without_store`) and by
the model alone ("recompute", without the engine's own scheduling and bookkeeping, which
vLLM pays with or without a store). The three take turns in an order that rotates each
round; a ratio is one round's, so drift of the machine's speed between rounds cancels.
The medians of those ratios are reported per mode.
"""

from __future__ import annotations

import statistics
import uuid
from collections import Counter
from dataclasses import dataclass, field

from torch import Tensor

from kvstore.bench.disagg.engine import Engine
from kvstore.bench.disagg.model import PagedKVCache, Transformer
from kvstore.bench.disagg.serving import StoreRun, namespace_for, random_prompt, recompute
from kvstore.client.vllm_connector import KVStoreConnector


@dataclass(frozen=True)
class Variant:
    """A connector setting per run: saves layer by layer during the pass or once it ends,
    and whether misses are told by the store's block events (no lookup)."""

    save_during_forward: bool
    block_view: bool = False
    save: bool = True  # False: the request asks for no save (what the saves cost)

    def describe(self) -> str:
        if not self.save:
            saves = "off"
        else:
            saves = "during the pass" if self.save_during_forward else "after the pass"
        return f"saves {saves}" + (", block view" if self.block_view else "")


VARIANTS = (
    Variant(True),
    Variant(False),
    Variant(False, block_view=True),
    Variant(False, block_view=True, save=False),
)
# Seeds well away from the agent session's and the warm-up's.
_FIRST_SEED = 50_000_000
# The longest wait for a block view to be complete before the measured rounds.
_VIEW_WAIT_S = 10.0


@dataclass(frozen=True)
class MissReport:
    variant: Variant
    ratios: list[float]  # TTFT through the connector / recompute's, one per round
    match_ms: list[float]  # the scheduler side's lookup and plan, per round
    saved_blocks: int  # over all rounds: the saves did happen
    # TTFT through the connector / the same engine's without a store, one per round
    no_store_ratios: list[float] = field(default_factory=list)
    decisions: dict[str, int] = field(default_factory=dict)  # the plans' reasons, counted

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def median_no_store_ratio(self) -> float:
        return statistics.median(self.no_store_ratios)

    def quartiles(self) -> tuple[float, float]:
        return _quartiles(self.ratios)

    def no_store_quartiles(self) -> tuple[float, float]:
        return _quartiles(self.no_store_ratios)


def _quartiles(ratios: list[float]) -> tuple[float, float]:
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    low, _, high = statistics.quantiles(ratios, n=4)
    return low, high


def run_misses(
    model: Transformer, cache: PagedKVCache, target: str, prompt_tokens: int, rounds: int
) -> list[MissReport]:
    """`rounds` misses of `prompt_tokens` tokens per variant, interleaved."""
    if rounds < 1:
        raise ValueError(f"--repeats must be >= 1, got {rounds}")
    config = model.config
    engines = {
        variant: Engine(
            model,
            cache,
            target,
            namespace_for(config, tenant=f"miss-{uuid.uuid4().hex[:12]}"),
            pin_ttl_s=0.0,
            save_during_forward=variant.save_during_forward,
            block_view=variant.block_view,
        )
        for variant in VARIANTS
    }
    no_store = Engine.without_store(model, cache)
    ratios: dict[Variant, list[float]] = {variant: [] for variant in VARIANTS}
    no_store_ratios: dict[Variant, list[float]] = {variant: [] for variant in VARIANTS}
    match_ms: dict[Variant, list[float]] = {variant: [] for variant in VARIANTS}
    saved = dict.fromkeys(VARIANTS, 0)
    decisions: dict[Variant, Counter[str]] = {variant: Counter() for variant in VARIANTS}
    try:
        for offset, engine in enumerate(engines.values()):
            # Connect, measure a prefill and a fetch: a serving worker did long before.
            warm = random_prompt(config, prompt_tokens + 1, _FIRST_SEED - 1 - offset)
            engine.serve(warm.to(model.device), 1)
            engine.serve(warm.to(model.device), 1, save=False)
        no_store.serve(warm.to(model.device), 1)
        for variant, engine in engines.items():
            scheduler = engine.scheduler
            if (
                variant.block_view
                and isinstance(scheduler, KVStoreConnector)
                and not scheduler.scheduler_side.wait_for_block_view(_VIEW_WAIT_S)
            ):
                raise RuntimeError(f"the block view was not complete in {_VIEW_WAIT_S} s")
        seed = _FIRST_SEED
        for index in range(rounds):
            for number, (variant, engine) in enumerate(engines.items()):
                prompt = random_prompt(config, prompt_tokens, seed).to(model.device)
                seed += 1
                # The order rotates: each one finds the pages and caches another left.
                stored, no_store_s, recompute_s = _one_round(
                    engine,
                    no_store,
                    prompt,
                    first=(index + number) % len(_TURNS),
                    save=variant.save,
                )
                if stored.num_reused_tokens or stored.num_matched_tokens:
                    raise RuntimeError(f"prompt seed {seed - 1} was not a miss")
                ratios[variant].append(stored.ttft_s / recompute_s)
                no_store_ratios[variant].append(stored.ttft_s / no_store_s)
                match_ms[variant].append(stored.match_s * 1000)
                saved[variant] += stored.num_saved_blocks
                decisions[variant][stored.decision] += 1
    finally:
        for engine in engines.values():
            engine.close()
        no_store.close()
    return [
        MissReport(
            variant,
            ratios[variant],
            match_ms[variant],
            saved[variant],
            no_store_ratios[variant],
            dict(decisions[variant]),
        )
        for variant in VARIANTS
    ]


_TURNS = ("store", "no store", "recompute")


def _one_round(
    engine: Engine, no_store: Engine, prompt: Tensor, *, first: int, save: bool
) -> tuple[StoreRun, float, float]:
    """`prompt` through the store, through the engine without one, and through the model
    alone, starting with turn `first`: the store's run and the other two's TTFTs."""
    stored: StoreRun | None = None
    no_store_s = recompute_s = 0.0
    for turn in _TURNS[first:] + _TURNS[:first]:
        if turn == "store":
            stored = engine.serve(prompt, 1, save=save)
        elif turn == "no store":
            no_store_s = no_store.serve(prompt, 1).ttft_s
        else:
            recompute_s = recompute(engine.model, engine.cache, prompt, 1).ttft_s
    assert stored is not None
    return stored, no_store_s, recompute_s


def describe(report: MissReport) -> str:
    low, high = report.quartiles()
    engine_low, engine_high = report.no_store_quartiles()
    return (
        f"{report.variant.describe()}: miss TTFT, median of {len(report.ratios)} rounds: "
        f"/ the engine without a store {report.median_no_store_ratio:.3f} "
        f"(quartiles {engine_low:.3f}-{engine_high:.3f}), "
        f"/ the model alone {report.median_ratio:.3f} (quartiles {low:.3f}-{high:.3f}); "
        f"lookup and plan {statistics.median(report.match_ms):.2f} ms; "
        f"{report.saved_blocks} blocks saved"
    )
