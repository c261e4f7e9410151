"""An agent session whose context only grows: each turn appends a tool result and the model's
reply, and the next turn reuses, through the store, everything the earlier turns cached.

Per turn, the same process serves the context three ways on the same cache: through the engine
(kvstore.bench.disagg.engine: the vLLM connector's scheduler side decides fetch or recompute,
its worker side loads layer by layer while the suffix computes and saves the new blocks, the
reply's too, after the first token), by full recompute, and as the overhead-free bound: the
fetch at the bandwidth the connector measured plus the prefill of the suffix alone, over a
prefix already in the cache. Time to first token (TTFT) runs from the request to the first
token's logits. The session's chain stays pinned between turns (`pin_ttl_s`, the think time)
and is released by the last turn.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.table import Table

from kvstore.bench.disagg.engine import Engine
from kvstore.bench.disagg.model import PagedKVCache, Sequence, Transformer
from kvstore.bench.disagg.serving import random_prompt, recompute


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    """The shape of a session: turn 1 is the system prompt and task, every later turn
    appends a tool result of between `tool_tokens[0]` and `tool_tokens[1]` tokens."""

    turns: int = 8
    system_tokens: int = 512
    tool_tokens: tuple[int, int] = (256, 1536)
    decode_tokens: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        low, high = self.tool_tokens
        if self.turns < 1 or self.system_tokens < 1 or self.decode_tokens < 1:
            raise ValueError("turns, system_tokens and decode_tokens must be positive")
        if not 1 <= low <= high:
            raise ValueError(f"tool_tokens must be 1 <= low <= high, got {self.tool_tokens}")

    @property
    def max_context_tokens(self) -> int:
        return self.system_tokens + self.turns * (self.tool_tokens[1] + self.decode_tokens)


@dataclass(frozen=True)
class TurnReport:
    """One turn, served with the store and by recompute."""

    turn: int
    context_tokens: int
    reused_tokens: int
    computed_tokens: int
    bytes_fetched: int
    ttft_store_s: float
    ttft_recompute_s: float
    load_stall_s: float
    saved_blocks: int
    first_token_match: bool
    max_logit_diff: float  # first token's logits, store vs recompute
    fallback: str | None  # why the store was bypassed, if it was
    save_error: str | None
    decision: str  # the connector's fetch-or-recompute reason
    matched_tokens: int  # stored when the turn began, loaded or not
    bound_s: float  # fetch at the measured bandwidth + prefill of the suffix alone

    @property
    def speedup(self) -> float:
        return self.ttft_recompute_s / self.ttft_store_s

    @property
    def over_bound(self) -> float:
        """TTFT with the store over the overhead-free bound (1.0: no overhead)."""
        return self.ttft_store_s / self.bound_s


def run_session(
    engine: Engine,
    settings: AgentSettings,
    on_turn: Callable[[TurnReport], None] | None = None,
) -> list[TurnReport]:
    """Run `settings.turns` turns; the engine's cache must hold `settings.max_context_tokens`."""
    model, cache = engine.model, engine.cache
    config = model.config
    _warm_up(engine, settings)
    lengths = torch.randint(
        settings.tool_tokens[0],
        settings.tool_tokens[1] + 1,
        (settings.turns,),
        generator=torch.Generator().manual_seed(settings.seed),
    )
    context = random_prompt(config, settings.system_tokens, settings.seed)
    reports: list[TurnReport] = []
    for turn in range(1, settings.turns + 1):
        if turn > 1:
            tool_result = random_prompt(config, int(lengths[turn - 1]), settings.seed + turn)
            context = torch.cat([context, tool_result])
        prompt = context.to(model.device)
        stored = engine.serve(
            prompt,
            settings.decode_tokens,
            session=f"agent-{settings.seed}",
            session_end=turn == settings.turns,
        )
        baseline = recompute(model, cache, prompt, 1)
        bandwidth = engine.scheduler.scheduler_side.fetch_bytes_per_s
        fetch_s = stored.bytes_fetched / bandwidth if stored.bytes_fetched and bandwidth else 0.0
        suffix_s = _suffix_prefill_s(model, cache, prompt, stored.num_reused_tokens)
        report = TurnReport(
            turn=turn,
            context_tokens=context.numel(),
            reused_tokens=stored.num_reused_tokens,
            computed_tokens=context.numel() - stored.num_reused_tokens,
            bytes_fetched=stored.bytes_fetched,
            ttft_store_s=stored.ttft_s,
            ttft_recompute_s=baseline.ttft_s,
            load_stall_s=stored.load_stall_s,
            saved_blocks=stored.num_saved_blocks,
            first_token_match=stored.token_ids[0] == baseline.token_ids[0],
            max_logit_diff=float((stored.logits[0] - baseline.logits[0]).abs().max()),
            fallback=stored.fallback,
            save_error=stored.save_error,
            decision=stored.decision,
            matched_tokens=stored.num_matched_tokens,
            bound_s=fetch_s + suffix_s,
        )
        reports.append(report)
        if on_turn is not None:
            on_turn(report)
        context = torch.cat([context, torch.tensor(stored.token_ids, dtype=context.dtype)])
    return reports


