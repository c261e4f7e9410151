"""KVStoreConnector against a real server, driven hook by hook as vLLM's scheduler and model
runner call it: config, the scheduler side's count, metadata, the worker side's loads and
saves, failed loads reported as block ids, preemption, and the contract with vLLM's base."""

from __future__ import annotations

import contextlib
import inspect
import pickle
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from threaded_server import server_thread  # tests/threaded_server.py

from kvstore.client import KVForm, SyncKVClient, TierKind
from kvstore.client import _vllm_scheduler as vllm_scheduler
from kvstore.client import _vllm_worker as vllm_worker
from kvstore.client._vllm_scheduler import SESSION_END_PARAM, SESSION_PARAM
from kvstore.client._vllm_types import (
    CachedRequestData,
    KVCacheBlocks,
    KVConnectorOutput,
    KVTransferConfig,
    NewRequestData,
    Request,
    SchedulerOutput,
    VllmConfig,
)
from kvstore.client.vllm_connector import (
    VLLM_AVAILABLE,
    ConnectorConfig,
    ConnectorConfigError,
    KVConnectorRole,
    KVStoreConnector,
    KVStoreConnectorMetadata,
    KVStoreConnectorStats,
)

BLOCK = 16
LAYERS = 2
HEADS = 2
HEAD_DIM = 16
NUM_BLOCKS = 12
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


def extra(target: str, **settings: Any) -> dict[str, Any]:
    return {
        "target": target,
        "tenant": "vllm-test",
        "model_fingerprint": "tiny",
        "block_size": BLOCK,
        "num_layers": LAYERS,
        "num_kv_heads": HEADS,
        "head_dim": HEAD_DIM,
        "dtype": "float32",
        **settings,
    }


def make(role: Any, target: str, **settings: Any) -> KVStoreConnector:
    config = VllmConfig(KVTransferConfig(kv_connector_extra_config=extra(target, **settings)))
    return KVStoreConnector(config, role)


def blocks_first_caches(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, 2, BLOCK, HEADS, HEAD_DIM)
    return {name: torch.randn(shape, generator=generator) for name in NAMES}


def kv_first_caches() -> dict[str, torch.Tensor]:
    """FlashAttention's layout: [2, num_blocks, block_size, heads, head_dim]."""
    return {name: torch.zeros(2, NUM_BLOCKS, BLOCK, HEADS, HEAD_DIM) for name in NAMES}


def tokens(num: int, seed: int) -> list[int]:
    return torch.randint(0, 1000, (num,), generator=torch.Generator().manual_seed(seed)).tolist()


def new_step(request: Request, block_ids: list[int], computed: int, scheduled: int) -> Any:
    return SchedulerOutput(
        scheduled_new_reqs=[
            NewRequestData(request.request_id, request.prompt_token_ids, (block_ids,), computed)
        ],
        scheduled_cached_reqs=CachedRequestData(),
        num_scheduled_tokens={request.request_id: scheduled},
    )


def run_step(
    worker: KVStoreConnector,
    metadata: KVStoreConnectorMetadata,
    tokens: int,
    *,
    load_after_forward: bool = False,
) -> None:
    """What vLLM's model runner does with a step's metadata. `load_after_forward`: the
    order of vLLM since mid-2026 on steps without synchronous loads (its KV connector
    mixin's post_forward calls start_load_kv, after the forward pass)."""
    worker.bind_connector_metadata(pickle.loads(pickle.dumps(metadata)))
    if not load_after_forward:
        worker.start_load_kv(None, num_step_tokens=tokens)
    for name in NAMES:
        worker.wait_for_layer_load(name)
        worker.save_kv_layer(name, torch.empty(0), None)
    if load_after_forward:
        worker.start_load_kv(None, num_step_tokens=tokens)
    worker.wait_for_save()
    worker.clear_connector_metadata()


def wait_finished(worker: KVStoreConnector, req_id: str) -> None:
    announced = {req_id}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sending, recving = worker.get_finished(announced)
        announced = set()
        assert recving is None
        if sending and req_id in sending:
            return
        time.sleep(0.005)
    raise AssertionError(f"{req_id} never finished sending")


@contextlib.contextmanager
def both_roles(
    target: str, caches: dict[str, torch.Tensor], **settings: Any
) -> Iterator[tuple[KVStoreConnector, KVStoreConnector]]:
    """A scheduler-side and a worker-side connector (its caches registered), shut down
    after."""
    scheduler = make(KVConnectorRole.SCHEDULER, target, **settings)
    worker = make(KVConnectorRole.WORKER, target, **settings)
    try:
        worker.register_kv_caches(caches)
        yield scheduler, worker
    finally:
        worker.shutdown()
        scheduler.shutdown()


