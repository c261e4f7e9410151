"""`kvstore-bench disagg miss`: what a miss costs the first token, by save mode.

A miss must never be slower than serving without a store: it costs one lookup and the
saves of what it computes. Each round serves a fresh prompt (a miss) through the vLLM
connector once per `save_during_forward` mode, each paired with a plain recompute of the
same prompt timed beside it (which goes first alternates); a ratio is one such pair, so
drift of the machine's speed between rounds cancels. The medians of those ratios are
reported per mode. The recompute is the model alone, without the emulated engine's own
scheduling, so the ratio errs against the store.
"""

from __future__ import annotations

import statistics
import uuid
from dataclasses import dataclass

from kvstore.bench.disagg.engine import Engine
from kvstore.bench.disagg.model import PagedKVCache, Transformer
from kvstore.bench.disagg.serving import namespace_for, random_prompt, recompute

# The connector's save modes: layer by layer during the pass, or once it ends.
SAVE_MODES = (True, False)
# Seeds well away from the agent session's and the warm-up's.
_FIRST_SEED = 50_000_000


@dataclass(frozen=True)
class MissReport:
    save_during_forward: bool
    ratios: list[float]  # TTFT through the connector / recompute's, one per round
    match_ms: list[float]  # the scheduler side's lookup and plan, per round
    saved_blocks: int  # over all rounds: the saves did happen

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)

    def quartiles(self) -> tuple[float, float]:
        if len(self.ratios) < 2:
            return self.ratios[0], self.ratios[0]
        low, _, high = statistics.quantiles(self.ratios, n=4)
        return low, high


def run_misses(
    model: Transformer, cache: PagedKVCache, target: str, prompt_tokens: int, rounds: int
) -> list[MissReport]:
    """`rounds` misses of `prompt_tokens` tokens per save mode, interleaved."""
    if rounds < 1:
        raise ValueError(f"--repeats must be >= 1, got {rounds}")
    config = model.config
    engines = {
        mode: Engine(
            model,
            cache,
            target,
            namespace_for(config, tenant=f"miss-{uuid.uuid4().hex[:12]}"),
            pin_ttl_s=0.0,
            save_during_forward=mode,
        )
        for mode in SAVE_MODES
    }
    ratios: dict[bool, list[float]] = {mode: [] for mode in SAVE_MODES}
    match_ms: dict[bool, list[float]] = {mode: [] for mode in SAVE_MODES}
    saved = dict.fromkeys(SAVE_MODES, 0)
    try:
        for offset, engine in enumerate(engines.values()):
            # Connect, measure a prefill and a fetch: a serving worker did long before.
            warm = random_prompt(config, prompt_tokens + 1, _FIRST_SEED - 1 - offset)
            engine.serve(warm.to(model.device), 1)
            engine.serve(warm.to(model.device), 1, save=False)
        seed = _FIRST_SEED
        for index in range(rounds):
            for mode, engine in engines.items():
                prompt = random_prompt(config, prompt_tokens, seed).to(model.device)
                seed += 1
                # Which of the pair goes first alternates: the second finds the pages
                # and caches the first left.
                if (index + int(mode)) % 2:
                    baseline = recompute(model, cache, prompt, 1)
                    run = engine.serve(prompt, 1)
                else:
                    run = engine.serve(prompt, 1)
                    baseline = recompute(model, cache, prompt, 1)
                if run.num_reused_tokens or run.num_matched_tokens:
                    raise RuntimeError(f"prompt seed {seed - 1} was not a miss")
                ratios[mode].append(run.ttft_s / baseline.ttft_s)
                match_ms[mode].append(run.match_s * 1000)
                saved[mode] += run.num_saved_blocks
    finally:
        for engine in engines.values():
            engine.close()
    return [MissReport(mode, ratios[mode], match_ms[mode], saved[mode]) for mode in SAVE_MODES]


def describe(report: MissReport) -> str:
    low, high = report.quartiles()
    mode = "during the pass" if report.save_during_forward else "after the pass"
    return (
        f"saves {mode}: miss TTFT / recompute, median of {len(report.ratios)} pairs "
        f"{report.median_ratio:.3f} (quartiles {low:.3f}-{high:.3f}); lookup and plan "
        f"{statistics.median(report.match_ms):.2f} ms; {report.saved_blocks} blocks saved"
    )
