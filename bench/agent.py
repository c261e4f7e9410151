"""`kvstore-bench agent`: synthetic agent sessions whose context snowballs turn after turn.

A session is one agent task of 10–30 model calls (turns). Every session's context starts with the
same system prompt and tool definitions (one token sequence, whatever the run or session), then
the user's task; each later turn appends the previous reply and a tool result. Before each turn
the agent "runs its tool" (think time). A turn is one request to the store: look up the chained
keys of the prompt's full blocks, get the hit prefix, put the blocks after it. So:

- the shared prefix hashes to the same key chain in every session: a session's first turn hits it
  once any earlier session stored it;
- a session's later turns hit its own previous context, up to the block the last turn left
  partial, and put only what is new.

Token ids are synthetic (seeded draws), which is all the store sees of them: keys are the client
library's chained prefix hashes (`kvstore.keys.chain_keys`).
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np

from kvstore.bench.command import (
    add_load_arguments,
    add_model_arguments,
    load_config_from_args,
    model_layout,
    parse_count,
    parse_range,
    run_command,
)
from kvstore.bench.load import LoadConfig
from kvstore.bench.workload import PIN, UNPIN, UnitContext, fetch_and_store
from kvstore.client import KVStoreClientError, Namespace
from kvstore.keys import chain_keys

SHARED_PREFIX_SEED = 0x5EED_0001  # the same system prompt and tools in every run
FIRST_TURN, LATER_TURNS = "first turn", "later turns"


@dataclass(frozen=True, kw_only=True)
class AgentProfile:
    """The shape of a session; ranges are inclusive ``(low, high)`` and drawn uniformly."""

    system_prompt_tokens: int = 4096
    tool_definitions_tokens: int = 2048
    turns: tuple[int, int] = (10, 30)
    task_tokens: tuple[int, int] = (200, 1000)
    tool_result_tokens: tuple[int, int] = (1000, 6000)
    reply_tokens: tuple[int, int] = (100, 1000)
    max_context_tokens: int = 131_072
    think_time_s: tuple[float, float] = (0.5, 2.0)
    vocab_size: int = 128_256

    def __post_init__(self) -> None:
        for name in ("turns", "task_tokens", "tool_result_tokens", "reply_tokens", "think_time_s"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be a range 0 <= low <= high, got {low}-{high}")
        if self.turns[0] < 1:
            raise ValueError("a session needs at least one turn")
        if self.system_prompt_tokens + self.tool_definitions_tokens < 1:
            raise ValueError("the shared prefix needs at least one token")
        if self.max_context_tokens < 1 or self.vocab_size < 2:
            raise ValueError("max_context_tokens must be >= 1 and vocab_size >= 2")

    @property
    def shared_prefix_tokens(self) -> int:
        return self.system_prompt_tokens + self.tool_definitions_tokens


@cache
def shared_prefix(profile: AgentProfile) -> np.ndarray:
    """The system prompt and tool definitions every session starts with (the same every run)."""
    rng = np.random.default_rng(SHARED_PREFIX_SEED)
    return rng.integers(0, profile.vocab_size, profile.shared_prefix_tokens, dtype=np.uint32)


def session_prompts(profile: AgentProfile, seed: int, session_index: int) -> Iterator[np.ndarray]:
    """The prompt of each turn of one session; a prompt is the previous one plus new tokens.

    Turn 1: shared prefix + task. Turn k > 1: prompt k-1 + reply k-1 + tool result k. The session
    ends after its drawn number of turns, or before a prompt would exceed the context limit.
    """
    rng = np.random.default_rng([seed, session_index])

    def draw(span: tuple[int, int]) -> np.ndarray:
        length = int(rng.integers(span[0], span[1] + 1))
        return rng.integers(0, profile.vocab_size, length, dtype=np.uint32)

    num_turns = int(rng.integers(profile.turns[0], profile.turns[1] + 1))
    prompt = np.concatenate([shared_prefix(profile), draw(profile.task_tokens)])
    for turn in range(num_turns):
        if turn:
            reply, tool_result = draw(profile.reply_tokens), draw(profile.tool_result_tokens)
            prompt = np.concatenate([prompt, reply, tool_result])
        if prompt.size > profile.max_context_tokens:
            return
        yield prompt


@dataclass(frozen=True)
class AgentWorkload:
    """Sessions as units: unit ``i`` is session ``i`` of the run's seed (see `session_prompts`)."""

    profile: AgentProfile
    namespace: Namespace
    seed: int
    pin_ttl_s: float = 0.0
    max_sessions: int | None = None
    name: str = "agent"
    unit_name: str = "session"
    unit_op: str = "turn"

    def num_units(self) -> int | None:
        return self.max_sessions

    def arrival_offsets_s(self) -> None:
        return None

    def describe(self) -> dict[str, object]:
        layout = self.namespace.layout
        return {
            **asdict(self.profile),
            "seed": self.seed,
            "pin_ttl_s": self.pin_ttl_s,
            "bytes_per_token": layout.bytes_per_token,
            "block_tokens": layout.block_tokens,
            "block_bytes": layout.block_bytes,
            "namespace": self.namespace.describe(),
        }

    async def run_unit(self, index: int, context: UnitContext) -> None:
        """Run session ``index`` until its last turn or the deadline."""
        think = np.random.default_rng([self.seed, index, 1])
        block_tokens = self.namespace.layout.block_tokens
        keys: list[bytes] = []
        for turn, prompt in enumerate(session_prompts(self.profile, self.seed, index)):
            if turn and not await context.sleep(float(think.uniform(*self.profile.think_time_s))):
                break
            if context.time_left() <= 0:
                break
            keys = chain_keys(prompt, block_tokens)
            group = FIRST_TURN if turn == 0 else LATER_TURNS
            outcome = await fetch_and_store(context, keys, num_tokens=prompt.size, group=group)
            if outcome is not None and self.pin_ttl_s > 0:
                await self._lease(context, PIN, keys)
        if keys and self.pin_ttl_s > 0:
            await self._lease(context, UNPIN, keys)

    async def _lease(self, context: UnitContext, op: str, keys: list[bytes]) -> None:
        # Keep the session's chain resident through the think time; a failed lease only costs
        # hits, so it is recorded and the session goes on.
        client = context.client
        call = client.pin(keys, self.pin_ttl_s) if op == PIN else client.unpin(keys)
        with contextlib.suppress(KVStoreClientError):
            await context.recorder.measured(op, call)


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvstore-bench agent``."""
    add_model_arguments(parser, scale="1/64", block_tokens=256)
    defaults = AgentProfile()
    group = parser.add_argument_group("sessions (ranges are LOW-HIGH, token counts take K)")
    group.add_argument("--sessions", type=int, help="stop after this many sessions in all")
    group.add_argument("--turns", default="10-30", help="turns per session (default 10-30)")
    group.add_argument(
        "--system-tokens",
        type=parse_count,
        default=defaults.system_prompt_tokens,
        help=f"system prompt shared by every session (default {defaults.system_prompt_tokens})",
    )
    group.add_argument(
        "--tool-tokens",
        type=parse_count,
        default=defaults.tool_definitions_tokens,
        help=f"tool definitions, shared too (default {defaults.tool_definitions_tokens})",
    )
    group.add_argument("--task-tokens", default="200-1000", help="the user's task, turn 1")
    group.add_argument(
        "--tool-result-tokens", default="1000-6000", help="added each turn (default 1000-6000)"
    )
    group.add_argument("--reply-tokens", default="100-1000", help="added each turn")
    group.add_argument(
        "--max-context",
        type=parse_count,
        default=defaults.max_context_tokens,
        help="a session ends before its context passes this (default 128K)",
    )
    group.add_argument("--think-time", default="0.5-2.0", help="seconds of tool call between turns")
    group.add_argument(
        "--pin-ttl",
        type=float,
        default=0.0,
        help="lease each session's chain for S seconds after every turn (default: no pins)",
    )
    add_load_arguments(parser, duration=20.0, concurrency=4, ramp_up=2.0)


def run_agent(args: argparse.Namespace) -> int:
    """Run ``kvstore-bench agent``; returns the exit status."""
    workload, config, settings = agent_load_from_args(args)
    return run_command(args, workload, config, settings=settings)


def agent_load_from_args(
    args: argparse.Namespace,
) -> tuple[AgentWorkload, LoadConfig, dict[str, object]]:
    """The workload, load shape and report settings that `add_agent_arguments`' flags say."""
    profile = AgentProfile(
        system_prompt_tokens=args.system_tokens,
        tool_definitions_tokens=args.tool_tokens,
        turns=parse_range(args.turns, int),
        task_tokens=parse_range(args.task_tokens, parse_count),
        tool_result_tokens=parse_range(args.tool_result_tokens, parse_count),
        reply_tokens=parse_range(args.reply_tokens, parse_count),
        max_context_tokens=args.max_context,
        think_time_s=parse_range(args.think_time, float),
    )
    preset, layout = model_layout(args)
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    workload = AgentWorkload(
        profile=profile,
        namespace=Namespace(
            tenant="kvstore-bench", model_fingerprint=f"{preset.name}@agent", layout=layout
        ),
        seed=seed,
        pin_ttl_s=args.pin_ttl,
        max_sessions=args.sessions,
    )
    config = load_config_from_args(args, seed=seed)
    settings = {"preset": preset.name, "scale": args.scale, **workload.describe()}
    return workload, config, settings