def save_prompt(
    target: str,
    prompt: list[int],
    caches: dict[str, torch.Tensor],
    *,
    load_after_forward: bool = False,
) -> None:
    """A scheduler and a worker that prefill `prompt` into blocks 0.. and save it."""
    scheduler = make(KVConnectorRole.SCHEDULER, target)
    worker = make(KVConnectorRole.WORKER, target)
    try:
        worker.register_kv_caches(caches)
        request = Request("saver", prompt)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
        block_ids = list(range(-(-len(prompt) // BLOCK)))
        scheduler.update_state_after_alloc(request, KVCacheBlocks((block_ids,)), 0)
        metadata = scheduler.build_connector_meta(new_step(request, block_ids, 0, len(prompt)))
        assert metadata.loads == []
        [save] = metadata.saves
        assert save.block_ids == block_ids[: len(prompt) // BLOCK]
        assert save.parent_key == b""
        run_step(worker, metadata, len(prompt), load_after_forward=load_after_forward)
        # Saves outlive the step; vLLM keeps the blocks until get_finished lists the request.
        assert scheduler.request_finished(request, block_ids) == (True, None)
        wait_finished(worker, "saver")
    finally:
        worker.shutdown()
        scheduler.shutdown()


# -- the contract ----------------------------------------------------------------------------

# KVConnectorBase_V1's abstract methods, and the optional ones this connector implements, with
# vLLM's parameter names (vllm/distributed/kv_transfer/kv_connector/v1/base.py).
CONTRACT = {
    "on_new_request": ["request"],
    "get_num_new_matched_tokens": ["request", "num_computed_tokens"],
    "update_state_after_alloc": ["request", "blocks", "num_external_tokens"],
    "build_connector_meta": ["scheduler_output"],
    "request_finished": ["request", "block_ids"],
    "update_connector_output": ["connector_output"],
    "register_kv_caches": ["kv_caches"],
    "handle_preemptions": ["kv_connector_metadata"],
    "bind_connector_metadata": ["connector_metadata"],
    "start_load_kv": ["forward_context", "kwargs"],
    "wait_for_layer_load": ["layer_name"],
    "save_kv_layer": ["layer_name", "kv_layer", "attn_metadata", "kwargs"],
    "wait_for_save": [],
    "get_finished": ["finished_req_ids"],
    "get_block_ids_with_load_errors": [],
    "get_kv_connector_stats": [],
    "shutdown": [],
}


@pytest.mark.parametrize("method", sorted(CONTRACT))
def test_every_hook_has_vllms_signature(method: str) -> None:
    function = vars(KVStoreConnector)[method]
    assert list(inspect.signature(function).parameters)[1:] == CONTRACT[method]


def test_no_abstract_method_of_vllms_base_is_left() -> None:
    pytest.importorskip("vllm")
    assert VLLM_AVAILABLE
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    assert issubclass(KVStoreConnector, KVConnectorBase_V1)
    assert not KVStoreConnector.__abstractmethods__
    # Every hook this connector overrides takes the real base's parameters.
    for method in CONTRACT:
        theirs = inspect.signature(getattr(KVConnectorBase_V1, method)).parameters
        assert list(inspect.signature(vars(KVStoreConnector)[method]).parameters) == list(theirs)


def test_a_best_effort_cache_needs_no_kv_delivery(store_target: str) -> None:
    scheduler = make(KVConnectorRole.SCHEDULER, store_target)
    try:
        assert scheduler.requires_kv_delivery is False
        assert scheduler.role == KVConnectorRole.SCHEDULER
        with pytest.raises(RuntimeError, match=r"worker-side method .* SCHEDULER connector"):
            scheduler.get_block_ids_with_load_errors()
    finally:
        scheduler.shutdown()


# -- configuration ---------------------------------------------------------------------------


def test_config_reads_every_key() -> None:
    config = ConnectorConfig.from_extra_config(
        extra(
            "127.0.0.1:1",
            token="secret-token",
            tls_ca="/ca.pem",
            tls_server_name="kv.internal",
            data_plane=False,
            prefill_tokens_per_s=5000,
            fetch_bytes_per_s=1e9,
            fetch_overhead_s=0.002,
            remeasure_s=5,
            pin_ttl_s=45,
            save_decoded=False,
            save_during_forward=True,
            block_view=True,
            tp_rank=1,
            tp_size=2,
        )
    )
    assert config.namespace.layout.block_tokens == BLOCK
    assert (config.namespace.tp_rank, config.namespace.tp_size) == (1, 2)
    assert config.options.token == "secret-token"
    assert config.options.tls is not None
    assert config.options.tls.ca_file == "/ca.pem"
    assert config.options.tls.server_name == "kv.internal"
    assert config.options.data_plane is False
    assert (config.prefill_tokens_per_s, config.fetch_bytes_per_s) == (5000.0, 1e9)
    assert (config.fetch_overhead_s, config.pin_ttl_s, config.save_decoded) == (0.002, 45, False)
    assert config.remeasure_s == 5
    assert config.save_during_forward is True
    assert config.block_view is True
    defaults = ConnectorConfig.from_extra_config(extra("127.0.0.1:1"))
    assert defaults.remeasure_s == 60
    assert defaults.save_during_forward is None  # "auto"
    assert defaults.block_view is False


def test_etcd_keys_override_the_environment_and_are_absent_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KVSTORE_ETCD_CA", "/env-ca.pem")
    monkeypatch.setenv("KVSTORE_ETCD_USER", "env-user")
    monkeypatch.setenv("KVSTORE_ETCD_PASSWORD", "env-password")
    # No etcd_* key: the cluster client reads the variables itself when it starts.
    assert ConnectorConfig.from_extra_config(extra("etcds://e:2379/kv")).options.etcd is None
    config = ConnectorConfig.from_extra_config(
        extra(
            "etcds://e:2379/kv",
            etcd_ca="/ca.pem",
            etcd_server_name="etcd.internal",
            etcd_password_file="/pw",
        )
    )
    etcd = config.options.etcd
    assert etcd is not None
    assert (etcd.ca_file, etcd.server_name, etcd.password_file) == (
        "/ca.pem",
        "etcd.internal",
        "/pw",
    )
    # What no key names comes from the environment; a password file replaces the
    # variable's password.
    assert (etcd.user, etcd.password) == ("env-user", None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target": None}, "target is required"),
        ({"block_size": "16"}, "block_size must be an integer"),
        ({"dtype": "float64"}, "dtype"),
        ({"pin_ttl_s": -1}, "pin_ttl_s must be >= 0"),
        ({"remeasure_s": float("inf")}, "remeasure_s must be >= 0"),
        ({"prefill_tokens_per_s": 0}, "prefill_tokens_per_s must be > 0"),
        ({"save_decoded": "yes"}, "save_decoded must be true or false"),
        ({"save_during_forward": "later"}, 'save_during_forward must be true, false or "auto"'),
        ({"tls_cert": "/c.pem"}, "cert_file and key_file"),
        ({"token": "two words"}, "printable"),
        ({"block_sise": 16}, "unknown key"),
        ({"tenant": 5}, "tenant must be a non-empty string"),
        ({"etcd_password_file": "/pw"}, "password needs its user"),
        ({"etcd_cert": "/c.pem"}, "etcd TLS needs both"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_bad_config_names_the_key(change: dict[str, Any], message: str) -> None:
    merged = {**extra("127.0.0.1:1"), **change}
    settings = {key: value for key, value in merged.items() if value is not None}
    with pytest.raises(ConnectorConfigError, match=message):
        ConnectorConfig.from_extra_config(settings)


def test_the_tensor_parallel_rank_comes_from_vllms_parallel_config() -> None:
    # vLLM gives every rank the same extra config: the rank cannot come from there.
    def vllm_config(parallel_size: int, global_rank: int, **settings: Any) -> Any:
        return SimpleNamespace(
            kv_transfer_config=KVTransferConfig(
                kv_connector_extra_config=extra("127.0.0.1:1", **settings)
            ),
            parallel_config=SimpleNamespace(tensor_parallel_size=parallel_size, rank=global_rank),
        )

    namespaces = [
        ConnectorConfig.from_vllm_config(vllm_config(4, rank)).namespace for rank in range(4)
    ]
    assert [(ns.tp_rank, ns.tp_size) for ns in namespaces] == [(r, 4) for r in range(4)]
    assert len(set(namespaces)) == 4  # one namespace per shard
    # A pipeline stage's ranks count on: rank 6 of TP 4 is the third shard of its stage.
    assert ConnectorConfig.from_vllm_config(vllm_config(4, 6)).namespace.tp_rank == 2
    for settings in ({"tp_rank": 1}, {"tp_size": 2}):
        with pytest.raises(ConnectorConfigError, match="come from vLLM's parallel config"):
            ConnectorConfig.from_vllm_config(vllm_config(4, 0, **settings))
    # vLLM's block size must be the store's block size.
    mismatched = vllm_config(1, 0)
    mismatched.cache_config = SimpleNamespace(block_size=2 * BLOCK)
    with pytest.raises(ConnectorConfigError, match="--block-size"):
        ConnectorConfig.from_vllm_config(mismatched)
    # Without a parallel config (the emulator), the extra config says.
    plain = VllmConfig(
        KVTransferConfig(kv_connector_extra_config=extra("h:1", tp_rank=1, tp_size=2))
    )
    assert ConnectorConfig.from_vllm_config(plain).namespace.tp_rank == 1


def test_register_kv_caches_rejects_a_layout_the_config_does_not_describe(
    store_target: str,
) -> None:
    worker = make(KVConnectorRole.WORKER, store_target)
    try:
        with pytest.raises(ValueError, match="num_layers=2"):
            worker.register_kv_caches({"only": torch.zeros(NUM_BLOCKS, 2, BLOCK, HEADS, HEAD_DIM)})
        wrong = {name: torch.zeros(NUM_BLOCKS, 2, BLOCK, HEADS, 8) for name in NAMES}
        with pytest.raises(ValueError, match="head_dim"):
            worker.register_kv_caches(wrong)
        halves = {name: torch.zeros(NUM_BLOCKS, 2, BLOCK, HEADS, HEAD_DIM).half() for name in NAMES}
        with pytest.raises(ValueError, match="float32"):
            worker.register_kv_caches(halves)
    finally:
        worker.shutdown()


# -- scheduler side --------------------------------------------------------------------------


def test_matched_tokens_are_whole_stored_blocks_and_counting_has_no_side_effects(
    store_target: str,
) -> None:
    prompt = tokens(3 * BLOCK, seed=1)
    save_prompt(store_target, prompt, blocks_first_caches(seed=1))
    scheduler = make(KVConnectorRole.SCHEDULER, store_target)
    try:
        with SyncKVClient(store_target, scheduler.config.namespace) as client:
            before = client.stats()
            # Every block is stored, but the last token is computed: 2 blocks, not 3.
            exact = Request("exact", prompt)
            assert scheduler.get_num_new_matched_tokens(exact, 0) == (2 * BLOCK, False)
            assert scheduler.get_num_new_matched_tokens(exact, 0) == (2 * BLOCK, False)
            longer = Request("longer", [*prompt, *tokens(BLOCK + 5, seed=2)])
            assert scheduler.get_num_new_matched_tokens(longer, 0) == (3 * BLOCK, False)
            # Beyond a local prefix-cache hit of one block; none beyond a partial block.
            assert scheduler.get_num_new_matched_tokens(longer, BLOCK) == (2 * BLOCK, False)
            assert scheduler.get_num_new_matched_tokens(longer, BLOCK + 3) == (0, False)
            miss = Request("miss", tokens(4 * BLOCK, seed=3))
            assert scheduler.get_num_new_matched_tokens(miss, 0) == (0, False)
            after = client.stats()
        # One lookup a call (none for the unaligned one), no get, nothing stored or pinned.
        assert after.lookups - before.lookups == 5
        assert after.blocks_got == before.blocks_got
        assert after.blocks_put == before.blocks_put
        assert after.num_pinned == before.num_pinned
    finally:
        scheduler.shutdown()


def test_a_request_that_asks_not_to_load_costs_no_lookup(store_target: str) -> None:
    scheduler = make(KVConnectorRole.SCHEDULER, store_target)
    try:
        with SyncKVClient(store_target, scheduler.config.namespace) as client:
            before = client.stats().lookups
            request = Request(
                "r", tokens(5 * BLOCK, seed=4), kv_transfer_params={"kvstore_load": False}
            )
            scheduler.on_new_request(request)
            assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
            assert client.stats().lookups == before
    finally:
        scheduler.shutdown()


def test_a_store_that_is_down_matches_nothing_and_pauses_lookups(
    unused_target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm_scheduler, "LOOKUP_BACKOFF_S", 0.2)
    scheduler = make(KVConnectorRole.SCHEDULER, unused_target)
    side = scheduler.scheduler_side

    def reason(request_id: str) -> str:
        plan = side.plan_for(request_id)
        assert plan is not None
        return plan.fetch.reason

    try:
        request = Request("r", tokens(5 * BLOCK, seed=5))
        assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
        assert reason("r").startswith("lookup failed")
        # Paused now: neither arrival nor count looks up, and the request recomputes.
        paused = Request("paused", tokens(5 * BLOCK, seed=5))
        scheduler.on_new_request(paused)
        assert side._prefetched == {}
        assert scheduler.get_num_new_matched_tokens(paused, 0) == (0, False)
        assert "lookups pause" in reason("paused")
        time.sleep(0.25)
        # A lookup started at arrival fails the same way, when the count takes it; the
        # pause doubles.
        arrived = Request("arrived", tokens(5 * BLOCK, seed=5))
        scheduler.on_new_request(arrived)
        assert scheduler.get_num_new_matched_tokens(arrived, 0) == (0, False)
        assert reason("arrived").startswith("lookup failed")
        assert side._lookup_backoff_s == pytest.approx(0.4)
    finally:
        scheduler.shutdown()


def test_a_store_that_hangs_costs_the_scheduler_one_lookup_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A port that takes connections and never answers: every lookup would wait out its
    # timeout. After the first, lookups pause, so the next requests do not wait.
    with socket.create_server(("127.0.0.1", 0)) as black_hole:
        target = f"127.0.0.1:{black_hole.getsockname()[1]}"
        scheduler = make(KVConnectorRole.SCHEDULER, target, lookup_timeout_s=0.3)
        side = scheduler.scheduler_side
        lookups: list[int] = []
        real_lookup = side._lookup

        def counted(*args: Any) -> Any:
            lookups.append(1)
            return real_lookup(*args)

        monkeypatch.setattr(side, "_lookup", counted)
        try:
            for index in range(6):
                request = Request(f"hung-{index}", tokens(5 * BLOCK, seed=6))
                assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
            assert len(lookups) == 1
        finally:
            scheduler.shutdown()


def keep_busy(scheduler: KVStoreConnector) -> None:
    """A request running in the engine: arrivals now start their lookups at once."""
    running = Request("running", tokens(BLOCK, seed=99))
    scheduler.update_state_after_alloc(running, KVCacheBlocks(([60],)), 0)


def arrive(scheduler: KVStoreConnector, client: SyncKVClient, request: Request) -> int:
    """vLLM's add_request while another request runs: the request's lookup starts; returns
    the server's lookup count once the server has answered it."""
    before = client.stats().lookups
    scheduler.on_new_request(request)
    deadline = time.monotonic() + 30
    while (lookups := client.stats().lookups) == before:
        assert time.monotonic() < deadline, "the arrival's lookup never reached the server"
        time.sleep(0.002)
    return lookups


def test_the_lookup_started_at_arrival_answers_the_first_count_only(store_target: str) -> None:
    prompt = tokens(3 * BLOCK, seed=40)
    scheduler = make(KVConnectorRole.SCHEDULER, store_target)
    keep_busy(scheduler)
    try:
        with SyncKVClient(store_target, scheduler.config.namespace) as client:
            request = Request("arrived", prompt)
            arrive(scheduler, client, request)
            # Stored after the arrival's lookup was answered: that answer is a miss.
            save_prompt(store_target, prompt, blocks_first_caches(seed=40))
            before = client.stats().lookups
            assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
            assert client.stats().lookups == before
            # A later call of the same request looks up afresh.
            assert scheduler.get_num_new_matched_tokens(request, 0) == (2 * BLOCK, False)
            assert client.stats().lookups == before + 1
    finally:
        scheduler.shutdown()


def test_a_stale_finished_or_crowded_out_arrival_lookup_is_made_again(
    store_target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvstore.client import _vllm_scheduler

    monkeypatch.setattr(_vllm_scheduler, "MAX_PREFETCHED", 2)
    prompt = tokens(3 * BLOCK, seed=41)
    scheduler = make(KVConnectorRole.SCHEDULER, store_target)
    keep_busy(scheduler)
    try:
        with SyncKVClient(store_target, scheduler.config.namespace) as client:
            crowded, finished, kept, stale = (Request(name, prompt) for name in "abcd")
            for request in (crowded, finished, kept):  # the third crowds the first out
                arrive(scheduler, client, request)
            assert scheduler.request_finished(finished, []) == (False, None)
            monkeypatch.setattr(_vllm_scheduler, "PREFETCH_MAX_AGE_S", 0.0)
            arrive(scheduler, client, stale)
            save_prompt(store_target, prompt, blocks_first_caches(seed=41))
            for request in (crowded, finished, stale):
                assert scheduler.get_num_new_matched_tokens(request, 0) == (2 * BLOCK, False)
            monkeypatch.setattr(_vllm_scheduler, "PREFETCH_MAX_AGE_S", 60.0)
            assert scheduler.get_num_new_matched_tokens(kept, 0) == (0, False)
    finally:
        scheduler.shutdown()


def find_data_plane(scheduler: KVStoreConnector, *, seed: int) -> None:
    """A first count, a miss: its lookup finds the data plane, whose connections the
    scheduler's thread borrows from then on."""
    warm_up = Request("warm-up", tokens(3 * BLOCK, seed=seed))
    assert scheduler.get_num_new_matched_tokens(warm_up, 0) == (0, False)
    scheduler.request_finished(warm_up, [])


@contextlib.contextmanager
def idle_engine_with_a_stored_prompt(
    target: str, seed: int
) -> Iterator[tuple[KVStoreConnector, SyncKVClient, list[int]]]:
    """A scheduler side with nothing running, whose data plane is found, a client of its
    namespace, and a prompt of 3 blocks stored (2 loadable); shut down after."""
    prompt = tokens(3 * BLOCK, seed=seed)
    scheduler = make(KVConnectorRole.SCHEDULER, target)
    try:
        with SyncKVClient(target, scheduler.config.namespace) as client:
            save_prompt(target, prompt, blocks_first_caches(seed=seed))
            find_data_plane(scheduler, seed=seed + 1)
            yield scheduler, client, prompt
    finally:
        scheduler.shutdown()


def test_an_idle_engine_looks_up_once_from_the_scheduler_thread(store_target: str) -> None:
    with idle_engine_with_a_stored_prompt(store_target, 4242) as (scheduler, client, prompt):
        side = scheduler.scheduler_side
        before = client.stats().lookups
        request = Request("idle", prompt)
        scheduler.on_new_request(request)
        time.sleep(0.2)
        # Nothing runs: the arrival starts no lookup on the loop thread...
        assert client.stats().lookups == before
        answered = side._blocking.answered
        # ...the count makes it, from this thread, once.
        assert scheduler.get_num_new_matched_tokens(request, 0) == (2 * BLOCK, False)
        assert side._blocking.answered == answered + 1
        assert client.stats().lookups == before + 1


def wait_for_view(scheduler: KVStoreConnector, prompt: list[int], held: int) -> None:
    """Until the scheduler side's block view is complete and holds `held` of the
    prompt's loadable blocks."""
    side = scheduler.scheduler_side
    mirror = side._mirror
    assert mirror is not None
    keys = side._loadable_keys(Request("view", prompt))
    deadline = time.monotonic() + 30
    while mirror.held_prefix(keys) != held:
        assert time.monotonic() < deadline, f"the block view holds {mirror.held_prefix(keys)}"
        time.sleep(0.005)


def test_with_the_block_view_a_miss_costs_no_lookup_and_a_stored_prompt_is_looked_up(
    store_target: str,
) -> None:
    """block_view: the store's events tell the scheduler side which blocks it holds. A
    prompt whose first block it lacks is a miss at once, at arrival and at the count;
    a stored one is looked up still (the view may lag an eviction); once deleted, the
    prompt is a miss again without a lookup."""
    prompt = tokens(3 * BLOCK, seed=4300)
    scheduler = make(KVConnectorRole.SCHEDULER, store_target, block_view=True)
    keep_busy(scheduler)  # arrivals would start lookups at once
    try:
        with SyncKVClient(store_target, scheduler.config.namespace) as client:
            wait_for_view(scheduler, prompt, 0)
            before = client.stats().lookups
            for seed, name in enumerate(("miss-1", "miss-2"), 4310):
                request = Request(name, tokens(4 * BLOCK, seed=seed))
                scheduler.on_new_request(request)
                assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
            plan = scheduler.scheduler_side.plan_for("miss-2")
            assert plan is not None
            assert plan.fetch.reason == "miss, by the block view"
            assert client.stats().lookups == before, "a miss by the view looked up"
            save_prompt(store_target, prompt, blocks_first_caches(seed=4300))
            wait_for_view(scheduler, prompt, 2)
            before = client.stats().lookups
            stored = Request("stored", prompt)
            assert scheduler.get_num_new_matched_tokens(stored, 0) == (2 * BLOCK, False)
            # Beyond a local prefix of both loadable blocks nothing is left to load.
            assert scheduler.get_num_new_matched_tokens(stored, 2 * BLOCK) == (0, False)
            assert client.stats().lookups == before + 1
            keys = scheduler.scheduler_side._loadable_keys(stored)
            assert client.delete(keys[:1]) == (3, 0)  # the chain below its root goes too
            wait_for_view(scheduler, prompt, 0)
            assert scheduler.get_num_new_matched_tokens(Request("gone", prompt), 0) == (0, False)
            assert client.stats().lookups == before + 1
    finally:
        scheduler.shutdown()


def test_with_the_block_view_a_prefix_the_local_cache_covers_is_still_looked_up(
    store_target: str,
) -> None:
    """The store holds only what vLLM's own prefix cache already computed: nothing to
    load, but the lookup is made, so the store sees the shared prefix used (it touches
    the blocks it matches) and keeps it warm for other engines."""
    shared = tokens(BLOCK, seed=4320)
    save_prompt(store_target, shared, blocks_first_caches(seed=4320))
    prompt = [*shared, *tokens(2 * BLOCK + 3, seed=4321)]
    scheduler = make(KVConnectorRole.SCHEDULER, store_target, block_view=True)
    try:
        with SyncKVClient(store_target, scheduler.config.namespace) as client:
            wait_for_view(scheduler, prompt, 1)
            before = client.stats().lookups
            request = Request("covered", prompt)
            assert scheduler.get_num_new_matched_tokens(request, BLOCK) == (0, False)
            assert client.stats().lookups == before + 1
    finally:
        scheduler.shutdown()


def test_the_block_view_of_a_cluster_waits_for_every_member_then_tells_misses(
    unused_target: str,
) -> None:
    """Over a cluster target the view is complete once every member's snapshot has
    ended: with a member down it never is, and misses are looked up. Then a miss costs
    no member a lookup, and a chain saved across both members is held in full and
    looked up."""
    prompt = tokens(6 * BLOCK, seed=4302)
    with server_thread() as first, server_thread() as second:
        partial = make(
            KVConnectorRole.SCHEDULER, f"cluster://{first},{unused_target}", block_view=True
        )
        try:
            assert not partial.scheduler_side.wait_for_block_view(1.0)
            miss = Request("miss", tokens(4 * BLOCK, seed=4303))
            assert partial.get_num_new_matched_tokens(miss, 0) == (0, False)
            plan = partial.scheduler_side.plan_for("miss")
            assert plan is not None
            assert plan.fetch.reason != "miss, by the block view"  # looked up, or failed to
        finally:
            partial.shutdown()
        target = f"cluster://{first},{second}"
        scheduler = make(KVConnectorRole.SCHEDULER, target, block_view=True)
        try:
            assert scheduler.scheduler_side.wait_for_block_view(30)
            with (
                SyncKVClient(first, scheduler.config.namespace) as one,
                SyncKVClient(second, scheduler.config.namespace) as two,
            ):

                def lookups() -> int:
                    return one.stats().lookups + two.stats().lookups

                before = lookups()
                miss = Request("miss", tokens(4 * BLOCK, seed=4303))
                assert scheduler.get_num_new_matched_tokens(miss, 0) == (0, False)
                assert lookups() == before
                save_prompt(target, prompt, blocks_first_caches(seed=4302))
                wait_for_view(scheduler, prompt, 5)
                before = lookups()
                stored = Request("stored", prompt)
                assert scheduler.get_num_new_matched_tokens(stored, 0) == (5 * BLOCK, False)
                assert lookups() > before
        finally:
            scheduler.shutdown()


def test_the_block_view_says_nothing_once_its_watch_ends() -> None:
    """A complete view whose store goes away (its watch stream ends) says nothing until
    a new stream is synced: requests are looked up as without it."""
    with server_thread() as target:
        scheduler = make(KVConnectorRole.SCHEDULER, target, block_view=True)
        assert scheduler.scheduler_side.wait_for_block_view(30)
    try:
        mirror = scheduler.scheduler_side._mirror
        assert mirror is not None
        deadline = time.monotonic() + 30
        while mirror.held_prefix([b"k" * 32]) is not None:
            assert time.monotonic() < deadline, "the view outlived its watch"
            time.sleep(0.005)
        request = Request("after", tokens(3 * BLOCK, seed=4330))
        assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
        plan = scheduler.scheduler_side.plan_for("after")
        assert plan is not None
        assert plan.fetch.reason.startswith("lookup failed")  # looked up: the store is gone
    finally:
        scheduler.shutdown()


def test_the_block_view_of_a_store_that_is_down_says_nothing(unused_target: str) -> None:
    """No events, so no complete view: the count looks up as without it (and fails)."""
    scheduler = make(KVConnectorRole.SCHEDULER, unused_target, block_view=True)
    try:
        mirror = scheduler.scheduler_side._mirror
        assert mirror is not None
        assert mirror.held_prefix([b"k" * 32]) is None
        request = Request("down", tokens(3 * BLOCK, seed=4301))
        assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
        plan = scheduler.scheduler_side.plan_for("down")
        assert plan is not None
        assert plan.fetch.reason.startswith("lookup failed")
    finally:
        scheduler.shutdown()


def test_arrivals_behind_one_at_an_idle_engine_start_their_lookups_at_once(
    store_target: str,
) -> None:
    with idle_engine_with_a_stored_prompt(store_target, 4244) as (scheduler, client, prompt):
        side = scheduler.scheduler_side
        first, second = Request("first", prompt), Request("second", prompt)
        before = client.stats().lookups
        scheduler.on_new_request(first)  # idle: its count looks it up
        # The second waits behind the first: its lookup starts now, on the loop.
        assert arrive(scheduler, client, second) == before + 1
        answered = side._blocking.answered
        assert scheduler.get_num_new_matched_tokens(first, 0) == (2 * BLOCK, False)
        assert scheduler.get_num_new_matched_tokens(second, 0) == (2 * BLOCK, False)
        assert side._blocking.answered == answered + 1  # the first's, from here
        assert client.stats().lookups == before + 2


@pytest.fixture
def unused_target() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


# -- worker side -----------------------------------------------------------------------------


def test_a_load_fills_a_flash_attention_layout_with_the_saved_pages(store_target: str) -> None:
    source = blocks_first_caches(seed=6)
    prompt = tokens(3 * BLOCK + 4, seed=6)
    save_prompt(store_target, prompt, source)
    scheduler = make(KVConnectorRole.SCHEDULER, store_target)
    worker = make(KVConnectorRole.WORKER, store_target)
    caches = kv_first_caches()
    try:
        worker.register_kv_caches(caches)
        request = Request("loader", prompt)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (3 * BLOCK, False)
        block_ids = [7, 2, 9, 4]
        scheduler.update_state_after_alloc(request, KVCacheBlocks((block_ids,)), 3 * BLOCK)
        metadata = scheduler.build_connector_meta(new_step(request, block_ids, 3 * BLOCK, 4))
        [load] = metadata.loads
        assert load.block_ids == [7, 2, 9]
        assert metadata.saves == []  # every full block is stored already
        run_step(worker, metadata, 4)
        assert worker.get_block_ids_with_load_errors() == set()
        for name in NAMES:
            for page, block in zip(range(3), [7, 2, 9], strict=True):
                assert torch.equal(caches[name][:, block], source[name][page])
        # Nothing saved, so nothing to wait for: the blocks may be freed at once.
        assert scheduler.request_finished(request, block_ids) == (False, None)
    finally:
        worker.shutdown()
        scheduler.shutdown()


@pytest.mark.parametrize("during", [True, False, "auto"])
def test_saves_go_during_or_after_the_forward_pass_as_configured(
    store_target: str, during: bool | str
) -> None:
    """Layer-wise during the pass, or every layer once it ends ("auto" on CPU caches:
    after, since the pass needs the cores the saves' copies and sends would take)."""
    seed = {True: 73, False: 74, "auto": 75}[during]  # a prompt of its own each
    source = blocks_first_caches(seed=seed)
    prompt = tokens(2 * BLOCK + 3, seed=seed)
    with both_roles(store_target, source, save_during_forward=during) as (scheduler, worker):
        assert worker.worker_side.saves_after_forward is (during is not True)
        request = Request(f"saved-{during}", prompt)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
        scheduler.update_state_after_alloc(request, KVCacheBlocks(([0, 1, 2],)), 0)
        metadata = scheduler.build_connector_meta(new_step(request, [0, 1, 2], 0, len(prompt)))
        worker.bind_connector_metadata(pickle.loads(pickle.dumps(metadata)))
        worker.start_load_kv(None, num_step_tokens=len(prompt))
        for name in NAMES:
            worker.wait_for_layer_load(name)
            worker.save_kv_layer(name, torch.empty(0), None)
        opened = worker.worker_side.saves_in_flight(request.request_id)
        # After the pass: the put is not even opened (no connection, no stream) until then.
        assert len(opened) == (1 if during is True else 0)
        assert all(handle.fully_queued for handle in opened)
        worker.wait_for_save()
        worker.clear_connector_metadata()
        [handle] = worker.worker_side.saves_in_flight(request.request_id)
        assert handle.fully_queued
        assert scheduler.request_finished(request, [0, 1, 2]) == (True, None)
        wait_finished(worker, request.request_id)
        assert worker.worker_side.save_reports[request.request_id].num_committed == 2
    with SyncKVClient(store_target, scheduler.config.namespace) as client:
        assert client.lookup(prompt).num_matched == 2


@pytest.mark.parametrize("during", [True, False], ids=["saves-during", "saves-after"])
def test_a_layer_saved_outside_a_step_does_not_drop_the_next_steps_saves(
    store_target: str, during: bool
) -> None:
    """A warm-up or dummy forward pass runs the attention layers with no step bound."""
    seed = 901 if during else 902
    prompt = tokens(2 * BLOCK + 3, seed=seed)
    caches = blocks_first_caches(seed=seed)
    with both_roles(store_target, caches, save_during_forward=during) as (scheduler, worker):
        worker.save_kv_layer(NAMES[0], torch.empty(0), None)
        request = Request(f"stray-{during}", prompt)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
        scheduler.update_state_after_alloc(request, KVCacheBlocks(([0, 1, 2],)), 0)
        metadata = scheduler.build_connector_meta(new_step(request, [0, 1, 2], 0, len(prompt)))
        run_step(worker, metadata, len(prompt))
        assert scheduler.request_finished(request, [0, 1, 2]) == (True, None)
        wait_finished(worker, request.request_id)
        assert worker.worker_side.save_reports[request.request_id].num_committed == 2


def plan_three_block_load(
    scheduler: KVStoreConnector, request: Request, block_ids: list[int]
) -> KVStoreConnectorMetadata:
    """The step that loads a stored 3-block prefix of a `3 * BLOCK + 4`-token prompt into
    the first three of `block_ids` and computes its last 4 tokens."""
    assert scheduler.get_num_new_matched_tokens(request, 0) == (3 * BLOCK, False)
    scheduler.update_state_after_alloc(request, KVCacheBlocks((block_ids,)), 3 * BLOCK)
    return scheduler.build_connector_meta(new_step(request, block_ids, 3 * BLOCK, 4))


def test_saves_are_whole_when_vllm_starts_loads_after_the_forward_pass(store_target: str) -> None:
    """vLLM since mid-2026 calls start_load_kv after the forward pass on steps without
    synchronous loads: the saves must already be open when the layers are saved."""
    source = blocks_first_caches(seed=71)
    prompt = tokens(3 * BLOCK + 4, seed=71)
    save_prompt(store_target, prompt, source, load_after_forward=True)
    caches = kv_first_caches()
    with both_roles(store_target, caches) as (scheduler, worker):
        metadata = plan_three_block_load(scheduler, Request("loader", prompt), [5, 1, 8, 3])
        run_step(worker, metadata, 4)  # a step with a (synchronous) load: the old order
        assert worker.get_block_ids_with_load_errors() == set()
        for name in NAMES:
            for page, block in zip(range(3), [5, 1, 8], strict=True):
                assert torch.equal(caches[name][:, block], source[name][page])


def test_a_load_started_after_the_forward_pass_is_reported_not_loaded(store_target: str) -> None:
    """Pages the forward pass has already read are too late to fill: vLLM is told to
    recompute them, and nothing lands in them."""
    prompt = tokens(3 * BLOCK + 4, seed=72)
    save_prompt(store_target, prompt, blocks_first_caches(seed=72))
    caches = kv_first_caches()
    with both_roles(store_target, caches) as (scheduler, worker):
        metadata = plan_three_block_load(scheduler, Request("late", prompt), [7, 2, 9, 4])
        run_step(worker, metadata, 4, load_after_forward=True)
        assert worker.get_block_ids_with_load_errors() == {7, 2, 9}
        for name in NAMES:
            assert not caches[name].any()  # nothing was written into the pages


def test_a_load_into_pages_the_cache_cannot_take_is_reported_not_raised(
    store_target: str,
) -> None:
    """Block ids vLLM should never send (one named twice, one past the cache) do not
    raise into vLLM's model runner: the load is reported as load errors, vLLM recomputes
    those blocks, nothing lands in any page, and the next step loads normally."""
    prompt = tokens(3 * BLOCK + 4, seed=77)
    source = blocks_first_caches(seed=77)
    save_prompt(store_target, prompt, source)
    caches = kv_first_caches()
    with both_roles(store_target, caches) as (scheduler, worker):
        for bad_ids, reported in (
            ([5, 5, 8, 3], {5, 8}),
            ([1, NUM_BLOCKS, 2, 3], {1, NUM_BLOCKS, 2}),
        ):
            request = Request(f"bad-{bad_ids[1]}", prompt)
            run_step(worker, plan_three_block_load(scheduler, request, bad_ids), 4)
            assert worker.get_block_ids_with_load_errors() == reported
            for name in NAMES:
                assert not caches[name].any()
        metadata = plan_three_block_load(scheduler, Request("good", prompt), [6, 0, 4, 2])
        run_step(worker, metadata, 4)
        assert worker.get_block_ids_with_load_errors() == set()
        for name in NAMES:
            for page, block in zip(range(3), [6, 0, 4], strict=True):
                assert torch.equal(caches[name][:, block], source[name][page])


def test_the_rates_a_worker_measures_reach_the_scheduler_as_vllms_connector_stats(
    store_target: str,
) -> None:
    """vLLM's path: get_kv_connector_stats in each worker, pickled to the engine core,
    merged over the ranks with aggregate, then KVConnectorOutput.kv_connector_stats."""
    # 11 blocks of 8 KiB: above the 64 KiB a bandwidth sample needs (client.cost).
    prompt = tokens(11 * BLOCK + 4, seed=16)
    save_prompt(store_target, prompt, blocks_first_caches(seed=16))
    scheduler = make(KVConnectorRole.SCHEDULER, store_target)
    worker = make(KVConnectorRole.WORKER, store_target)
    try:
        worker.register_kv_caches(kv_first_caches())
        assert worker.get_kv_connector_stats() is None  # nothing measured yet
        assert scheduler.get_kv_connector_stats() is None  # the scheduler measures nothing
        request = Request("measured", prompt)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (11 * BLOCK, False)
        block_ids = list(range(12))
        scheduler.update_state_after_alloc(request, KVCacheBlocks((block_ids,)), 11 * BLOCK)
        step = new_step(request, block_ids, 11 * BLOCK, 4)
        run_step(worker, scheduler.build_connector_meta(step), 4)
        assert worker.get_block_ids_with_load_errors() == set()

        stats = pickle.loads(pickle.dumps(worker.get_kv_connector_stats()))
        assert isinstance(stats, KVStoreConnectorStats)
        measured = stats.data["fetch_bytes_per_s"]
        assert measured > 0
        assert stats.data["fetch_bytes_per_s:dram"] > 0
        # A second rank that fetched at a tenth of the rate: the merge keeps the slower.
        other = KVStoreConnector.build_kv_connector_stats(
            {"fetch_bytes_per_s": measured / 10, "prefill_tokens_per_s": 500.0}
        )
        merged = stats.aggregate(other)
        assert merged.reduce()["fetch_bytes_per_s"] == measured / 10
        assert merged.reduce()["prefill_tokens_per_s"] == 500.0
        assert stats.data["fetch_bytes_per_s"] == measured  # aggregate made a new object
        assert KVStoreConnectorStats().is_empty()
        assert not merged.is_empty()

        assert scheduler.scheduler_side.fetch_bytes_per_s != measured / 10
        scheduler.update_connector_output(KVConnectorOutput(kv_connector_stats=merged))
        assert scheduler.scheduler_side.fetch_bytes_per_s == measured / 10
    finally:
        worker.shutdown()
        scheduler.shutdown()


def test_a_failed_load_is_reported_as_block_ids_once(store_target: str) -> None:
    prompt = tokens(3 * BLOCK + 4, seed=7)
    save_prompt(store_target, prompt, blocks_first_caches(seed=7))
    with both_roles(store_target, blocks_first_caches(seed=8)) as (scheduler, worker):
        request = Request("evicted", prompt)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (3 * BLOCK, False)
        scheduler.update_state_after_alloc(request, KVCacheBlocks(([3, 4, 5, 6],)), 3 * BLOCK)
        metadata = scheduler.build_connector_meta(new_step(request, [3, 4, 5, 6], 3 * BLOCK, 4))
        with SyncKVClient(store_target, scheduler.config.namespace) as client:
            client.delete(metadata.loads[0].keys[2:])  # evicted between lookup and load
            run_step(worker, metadata, 4)
            assert worker.get_block_ids_with_load_errors() == {3, 4, 5}
            assert worker.get_block_ids_with_load_errors() == set()
            # The store still serves what it holds: nothing was harmed.
            assert client.lookup(prompt).num_matched == 2


def test_a_preempted_requests_save_is_dropped(store_target: str) -> None:
    with both_roles(store_target, blocks_first_caches(seed=9)) as (scheduler, worker):
        request = Request("preempted", tokens(2 * BLOCK + 1, seed=9))
        scheduler.get_num_new_matched_tokens(request, 0)
        scheduler.update_state_after_alloc(request, KVCacheBlocks(([0, 1, 2],)), 0)
        metadata = scheduler.build_connector_meta(new_step(request, [0, 1, 2], 0, 2 * BLOCK + 1))
        worker.bind_connector_metadata(metadata)
        worker.start_load_kv(None)
        worker.save_kv_layer(NAMES[0], torch.empty(0), None)  # preempted after one layer
        worker.clear_connector_metadata()
        later = scheduler.build_connector_meta(
            SchedulerOutput([], CachedRequestData(), {}, preempted_req_ids={"preempted"})
        )
        assert later.preempted_req_ids == frozenset({"preempted"})
        worker.handle_preemptions(later)
        with SyncKVClient(store_target, scheduler.config.namespace) as client:
            assert client.lookup(request.prompt_token_ids).num_matched == 0


def test_a_request_resumed_after_preemption_saves_each_block_from_its_own_page(
    store_target: str,
) -> None:
    # vLLM sends a resumed request's whole block table in scheduled_cached_reqs: it
    # replaces the table, or later blocks would be saved from the wrong pages.
    scheduler = make(KVConnectorRole.SCHEDULER, store_target)
    try:
        request = Request("resumed", tokens(20, seed=21))
        scheduler.get_num_new_matched_tokens(request, 0)
        scheduler.update_state_after_alloc(request, KVCacheBlocks(([5, 6],)), 0)
        first = scheduler.build_connector_meta(new_step(request, [5, 6], 0, 20))
        assert [save.block_ids for save in first.saves] == [[5]]
        scheduler.build_connector_meta(
            SchedulerOutput([], CachedRequestData(), {}, preempted_req_ids={"resumed"})
        )
        request.output_token_ids.extend(tokens(12, seed=22))  # 32 tokens: 2 full blocks
        scheduler.get_num_new_matched_tokens(request, 0)
        scheduler.update_state_after_alloc(request, KVCacheBlocks(([9, 10],)), 0)
        resumed = CachedRequestData(["resumed"], [([9, 10],)], [0], resumed_req_ids={"resumed"})
        again = scheduler.build_connector_meta(SchedulerOutput([], resumed, {"resumed": 32}))
        assert [save.block_ids for save in again.saves] == [[9, 10]]
        request.output_token_ids.extend(tokens(16, seed=23))  # block 2 fills in page 11
        decode = CachedRequestData(["resumed"], [([11],)], [32])
        later = scheduler.build_connector_meta(SchedulerOutput([], decode, {"resumed": 16}))
        [save] = later.saves
        assert save.block_ids == [11]
        assert save.parent_key == again.saves[0].keys[-1]
    finally:
        scheduler.shutdown()


@pytest.mark.parametrize("during", [True, False], ids=["saves-during", "saves-after"])
def test_a_failed_load_drops_only_the_saves_of_requests_that_loaded(
    store_target: str, during: bool
) -> None:
    seed = 31 if during else 131  # prompts of their own
    prompt = tokens(3 * BLOCK + 4, seed=seed)
    save_prompt(store_target, prompt, blocks_first_caches(seed=seed))
    caches = blocks_first_caches(seed=32)
    with both_roles(store_target, caches, save_during_forward=during) as (scheduler, worker):
        loading = Request("loading", prompt)
        fresh = Request("fresh", tokens(2 * BLOCK + 1, seed + 2))
        assert scheduler.get_num_new_matched_tokens(loading, 0) == (3 * BLOCK, False)
        scheduler.update_state_after_alloc(loading, KVCacheBlocks(([4, 5, 6, 7],)), 3 * BLOCK)
        assert scheduler.get_num_new_matched_tokens(fresh, 0) == (0, False)
        scheduler.update_state_after_alloc(fresh, KVCacheBlocks(([8, 9, 10],)), 0)
        step = SchedulerOutput(
            [
                NewRequestData("loading", prompt, ([4, 5, 6, 7],), 3 * BLOCK),
                NewRequestData("fresh", fresh.prompt_token_ids, ([8, 9, 10],), 0),
            ],
            CachedRequestData(),
            {"loading": 4, "fresh": 2 * BLOCK + 1},
        )
        metadata = scheduler.build_connector_meta(step)
        assert {save.request_id for save in metadata.saves} == {"fresh"}
        with SyncKVClient(store_target, scheduler.config.namespace) as client:
            client.delete(metadata.loads[0].keys[2:])  # the load fails at its third block
            run_step(worker, metadata, 4 + 2 * BLOCK + 1)
            assert worker.get_block_ids_with_load_errors() == {4, 5, 6}
            assert scheduler.request_finished(fresh, [8, 9, 10]) == (True, None)
            wait_finished(worker, "fresh")
            # The request that loaded nothing computed over its own pages: saved.
            assert worker.worker_side.save_reports["fresh"].num_committed == 2
            assert worker.worker_side.save_reports["fresh"].errors == []
            assert client.lookup(fresh.prompt_token_ids).num_matched == 2


@pytest.mark.parametrize("during", [True, False], ids=["saves-during", "saves-after"])
def test_a_failed_loads_own_save_is_dropped_and_its_request_still_finishes(
    store_target: str, during: bool
) -> None:
    """The request that loaded also computes a block of its own this step: with its load
    failed, that block attends over pages that never arrived, so it is not saved; the
    request is still reported finished, so vLLM frees its pages."""
    seed = 241 if during else 341  # prompts no other test stores
    prefix = tokens(2 * BLOCK, seed=seed)
    save_prompt(store_target, prefix, blocks_first_caches(seed=seed))
    prompt = prefix + tokens(BLOCK + 1, seed=seed + 1)
    with both_roles(store_target, blocks_first_caches(seed=42), save_during_forward=during) as (
        scheduler,
        worker,
    ):
        request = Request("loads-and-saves", prompt)
        assert scheduler.get_num_new_matched_tokens(request, 0) == (2 * BLOCK, False)
        scheduler.update_state_after_alloc(request, KVCacheBlocks(([4, 5, 6, 7],)), 2 * BLOCK)
        metadata = scheduler.build_connector_meta(
            new_step(request, [4, 5, 6, 7], 2 * BLOCK, BLOCK + 1)
        )
        [save] = metadata.saves
        assert save.block_ids == [6]
        with SyncKVClient(store_target, scheduler.config.namespace) as client:
            client.delete(metadata.loads[0].keys[1:])  # the load fails at its second block
            run_step(worker, metadata, BLOCK + 1)
            assert worker.get_block_ids_with_load_errors() == {4, 5}
            assert scheduler.request_finished(request, [4, 5, 6, 7]) == (True, None)
            wait_finished(worker, request.request_id)
            assert worker.worker_side.save_reports.get(request.request_id) is None or (
                worker.worker_side.save_reports[request.request_id].num_committed == 0
            )
            assert client.lookup(prompt).num_matched == 1  # the first block, nothing after


def test_a_save_the_forward_pass_fed_only_in_part_is_dropped_not_wedged(store_target: str) -> None:
    # A forward pass that skipped save_kv_layer for a layer: that save can never end, and
    # must not make the next step's saves (starting at layer 0) fail.
    with both_roles(store_target, blocks_first_caches(seed=95)) as (scheduler, worker):
        partial = Request("partial", tokens(BLOCK + 1, seed=95))
        scheduler.get_num_new_matched_tokens(partial, 0)
        scheduler.update_state_after_alloc(partial, KVCacheBlocks(([0, 1],)), 0)
        metadata = scheduler.build_connector_meta(new_step(partial, [0, 1], 0, BLOCK + 1))
        worker.bind_connector_metadata(pickle.loads(pickle.dumps(metadata)))
        worker.start_load_kv(None)
        worker.save_kv_layer(NAMES[0], torch.empty(0), None)  # layer 1 never saved
        worker.wait_for_save()
        worker.clear_connector_metadata()
        whole = Request("whole", tokens(BLOCK + 1, seed=96))
        scheduler.get_num_new_matched_tokens(whole, 0)
        scheduler.update_state_after_alloc(whole, KVCacheBlocks(([2, 3],)), 0)
        run_step(
            worker,
            scheduler.build_connector_meta(new_step(whole, [2, 3], 0, BLOCK + 1)),
            BLOCK + 1,
        )
        for request in (partial, whole):
            scheduler.request_finished(request, [])
            wait_finished(worker, request.request_id)
        with SyncKVClient(store_target, scheduler.config.namespace) as client:
            assert client.lookup(partial.prompt_token_ids).num_matched == 0
            assert client.lookup(whole.prompt_token_ids).num_matched == 1


def test_save_reports_keep_only_the_latest_requests(
    store_target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm_worker, "MAX_SAVE_REPORTS", 2)
    with both_roles(store_target, blocks_first_caches(seed=41)) as (scheduler, worker):
        for index in range(3):
            request = Request(f"r{index}", tokens(BLOCK + 1, seed=42 + index))
            scheduler.get_num_new_matched_tokens(request, 0)
            scheduler.update_state_after_alloc(request, KVCacheBlocks(([index, 11],)), 0)
            run_step(
                worker,
                scheduler.build_connector_meta(new_step(request, [index, 11], 0, BLOCK + 1)),
                BLOCK + 1,
            )
            assert scheduler.request_finished(request, [index, 11]) == (True, None)
            wait_finished(worker, request.request_id)
        assert list(worker.worker_side.save_reports) == ["r1", "r2"]


def finish_saved(scheduler: KVStoreConnector, request: Request, block_ids: list[int]) -> None:
    """Count, allocate, schedule the whole prompt and finish: its full blocks are to be
    saved, so their pin waits for the worker (update_connector_output says it is done)."""
    scheduler.get_num_new_matched_tokens(request, 0)
    scheduler.update_state_after_alloc(request, KVCacheBlocks((block_ids,)), 0)
    scheduler.build_connector_meta(new_step(request, block_ids, 0, len(request.prompt_token_ids)))
    assert scheduler.request_finished(request, block_ids) == (True, None)


def test_session_pins_are_remembered_per_session_and_only_until_they_expire(
    store_target: str,
) -> None:
    scheduler = make(KVConnectorRole.SCHEDULER, store_target, pin_ttl_s=0.2)
    side = scheduler.scheduler_side
    try:
        # Requests of no session are pinned for the TTL and not remembered.
        for index in range(5):
            finish_saved(scheduler, Request(f"solo{index}", tokens(BLOCK + 1, 50 + index)), [0, 1])
            scheduler.update_connector_output(KVConnectorOutput(finished_sending={f"solo{index}"}))
        assert side._sessions == {}
        params = {SESSION_PARAM: "agent"}
        turn = Request("turn1", tokens(BLOCK + 1, 60), kv_transfer_params=params)
        finish_saved(scheduler, turn, [2, 3])
        scheduler.update_connector_output(KVConnectorOutput(finished_sending={"turn1"}))
        assert list(side._sessions) == ["agent"]
        time.sleep(0.25)  # the pin expired; a session that never ends holds no memory
        other = Request("other", tokens(BLOCK + 1, 61), kv_transfer_params={SESSION_PARAM: "b"})
        finish_saved(scheduler, other, [4, 5])
        scheduler.update_connector_output(KVConnectorOutput(finished_sending={"other"}))
        assert list(side._sessions) == ["b"]
    finally:
        scheduler.shutdown()


def test_a_session_end_that_never_ran_still_unpins_the_session(store_target: str) -> None:
    scheduler = make(KVConnectorRole.SCHEDULER, store_target, pin_ttl_s=60)
    side = scheduler.scheduler_side
    try:
        with SyncKVClient(store_target, scheduler.config.namespace) as client:
            pinned_before = client.stats().num_pinned
            prompt = tokens(2 * BLOCK + 1, 70)
            client.put(prompt[: 2 * BLOCK], torch.zeros(LAYERS, 2, 2 * BLOCK, HEADS, HEAD_DIM))
            turn = Request("t1", prompt, kv_transfer_params={SESSION_PARAM: "s"})
            assert scheduler.get_num_new_matched_tokens(turn, 0) == (2 * BLOCK, False)
            scheduler.update_state_after_alloc(turn, KVCacheBlocks(([0, 1, 2],)), 2 * BLOCK)
            scheduler.build_connector_meta(new_step(turn, [0, 1, 2], 2 * BLOCK, 1))
            assert scheduler.request_finished(turn, [0, 1, 2]) == (False, None)  # nothing saved
            side.wait_for_control_calls(10)
            assert client.stats().num_pinned == pinned_before + 2
            # Turn 2 was queued behind an earlier turn's saves (its pin still pending),
            # then aborted before it ran, as the session's last request.
            side._pin_after_save["t0"] = ("s", [b"x"])
            end = Request(
                "t2", prompt, kv_transfer_params={SESSION_PARAM: "s", SESSION_END_PARAM: True}
            )
            assert scheduler.request_finished(end, []) == (False, None)
            side.wait_for_control_calls(10)
            assert client.stats().num_pinned == pinned_before
            assert side._sessions == {}
            assert side._pin_after_save == {}  # the pending pin will not pin the ended session
    finally:
        scheduler.shutdown()


def test_the_worker_times_prefill_steps_without_being_told_their_tokens(store_target: str) -> None:
    # vLLM calls start_load_kv(forward_context) with no token count: the metadata carries
    # the step's scheduled tokens, so the prefill rate is measured under vLLM too.
    with both_roles(store_target, blocks_first_caches(seed=81)) as (scheduler, worker):
        request = Request("timed", tokens(4 * BLOCK + 1, seed=81))
        scheduler.get_num_new_matched_tokens(request, 0)
        scheduler.update_state_after_alloc(request, KVCacheBlocks(([0, 1, 2, 3, 4],)), 0)
        metadata = scheduler.build_connector_meta(new_step(request, [0, 1, 2, 3, 4], 0, 65))
        assert metadata.num_step_tokens == 65
        worker.bind_connector_metadata(pickle.loads(pickle.dumps(metadata)))
        worker.start_load_kv(None)  # as vLLM's model runner calls it
        for name in NAMES:
            worker.wait_for_layer_load(name)
            worker.save_kv_layer(name, torch.empty(0), None)
        worker.wait_for_save()
        worker.clear_connector_metadata()
        stats = worker.get_kv_connector_stats()
        assert stats is not None
        assert stats.data["prefill_tokens_per_s"] > 0


@dataclass
class ServingRequest(Request):
    """What else vLLM's Request carries that decides its KV."""

    cache_salt: str | None = None
    lora_request: Any = None
    mm_features: list[Any] = field(default_factory=list)


def test_a_cache_salt_or_lora_adapter_keeps_requests_from_sharing_kv(store_target: str) -> None:
    prompt = tokens(3 * BLOCK + 4, seed=91)
    with both_roles(store_target, blocks_first_caches(seed=91)) as (scheduler, worker):
        saver = ServingRequest("salted", prompt, cache_salt="team-a")
        scheduler.get_num_new_matched_tokens(saver, 0)
        scheduler.update_state_after_alloc(saver, KVCacheBlocks(([0, 1, 2, 3],)), 0)
        run_step(
            worker,
            scheduler.build_connector_meta(new_step(saver, [0, 1, 2, 3], 0, len(prompt))),
            len(prompt),
        )
        assert scheduler.request_finished(saver, [0, 1, 2, 3]) == (True, None)
        wait_finished(worker, "salted")
        adapter = SimpleNamespace(lora_name="adapter-1", lora_int_id=1)
        cases = {
            "same salt": (ServingRequest("a", prompt, cache_salt="team-a"), 3 * BLOCK),
            "other salt": (ServingRequest("b", prompt, cache_salt="team-b"), 0),
            "no salt": (ServingRequest("c", prompt), 0),
            "salt and adapter": (
                ServingRequest("d", prompt, cache_salt="team-a", lora_request=adapter),
                0,
            ),
        }
        for name, (request, expected) in cases.items():
            assert scheduler.get_num_new_matched_tokens(request, 0) == (expected, False), name


def test_multimodal_and_embedding_prompts_are_neither_looked_up_nor_saved(
    store_target: str,
) -> None:
    scheduler = make(KVConnectorRole.SCHEDULER, store_target)
    try:
        with SyncKVClient(store_target, scheduler.config.namespace) as client:
            lookups = client.stats().lookups
            image = ServingRequest("image", tokens(2 * BLOCK + 1, 92), mm_features=[object()])
            embedded = ServingRequest("embedded", [])
            embedded.prompt_token_ids = None  # type: ignore[assignment]
            for request in (image, embedded):
                scheduler.on_new_request(request)
                assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
                plan = scheduler.scheduler_side.plan_for(request.request_id)
                assert plan is not None
                assert plan.fetch.reason.startswith("no store:")
            scheduler.update_state_after_alloc(image, KVCacheBlocks(([0, 1, 2],)), 0)
            metadata = scheduler.build_connector_meta(new_step(image, [0, 1, 2], 0, 2 * BLOCK + 1))
            assert metadata.saves == []  # its KV is not its tokens' alone: never stored
            assert client.stats().lookups == lookups
    finally:
        scheduler.shutdown()


def test_layer_wise_hooks_ask_vllm_for_piecewise_cuda_graphs() -> None:
    assert KVStoreConnector.requires_piecewise_for_cudagraph({}) is True


# -- fetch or recompute ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hbm_target() -> Iterator[str]:
    """A server whose (CPU-emulated) HBM tier takes blocks seen twice."""
    settings = {"store.hbm_bytes": 1 << 20, "store.hbm_device": "cpu"}
    with server_thread(**settings, **{"store.hbm_promote_after_seen": 2}) as target:
        yield target


@pytest.mark.parametrize(
    ("hbm_rate", "dram_rate", "num_loaded", "reason"),
    [
        (1e9, 1e9, 4, "fetch"),
        (1e9, 1e6, 2, "fetch prefix: 2 of 4"),
        # A slow head: loading from the first block never pays, though DRAM would.
        (1e6, 1e9, 0, "recompute: fetching 4 block(s)"),
    ],
)
def test_the_plan_loads_all_a_fast_prefix_or_nothing(
    hbm_target: str, hbm_rate: float, dram_rate: float, num_loaded: int, reason: str
) -> None:
    prompt = tokens(4 * BLOCK + 1, seed=20 + num_loaded)  # a chain of its own per case
    save_prompt(hbm_target, prompt, blocks_first_caches(seed=20))
    # Recomputing a block takes 1 ms; fetching one (8 KiB) 8 us at 1e9 B/s, 8 ms at 1e6.
    scheduler = make(KVConnectorRole.SCHEDULER, hbm_target, prefill_tokens_per_s=16_000.0)
    try:
        with SyncKVClient(hbm_target, scheduler.config.namespace) as client:
            head = client.lookup(prompt[: 2 * BLOCK])
            for _ in range(2):  # seen twice: the head is copied into HBM
                client.get_into(head, torch.zeros(LAYERS, 2, 2 * BLOCK, HEADS, HEAD_DIM))
            tiers = client.lookup(prompt).tiers
        assert tiers == (TierKind.HBM, TierKind.HBM, TierKind.DRAM, TierKind.DRAM)
        stats = {
            "fetch_bytes_per_s": dram_rate,
            "fetch_bytes_per_s:hbm": hbm_rate,
            "fetch_bytes_per_s:dram": dram_rate,
        }
        scheduler.update_connector_output(KVConnectorOutput(kv_connector_stats=stats))
        request = Request("planned", prompt)
        counted = scheduler.get_num_new_matched_tokens(request, 0)
        plan = scheduler.scheduler_side.plan_for("planned")
        assert plan is not None
        assert counted == (num_loaded * BLOCK, False), plan
        assert plan.num_matched_blocks == 4
        assert plan.fetch.reason.startswith(reason)
    finally:
        scheduler.shutdown()


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
def test_below_break_even_on_every_tier_the_count_looks_nothing_up_and_the_save_skips_stored(
    store_target: str, data_plane: bool
) -> None:
    seed = 60 if data_plane else 64  # a chain of its own per transport
    stored = tokens(2 * BLOCK, seed=seed)
    stored_caches = blocks_first_caches(seed=seed)
    save_prompt(store_target, [*stored, 1], stored_caches)
    prompt = [*stored, *tokens(2 * BLOCK + 1, seed=seed + 1)]  # 4 blocks, the first 2 stored
    scheduler = make(
        KVConnectorRole.SCHEDULER,
        store_target,
        prefill_tokens_per_s=16_000.0,
        data_plane=data_plane,
    )
    worker = make(KVConnectorRole.WORKER, store_target, data_plane=data_plane)
    try:
        caches = blocks_first_caches(seed=62)
        worker.register_kv_caches(caches)
        # Break-even: 8 KiB blocks of 16 tokens at 16,000 tokens/s need 8.2 MB/s.
        rates = {"fetch_bytes_per_s": 4e6, "fetch_bytes_per_s:dram": 4e6}
        scheduler.update_connector_output(KVConnectorOutput(kv_connector_stats=rates))
        with SyncKVClient(store_target, scheduler.config.namespace) as client:
            before = client.stats()
            request = Request("below", prompt)
            scheduler.on_new_request(request)
            assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
            assert client.stats().lookups == before.lookups
            plan = scheduler.scheduler_side.plan_for("below")
            assert plan is not None
            assert not plan.looked_up
            assert plan.fetch.reason.startswith("recompute, no lookup"), plan.fetch.reason
            block_ids = list(range(5))
            scheduler.update_state_after_alloc(request, KVCacheBlocks((block_ids,)), 0)
            metadata = scheduler.build_connector_meta(new_step(request, block_ids, 0, len(prompt)))
            [save] = metadata.saves
            assert save.skip_stored
            assert save.block_ids == block_ids[:4]
            assert save.parent_key == b""
            run_step(worker, metadata, len(prompt))
            assert scheduler.request_finished(request, block_ids) == (True, None)
            wait_finished(worker, "below")
            after = client.stats()
            # The worker looked the chain up once, then sent only the 2 blocks after it.
            assert after.lookups == before.lookups + 1
            assert after.blocks_put - before.blocks_put == 2
            match = client.lookup(prompt)
            assert match.num_matched == 4
            got = torch.zeros(4, LAYERS, 2, BLOCK, HEADS, HEAD_DIM)
            client.get_into(match, got, form=KVForm.BLOCKS)
        for layer, name in enumerate(NAMES):
            assert torch.equal(got[:2, layer], stored_caches[name][:2])
            assert torch.equal(got[2:, layer], caches[name][2:4])
    finally:
        worker.shutdown()
        scheduler.shutdown()


def test_below_break_even_a_few_blocks_are_fetched_every_remeasure_s_to_measure_again(
    store_target: str,
) -> None:
    prompt = tokens(12 * BLOCK + 1, seed=63)  # 12 blocks of 8 KiB: more than a probe
    save_prompt(
        store_target, prompt, {name: torch.randn(13, 2, BLOCK, HEADS, HEAD_DIM) for name in NAMES}
    )
    scheduler = make(
        KVConnectorRole.SCHEDULER, store_target, prefill_tokens_per_s=16_000.0, remeasure_s=0.2
    )
    try:
        rates = {"fetch_bytes_per_s": 4e6}  # below the 8.2 MB/s break-even
        scheduler.update_connector_output(KVConnectorOutput(kv_connector_stats=rates))
        with SyncKVClient(store_target, scheduler.config.namespace) as client:
            before = client.stats().lookups
            assert scheduler.get_num_new_matched_tokens(Request("a", prompt), 0) == (0, False)
            assert client.stats().lookups == before
            time.sleep(0.25)
            # 64 KiB measure the store: 8 of the 12 stored blocks, though recomputing pays.
            probe = Request("b", prompt)
            assert scheduler.get_num_new_matched_tokens(probe, 0) == (8 * BLOCK, False)
            assert client.stats().lookups == before + 1
            plan = scheduler.scheduler_side.plan_for("b")
            assert plan is not None
            assert plan.num_matched_blocks == 12
            assert plan.fetch.reason.startswith("fetch 8 block(s) to measure the store again")
            # The probe counts as a fetch: the next request looks nothing up again.
            assert scheduler.get_num_new_matched_tokens(Request("c", prompt), 0) == (0, False)
            assert client.stats().lookups == before + 1
    finally:
        scheduler.shutdown()
