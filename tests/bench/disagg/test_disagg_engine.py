"""The emulator's engine drives KVStoreConnector's two roles over a real server and a real
model: fetch or recompute, the cost of a miss, agent sessions' pins, chunked prefill."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from kvstore.bench.disagg.engine import Engine
from kvstore.bench.disagg.model import Transformer, generate_greedy
from kvstore.bench.disagg.serving import cache_for, model_config, namespace_for, random_prompt
from kvstore.client import SyncKVClient

CONFIG = model_config("tiny")
BLOCK = CONFIG.page_tokens


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(CONFIG)


def reference(model: Transformer, prompt: torch.Tensor, num_tokens: int) -> list[int]:
    return generate_greedy(model, prompt, num_tokens, cache_for(model, 300)).token_ids


def engine_for(model: Transformer, target: str, tenant: str, **settings: object) -> Engine:
    namespace = namespace_for(CONFIG, tenant=tenant)
    return Engine(model, cache_for(model, 300), target, namespace, **settings)


@pytest.mark.parametrize(
    ("prefill_tokens_per_s", "fetch_overhead_s", "matched_blocks", "reused_blocks", "decision"),
    [
        (1.0, 0.0, 4, 4, "fetch"),
        # Starting a fetch costs more than recomputing the match: looked up, then recomputed.
        (1.0, 1e3, 4, 0, "recompute: fetching 4 block(s)"),
        # No rate could beat recomputing: no lookup at all, so the match is unknown (0).
        (1e12, 0.0, 0, 0, "recompute, no lookup"),
    ],
)
def test_the_scheduler_side_fetches_only_what_beats_recompute(
    model: Transformer,
    store_target: str,
    prefill_tokens_per_s: float,
    fetch_overhead_s: float,
    matched_blocks: int,
    reused_blocks: int,
    decision: str,
) -> None:
    prompt = random_prompt(CONFIG, 4 * BLOCK + 5, seed=11)
    tenant = f"decision-{reused_blocks}-{matched_blocks}"
    with engine_for(model, store_target, tenant) as saver:
        saver.serve(prompt, 1, load=False)
    settings = {
        "prefill_tokens_per_s": prefill_tokens_per_s,
        "fetch_bytes_per_s": 1e9,
        "fetch_overhead_s": fetch_overhead_s,
    }
    with engine_for(model, store_target, tenant, **settings) as engine:
        run = engine.serve(prompt, 4, save=False)
    assert run.num_matched_tokens == matched_blocks * BLOCK
    assert run.num_reused_tokens == reused_blocks * BLOCK
    assert run.decision.startswith(decision), run.decision
    assert run.fallback is None
    assert run.token_ids == reference(model, prompt, 4)


def test_a_miss_costs_one_lookup_and_no_get(model: Transformer, store_target: str) -> None:
    namespace = namespace_for(CONFIG, tenant="miss")
    with (
        engine_for(model, store_target, "miss") as engine,
        SyncKVClient(store_target, namespace) as client,
    ):
        before = client.stats()
        run = engine.serve(random_prompt(CONFIG, 5 * BLOCK + 1, seed=12), 3, save=False)
        after = client.stats()
    assert run.num_reused_tokens == 0
    assert run.decision == "miss"
    assert after.lookups - before.lookups == 1
    assert after.blocks_got == before.blocks_got
    assert after.blocks_put == before.blocks_put


def test_the_engine_without_a_store_serves_what_the_model_does_and_asks_no_one(
    model: Transformer, store_target: str
) -> None:
    prompt = random_prompt(CONFIG, 5 * BLOCK + 1, seed=13)
    with SyncKVClient(store_target, namespace_for(CONFIG, tenant="miss")) as client:
        before = client.stats()
        with Engine.without_store(model, cache_for(model, 300), chunk_tokens=BLOCK) as engine:
            run = engine.serve(prompt, 4)
        after = client.stats()
    assert run.token_ids == reference(model, prompt, 4)
    assert (run.num_reused_tokens, run.num_saved_blocks, run.decision) == (0, 0, "")
    assert (after.lookups, after.blocks_put) == (before.lookups, before.blocks_put)


def pinned_left(target: str, tenant: str, prompt: torch.Tensor) -> int:
    """Delete the chain of `prompt`: how many of its blocks stayed because they are pinned."""
    with SyncKVClient(target, namespace_for(CONFIG, tenant=tenant)) as client:
        _, left = client.delete(client.keys(prompt)[:1])
    return left


def test_a_sessions_chain_stays_pinned_until_the_session_ends(
    model: Transformer, store_target: str
) -> None:
    first = random_prompt(CONFIG, 3 * BLOCK + 2, seed=13)
    with engine_for(model, store_target, "session", pin_ttl_s=60.0) as engine:
        turn = engine.serve(first, 4, session="s1")
        engine.scheduler.scheduler_side.wait_for_control_calls()
        assert turn.num_saved_blocks == 3
        # The think time of a tool call: the chain cannot be evicted or deleted.
        assert pinned_left(store_target, "session", first) == 3
        follow_up = torch.cat([first, torch.tensor(turn.token_ids), random_prompt(CONFIG, 9, 14)])
        last = engine.serve(follow_up, 2, session="s1", session_end=True)
        engine.scheduler.scheduler_side.wait_for_control_calls()
    assert last.num_reused_tokens == 3 * BLOCK
    assert pinned_left(store_target, "session", first) == 0


def test_a_pin_lapses_after_its_ttl(model: Transformer, store_target: str) -> None:
    prompt = random_prompt(CONFIG, 2 * BLOCK + 2, seed=15)
    with engine_for(model, store_target, "ttl", pin_ttl_s=0.3) as engine:
        engine.serve(prompt, 1, session="s2")
        engine.scheduler.scheduler_side.wait_for_control_calls()
    time.sleep(0.6)
    assert pinned_left(store_target, "ttl", prompt) == 0


def test_without_a_pin_ttl_nothing_is_pinned(model: Transformer, store_target: str) -> None:
    prompt = random_prompt(CONFIG, 2 * BLOCK + 2, seed=16)
    with engine_for(model, store_target, "nopin") as engine:
        engine.serve(prompt, 1, session="s3")
    assert pinned_left(store_target, "nopin", prompt) == 0


@pytest.mark.parametrize("chunk_tokens", [BLOCK - 3, BLOCK, 2 * BLOCK + 5])
def test_chunked_prefill_loads_saves_and_matches(
    model: Transformer, store_target: str, chunk_tokens: int
) -> None:
    tenant = f"chunked-{chunk_tokens}"
    saved = random_prompt(CONFIG, 3 * BLOCK + 4, seed=17)
    extended = torch.cat([saved, random_prompt(CONFIG, 3 * BLOCK + 1, seed=18)])
    with engine_for(model, store_target, tenant, chunk_tokens=chunk_tokens) as engine:
        first = engine.serve(saved, 3)
        second = engine.serve(extended, 3)
        third = engine.serve(extended, 3, save=False)
    assert (first.num_reused_tokens, first.num_saved_blocks) == (0, 3)
    assert second.num_reused_tokens == 3 * BLOCK
    assert second.num_saved_blocks == 3  # blocks 3..5 of the extended prompt
    assert third.num_reused_tokens == 6 * BLOCK
    assert first.token_ids == reference(model, saved, 3)
    assert second.token_ids == third.token_ids == reference(model, extended, 3)


def test_blocks_that_decoding_fills_are_saved_under_the_chain_keys_of_the_whole_text(
    model: Transformer, store_target: str
) -> None:
    # The scheduler side hashes only the blocks each step fills, continuing the chain
    # from its last key: the next turn, prompted with everything so far, loads them all.
    prompt = random_prompt(CONFIG, 2 * BLOCK + 3, seed=19)
    with engine_for(model, store_target, "decoded") as engine:
        first = engine.serve(prompt, 3 * BLOCK)
        text = torch.cat([prompt, torch.tensor(first.token_ids[:-1])])
        second = engine.serve(text, 2, save=False)
    assert first.num_saved_blocks == len(text) // BLOCK  # prompt's 2, decoding's 3
    assert second.num_reused_tokens == (len(text) - 1) // BLOCK * BLOCK
    assert second.token_ids == reference(model, text, 2)


def test_engine_rejects_a_bad_chunk_size(model: Transformer, store_target: str) -> None:
    with pytest.raises(ValueError, match="chunk_tokens"):
        engine_for(model, store_target, "bad", chunk_tokens=0)