def _suffix_prefill_s(
    model: Transformer, cache: PagedKVCache, prompt: torch.Tensor, num_reused: int
) -> float:
    """The prefill of `prompt[num_reused:]` alone, over a prefix already in the cache."""
    seq = Sequence()
    try:
        if num_reused:
            model.forward(prompt[:num_reused], seq, cache, last_logits_only=True)
        start = time.perf_counter()
        model.forward(prompt[num_reused:], seq, cache, last_logits_only=True)
        return time.perf_counter() - start
    finally:
        cache.free(seq)


def _warm_up(engine: Engine, settings: AgentSettings) -> None:
    """A prompt the size of turn 1, saved and then loaded, so that turn 1 pays neither for
    lazy initialisation nor for connecting to the server (a serving worker would have done
    both long before), and the connector has measured a prefill and a fetch."""
    config = engine.model.config
    num_tokens = max(settings.system_tokens, 2 * config.page_tokens) + 1
    # A seed no session uses: its blocks share no prefix with the session's.
    prompt = random_prompt(config, num_tokens, settings.seed + 1_000_003).to(engine.model.device)
    engine.serve(prompt, 1)
    engine.serve(prompt, 1, save=False)


def describe_turn(report: TurnReport) -> str:
    line = (
        f"turn {report.turn}: context {report.context_tokens} tokens, reused "
        f"{report.reused_tokens}, fetched {_mib(report.bytes_fetched)}, TTFT store "
        f"{report.ttft_store_s * 1000:.0f} ms vs recompute {report.ttft_recompute_s * 1000:.0f} "
        f"ms ({report.speedup:.1f}x), bound {report.bound_s * 1000:.0f} ms "
        f"({report.over_bound:.2f}x); {report.decision}"
    )
    notes = [note for note in (report.fallback, report.save_error) if note]
    return line + "".join(f" [{note}]" for note in notes)


def summary_table(reports: list[TurnReport], title: str) -> Table:
    table = Table(title=title)
    columns = (
        "turn",
        "context",
        "reused",
        "computed",
        "fetched",
        "decision",
        "TTFT store",
        "TTFT recompute",
        "bound",
        "store/bound",
        "speed-up",
        "load stall",
        "same token",
        "max |Δlogit|",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for r in reports:
        table.add_row(
            str(r.turn),
            str(r.context_tokens),
            str(r.reused_tokens),
            str(r.computed_tokens),
            _mib(r.bytes_fetched),
            r.decision,
            f"{r.ttft_store_s * 1000:.0f} ms",
            f"{r.ttft_recompute_s * 1000:.0f} ms",
            f"{r.bound_s * 1000:.0f} ms",
            f"{r.over_bound:.2f}x",
            f"{r.speedup:.1f}x",
            f"{r.load_stall_s * 1000:.0f} ms",
            "yes" if r.first_token_match else "NO",
            f"{r.max_logit_diff:.2e}",
        )
    store_s = sum(r.ttft_store_s for r in reports)
    recompute_s = sum(r.ttft_recompute_s for r in reports)
    bound_s = sum(r.bound_s for r in reports)
    table.add_section()
    table.add_row(
        "all",
        "",
        str(sum(r.reused_tokens for r in reports)),
        str(sum(r.computed_tokens for r in reports)),
        _mib(sum(r.bytes_fetched for r in reports)),
        "",
        f"{store_s * 1000:.0f} ms",
        f"{recompute_s * 1000:.0f} ms",
        f"{bound_s * 1000:.0f} ms",
        f"{store_s / bound_s:.2f}x",
        f"{recompute_s / store_s:.1f}x",
        f"{sum(r.load_stall_s for r in reports) * 1000:.0f} ms",
        "yes" if all(r.first_token_match for r in reports) else "NO",
        f"{max(r.max_logit_diff for r in reports):.2e}",
    )
    return table


def reports_json(reports: list[TurnReport], context: dict[str, object]) -> str:
    turns = [{**asdict(r), "speedup": r.speedup, "over_bound": r.over_bound} for r in reports]
    store_s = sum(r.ttft_store_s for r in reports)
    recompute_s = sum(r.ttft_recompute_s for r in reports)
    totals = {"ttft_store_s": store_s, "ttft_recompute_s": recompute_s}
    return json.dumps({**context, "turns": turns, "totals": totals}, indent=2)


def print_turn(console: Console) -> Callable[[TurnReport], None]:
    def show(report: TurnReport) -> None:
        console.print(describe_turn(report))

    return show


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"
