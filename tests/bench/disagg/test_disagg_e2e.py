"""Prefill and decode in separate processes through a real server, against one process that
never used the store: same tokens, logits within the dtype's tolerance."""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from kvstore.bench.disagg import decode_worker, prefill_worker
from kvstore.bench.disagg.agent import AgentSettings, reports_json, run_session
from kvstore.bench.disagg.engine import Engine
from kvstore.bench.disagg.model import Sequence, Transformer, generate_greedy
from kvstore.bench.disagg.serving import (
    ConnectorHooks,
    StoreRun,
    cache_for,
    logit_tolerance,
    model_config,
    namespace_for,
    random_prompt,
)
from kvstore.client import SyncKVClient
from kvstore.client.connector import KVConnector, KVLoadError
from kvstore.client.vllm_connector import KVStoreConnectorMetadata

DECODE_TOKENS = 6
BLOCK = model_config("tiny").page_tokens


@dataclass(frozen=True)
class Case:
    prompt: torch.Tensor
    reused_tokens: int  # what the decode worker should load


def make_cases(dtype: str) -> tuple[list[torch.Tensor], dict[str, Case]]:
    """Prompts for the prefill worker, and the decode worker's cases."""
    config = model_config("tiny", dtype)
    saved = random_prompt(config, 2 * BLOCK + 8, seed=1)
    exact = random_prompt(config, 3 * BLOCK, seed=2)
    extended = torch.cat([saved, random_prompt(config, 2 * BLOCK + 5, seed=3)])
    cases = {
        "full hit": Case(saved, 2 * BLOCK),
        # Every block is stored, but the last token must be computed: one block is not loaded.
        "whole prompt stored": Case(exact, 2 * BLOCK),
        "partial hit": Case(extended, 2 * BLOCK),
        "miss": Case(random_prompt(config, 2 * BLOCK + 3, seed=4), 0),
    }
    return [saved, exact], cases


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def worker_runs(
    store_target: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[StoreRun]]:
    """float32 through a prefill process, then a decode process."""
    workdir = tmp_path_factory.mktemp("disagg")
    saved_prompts, cases = make_cases("float32")
    # One thread: a tiny model gains nothing from two, and loses a lot when the cores are busy.
    prefill = prefill_worker.launch(
        store_target, workdir, model="tiny", dtype="float32", device="cpu", threads=1
    )
    decode = decode_worker.launch(
        store_target,
        workdir,
        decode_tokens=DECODE_TOKENS,
        model="tiny",
        dtype="float32",
        device="cpu",
        threads=1,
    )
    # The decode process starts up while the prefill process works; it is handed its
    # prompts only once the prefill process has saved them.
    prefill.submit(saved_prompts)
    saved = prefill.wait(60)
    decode.submit([case.prompt for case in cases.values()])
    decoded = decode.wait(60)
    return {"prefill": saved, "decode": decoded}


def in_process_runs(target: str, dtype: str) -> dict[str, list[StoreRun]]:
    """The flow of the worker processes, in this process: each side has its own cache."""
    config = model_config("tiny", dtype)
    saved_prompts, cases = make_cases(dtype)
    model = Transformer(config)
    cache = cache_for(model, 200)
    with Engine(model, cache, target, namespace_for(config)) as engine:
        saved = [engine.serve(prompt, 1, load=False) for prompt in saved_prompts]
    cache = cache_for(model, 200)
    with Engine(model, cache, target, namespace_for(config)) as engine:
        decoded = [engine.serve(case.prompt, DECODE_TOKENS, save=False) for case in cases.values()]
    return {"prefill": saved, "decode": decoded}


def reference(dtype: str, prompt: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    model = Transformer(model_config("tiny", dtype))
    generation = generate_greedy(model, prompt, DECODE_TOKENS, cache_for(model, 200))
    return generation.token_ids, generation.logits


def check_decoded(runs: dict[str, list[StoreRun]], dtype: str) -> None:
    assert [run.num_saved_blocks for run in runs["prefill"]] == [2, 3]
    assert all(run.save_error is None for run in runs["prefill"])
    config = model_config("tiny", dtype)
    block_bytes = namespace_for(config).layout.block_bytes
    for (name, case), run in zip(make_cases(dtype)[1].items(), runs["decode"], strict=True):
        token_ids, logits = reference(dtype, case.prompt)
        assert run.fallback is None, name
        assert run.num_reused_tokens == case.reused_tokens, name
        assert run.bytes_fetched == case.reused_tokens // BLOCK * block_bytes, name
        assert run.token_ids == token_ids, name
        tolerance = logit_tolerance(config.dtype)
        torch.testing.assert_close(run.logits, logits, atol=tolerance, rtol=0, msg=name)


def test_decode_process_matches_a_single_process_without_the_store(
    worker_runs: dict[str, list[StoreRun]],
) -> None:
    check_decoded(worker_runs, "float32")


def test_bfloat16_kv_through_the_store_matches_within_tolerance(store_target: str) -> None:
    check_decoded(in_process_runs(store_target, "bfloat16"), "bfloat16")


def test_a_store_that_is_down_falls_back_to_recompute() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_target = f"127.0.0.1:{sock.getsockname()[1]}"
    config = model_config("tiny")
    model = Transformer(config)
    cache = cache_for(model, 200)
    prompt = random_prompt(config, 3 * BLOCK + 2, seed=5)
    with Engine(model, cache, dead_target, namespace_for(config)) as engine:
        run = engine.serve(prompt, DECODE_TOKENS)
    assert run.fallback is not None
    assert "lookup failed" in run.fallback
    assert run.save_error is not None
    assert "UNAVAILABLE" in run.save_error
    assert run.num_reused_tokens == 0
    assert run.token_ids == reference("float32", prompt)[0]


def test_blocks_evicted_after_the_lookup_fall_back_to_recompute(store_target: str) -> None:
    config = model_config("tiny")
    model = Transformer(config)
    cache = cache_for(model, 200)
    prompt = random_prompt(config, 3 * BLOCK + 2, seed=6)
    namespace = namespace_for(config, tenant="evicted")
    loads: list[list[bytes]] = []

    def evict_after_the_lookup(metadata: KVStoreConnectorMetadata) -> None:
        if metadata.loads:
            loads.append(metadata.loads[0].keys)
            with SyncKVClient(store_target, namespace) as client:
                client.delete(metadata.loads[0].keys[1:2])

    with Engine(model, cache, store_target, namespace) as engine:
        engine.serve(prompt, 1, load=False)
        run = engine.serve(prompt, DECODE_TOKENS, before_step=evict_after_the_lookup)
        assert len(loads[0]) == 3
        # The recompute saved the evicted block (and its descendants) again.
        again = engine.serve(prompt, DECODE_TOKENS, save=False)
    assert run.fallback is not None
    assert "served 1 of 3 blocks" in run.fallback
    assert run.num_reused_tokens == 0
    assert run.token_ids == reference("float32", prompt)[0]
    assert again.fallback is None
    assert again.num_reused_tokens == 3 * BLOCK
    assert again.token_ids == run.token_ids


def test_a_failed_load_raises_from_the_forward_pass(store_target: str) -> None:
    config = model_config("tiny")
    model = Transformer(config)
    cache = cache_for(model, 200)
    prompt = random_prompt(config, 2 * BLOCK + 2, seed=7)
    with KVConnector(
        store_target, namespace_for(config, tenant="never-stored"), cache
    ) as connector:
        seq = Sequence()
        cache.allocate(seq, prompt.numel())
        connector.start_load_kv(connector.keys(prompt), seq.page_ids[:2])
        seq.num_tokens = 2 * BLOCK
        with pytest.raises(KVLoadError, match="none of the 2 blocks"):
            model.forward(prompt[2 * BLOCK :], seq, cache, ConnectorHooks(connector))
        connector.abort()


def test_the_next_turn_reuses_the_reply_saved_after_decoding(store_target: str) -> None:
    config = model_config("tiny")
    model = Transformer(config)
    cache = cache_for(model, 200)
    prompt = random_prompt(config, 2 * BLOCK + 10, seed=8)
    with Engine(model, cache, store_target, namespace_for(config, tenant="turns")) as engine:
        first = engine.serve(prompt, 8)
        # 2 prompt blocks during prefill, then the block that tokens 32..47 filled in decoding.
        assert (first.num_reused_tokens, first.num_saved_blocks) == (0, 3)
        follow_up = torch.tensor([*prompt.tolist(), *first.token_ids, 7, 8, 9])
        second = engine.serve(follow_up, 2, save=False)
    assert second.num_reused_tokens == 3 * BLOCK
    assert second.fallback is None
    assert second.ttft_s > 0
    assert second.token_ids == reference("float32", follow_up)[0][:2]


def test_each_agent_turn_reuses_everything_earlier_turns_cached(store_target: str) -> None:
    config = model_config("tiny")
    model = Transformer(config)
    settings = AgentSettings(turns=3, system_tokens=40, tool_tokens=(20, 50), decode_tokens=5)
    cache = cache_for(model, settings.max_context_tokens)
    with Engine(model, cache, store_target, namespace_for(config, tenant="agent")) as engine:
        reports = run_session(engine, settings)
    assert [report.turn for report in reports] == [1, 2, 3]
    assert reports[0].reused_tokens == 0
    for previous, report in itertools.pairwise(reports):
        # The previous context and its reply (less the last token, which has no K/V yet).
        cached = previous.context_tokens + settings.decode_tokens - 1
        assert report.reused_tokens == cached // BLOCK * BLOCK
        assert (
            report.bytes_fetched
            == report.reused_tokens * namespace_for(config).layout.bytes_per_token
        )
    assert all(report.first_token_match and report.fallback is None for report in reports)
    assert all(report.max_logit_diff <= logit_tolerance(config.dtype) for report in reports)
    payload = json.loads(reports_json(reports, {"model": "tiny"}))
    assert [turn["reused_tokens"] for turn in payload["turns"]] == [
        report.reused_tokens for report in reports
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_cache_loads_from_the_store_and_matches(store_target: str) -> None:
    config = model_config("tiny")
    model = Transformer(config, device="cuda")
    cache = cache_for(model, 200)
    prompt = random_prompt(config, 2 * BLOCK + 5, seed=9).cuda()
    with Engine(model, cache, store_target, namespace_for(config, tenant="cuda")) as engine:
        engine.serve(prompt, 1, load=False)
        run = engine.serve(prompt, DECODE_TOKENS, save=False)
    reference_run = generate_greedy(model, prompt, DECODE_TOKENS, cache_for(model, 200))
    assert run.fallback is None
    assert run.num_reused_tokens == 2 * BLOCK
    assert run.token_ids == reference_run.token_ids
    atol = logit_tolerance(config.dtype)
    torch.testing.assert_close(run.logits, reference_run.logits.cpu(), atol=atol, rtol=0)
