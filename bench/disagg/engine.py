"""A serving engine in miniature that drives `KVStoreConnector` the way vLLM does.

Two connectors, as in vLLM: one with the SCHEDULER role and one with the WORKER role, which
registers the model's paged cache. Per step the scheduler side builds the metadata, which is
pickled and unpickled (vLLM sends it to the worker processes), bound to the worker side, and
the model's forward pass calls `wait_for_layer_load` and `save_kv_layer` in every layer;
then `wait_for_save`, `get_block_ids_with_load_errors` and `get_finished` go back to the
scheduler side in a `KVConnectorOutput`. A request:

1. `on_new_request` (vLLM's add_request), `get_num_new_matched_tokens`, the cache allocates
   its pages, `update_state_after_alloc`;
2. prefill steps (chunks of `chunk_tokens`, or one): loads run in the first; blocks that
   failed to load are recomputed from the first of them, as vLLM's scheduler does;
3. decode steps of one token each (their full blocks are saved too, `save_decoded`);
4. `request_finished`; while it says the saves still read the pages, the engine keeps
   stepping `get_finished` and frees the pages once the worker lists the request.

Time to first token runs from the request's arrival to the first token's logits: the lookup,
the loads and the prefill, never a save.
"""

from __future__ import annotations

import itertools
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kvstore.bench.disagg.model import PagedKVCache, Sequence, Transformer
from kvstore.bench.disagg.serving import StoreRun
from kvstore.client import Namespace
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
    LOAD_PARAM,
    SAVE_PARAM,
    SESSION_END_PARAM,
    SESSION_PARAM,
    KVConnectorRole,
    KVStoreConnector,
    KVStoreConnectorMetadata,
)

_DRAIN_POLL_S = 0.001


def extra_config_for(target: str, namespace: Namespace, **settings: Any) -> dict[str, Any]:
    """The `kv_connector_extra_config` that names `namespace` at `target`."""
    layout = namespace.layout
    return {
        "target": target,
        "tenant": namespace.tenant,
        "model_fingerprint": namespace.model_fingerprint,
        "block_size": layout.block_tokens,
        "num_layers": layout.num_layers,
        "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "dtype": layout.dtype.name.lower(),
        **settings,
    }


@dataclass(frozen=True)
class ForwardContext:
    """What this engine's `start_load_kv` passes: the tokens the step computes."""

    num_tokens: int


class _WorkerHooks:
    """The model's per-layer hooks: vLLM's attention layers call these two."""

    def __init__(
        self, worker: KVStoreConnector | _NoStore, cache: PagedKVCache, names: list[str]
    ) -> None:
        self.worker = worker
        self.cache = cache
        self.names = names

    def before_layer(self, layer: int) -> None:
        self.worker.wait_for_layer_load(self.names[layer])

    def after_layer(self, layer: int) -> None:
        self.worker.save_kv_layer(self.names[layer], self.cache.layer(layer), None)


class _NoStore:
    """Both roles of no connector at all, for `Engine.without_store`. vLLM without a
    `kv_transfer_config` makes none of these calls; here each is a call that does nothing,
    so that the engine's own scheduling and bookkeeping are timed alike with and without
    a store, and a store's run is weighed against only what the store adds."""

    def __init__(self) -> None:
        self.scheduler_side = self
        self.worker_side = self
        self.last_load: Any = None
        self.save_reports: dict[str, Any] = {}
        self.fetch_bytes_per_s: float | None = None

    def stats(self) -> dict[str, float]:
        return {}

    def on_new_request(self, request: Request) -> None:
        pass

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        return 0, False

    def plan_for(self, request_id: str) -> None:
        return None

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        pass

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVStoreConnectorMetadata:
        return KVStoreConnectorMetadata()

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, None]:
        return False, None

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        pass

    def register_kv_caches(self, kv_caches: dict[str, Tensor]) -> None:
        pass

    def bind_connector_metadata(self, metadata: KVStoreConnectorMetadata) -> None:
        pass

    def start_load_kv(self, forward_context: ForwardContext) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: Tensor, attn_metadata: None) -> None:
        pass

    def wait_for_save(self) -> None:
        pass

    def clear_connector_metadata(self) -> None:
        pass

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[None, None]:
        return None, None

    def get_kv_connector_stats(self) -> None:
        return None

    def abort_all(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class Engine:
    """One model, its paged cache, and the two roles of the connector over `target`.

    `settings` are more `kv_connector_extra_config` keys (prefill rate, pin TTL...).
    `chunk_tokens` splits prefills into steps of at most that many tokens.
    """

    def __init__(
        self,
        model: Transformer,
        cache: PagedKVCache,
        target: str | None,
        namespace: Namespace | None,
        *,
        chunk_tokens: int | None = None,
        **settings: Any,
    ) -> None:
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.model = model
        self.cache = cache
        self.chunk_tokens = chunk_tokens
        self.scheduler: KVStoreConnector | _NoStore
        self.worker: KVStoreConnector | _NoStore
        if target is None or namespace is None:
            self.scheduler = self.worker = _NoStore()
        else:
            extra = extra_config_for(target, namespace, **settings)
            vllm_config = VllmConfig(KVTransferConfig(kv_connector_extra_config=extra))
            self.scheduler = KVStoreConnector(vllm_config, KVConnectorRole.SCHEDULER)
            try:
                self.worker = KVStoreConnector(vllm_config, KVConnectorRole.WORKER)
            except BaseException:
                self.scheduler.shutdown()
                raise
        self._layer_names = [
            f"model.layers.{i}.self_attn.attn" for i in range(cache.config.num_layers)
        ]
        self.worker.register_kv_caches(
            {name: cache.layer(i) for i, name in enumerate(self._layer_names)}
        )
        self._hooks = _WorkerHooks(self.worker, cache, self._layer_names)
        self._ids = itertools.count()
        self._finished_req_ids: set[str] = set()  # reach the worker with the next step
        self._pending_finished: set[str] = set()
        self._last_failed: set[int] = set()

    @classmethod
    def without_store(
        cls, model: Transformer, cache: PagedKVCache, *, chunk_tokens: int | None = None
    ) -> Engine:
        """The same engine with no connector: what "no store at all" costs it."""
        return cls(model, cache, None, None, chunk_tokens=chunk_tokens)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.worker.shutdown()
        self.scheduler.shutdown()

    def serve(
        self,
        prompt: Tensor,
        num_new_tokens: int,
        *,
        load: bool = True,
        save: bool = True,
        session: str | None = None,
        session_end: bool = False,
        before_step: Callable[[KVStoreConnectorMetadata], None] | None = None,
    ) -> StoreRun:
        """Serve one request: prefill `prompt` (loading what the scheduler side chose), decode
        `num_new_tokens` greedily, and wait until its saves are done. `before_step` sees each
        step's metadata before the worker acts on it (tests use it to evict blocks)."""
        start = time.perf_counter()
        block_tokens = self.cache.config.page_tokens
        params: dict[str, Any] = {LOAD_PARAM: load, SAVE_PARAM: save}
        if session is not None:
            params[SESSION_PARAM] = session
            params[SESSION_END_PARAM] = session_end
        request = Request(f"req-{next(self._ids)}", prompt.tolist(), kv_transfer_params=params)
        num_prompt = len(request.prompt_token_ids)
        # vLLM's add_request, then its next schedule: here the engine is idle, so the
        # lookup that arrival starts has no step to hide behind.
        self.scheduler.on_new_request(request)
        num_external, _ = self.scheduler.get_num_new_matched_tokens(request, 0)
        match_s = time.perf_counter() - start
        num_external = num_external or 0
        plan = self.scheduler.scheduler_side.plan_for(request.request_id)
        seq = Sequence()
        self.cache.allocate(seq, num_prompt)
        blocks = KVCacheBlocks((list(seq.page_ids),))
        self.scheduler.update_state_after_alloc(request, blocks, num_external)
        run = _RunTally(fallback=_fallback(plan.fetch.reason) if plan is not None else None)
        computed = num_external
        is_new = True
        logits = torch.empty(0)
        try:
            while computed < num_prompt:
                step = min(self.chunk_tokens or num_prompt, num_prompt - computed)
                seq.num_tokens = computed
                output = self._schedule(request, seq, computed, step, is_new, before_step)
                is_new = False
                logits = self._execute(output, prompt[computed : computed + step], seq, step)
                failed = self.worker.worker_side.last_load
                if failed is not None and failed.error is not None:
                    # vLLM recomputes from the first block that did not load.
                    first_failed = self._first_failed(seq, failed_ids=self._last_failed)
                    computed = min(computed, first_failed * block_tokens)
                    run.fallback = f"load failed, recomputing: {failed.error}"
                    run.loaded_blocks = 0
                    continue
                run.record_load(self.worker.worker_side.last_load)
                computed += step
            token_ids = [int(logits[-1].argmax())]
            ttft_s = time.perf_counter() - start
            all_logits = [logits[-1]]
            while len(token_ids) < num_new_tokens:
                request.output_token_ids.append(token_ids[-1])
                last = torch.tensor([token_ids[-1]], device=self.model.device)
                output = self._schedule(request, seq, seq.num_tokens, 1, False, before_step)
                step_logits = self._execute(output, last, seq, 1)
                all_logits.append(step_logits[-1])
                token_ids.append(int(step_logits[-1].argmax()))
            request.output_token_ids.append(token_ids[-1])
            drain_from = time.perf_counter()
            self._finish(request, seq)
            run.drain_s = time.perf_counter() - drain_from
        except BaseException:
            self.worker.worker_side.abort_all()
            self.cache.free(seq)
            raise
        report = self.worker.worker_side.save_reports.pop(request.request_id, None)
        return StoreRun(
            token_ids=token_ids,
            logits=torch.stack(all_logits).float().cpu(),
            num_prompt_tokens=num_prompt,
            num_reused_tokens=run.loaded_blocks * block_tokens,
            bytes_fetched=run.bytes_fetched,
            ttft_s=ttft_s,
            load_stall_s=run.stall_s,
            num_saved_blocks=report.num_committed if report else 0,
            save_wait_s=run.drain_s,
            fallback=run.fallback,
            save_error="; ".join(report.errors) if report and report.errors else None,
            decision=plan.fetch.reason if plan is not None else "",
            num_matched_tokens=(plan.num_matched_blocks * block_tokens) if plan else 0,
            match_s=match_s,
        )

    # -- steps ---------------------------------------------------------------------------------

    def _schedule(
        self,
        request: Request,
        seq: Sequence,
        computed: int,
        num_tokens: int,
        is_new: bool,
        before_step: Callable[[KVStoreConnectorMetadata], None] | None,
    ) -> KVStoreConnectorMetadata:
        """The scheduler's half of a step: what vLLM's scheduler hands the connector."""
        new_blocks = self.cache.allocate(seq, computed + num_tokens)
        if is_new:
            new = [
                NewRequestData(
                    request.request_id, request.prompt_token_ids, (list(seq.page_ids),), computed
                )
            ]
            cached = CachedRequestData()
        else:
            new = []
            cached = CachedRequestData(
                req_ids=[request.request_id],
                new_block_ids=[(new_blocks,) if new_blocks else None],
                num_computed_tokens=[computed],
            )
        output = SchedulerOutput(
            scheduled_new_reqs=new,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens={request.request_id: num_tokens},
            finished_req_ids=self._take_finished(),
        )
        metadata = self.scheduler.build_connector_meta(output)
        if before_step is not None:
            before_step(metadata)
        self._pending_finished = output.finished_req_ids
        return metadata

    def _take_finished(self) -> set[str]:
        finished, self._finished_req_ids = self._finished_req_ids, set()
        return finished

    def _execute(
        self, metadata: KVStoreConnectorMetadata, tokens: Tensor, seq: Sequence, num_tokens: int
    ) -> Tensor:
        """The worker's half: vLLM pickles the metadata to the worker process."""
        metadata = pickle.loads(pickle.dumps(metadata))
        self.worker.bind_connector_metadata(metadata)
        # vLLM's order since mid-2026 (SchedulerOutput.has_sync_kv_loads): loads this step
        # needs start before the forward pass; on steps without one, start_load_kv comes
        # after it (this connector's loads are all synchronous).
        has_sync_kv_loads = bool(metadata.loads)
        if has_sync_kv_loads:
            self.worker.start_load_kv(ForwardContext(num_tokens))
        logits = self.model.forward(
            tokens.to(self.model.device), seq, self.cache, self._hooks, last_logits_only=True
        )
        if not has_sync_kv_loads:
            self.worker.start_load_kv(ForwardContext(num_tokens))
        self.worker.wait_for_save()
        self.worker.clear_connector_metadata()
        self._report(self._pending_finished)
        return logits

    def _report(self, finished_req_ids: set[str]) -> set[str]:
        """The step's KVConnectorOutput, back to the scheduler side."""
        self._last_failed = self.worker.get_block_ids_with_load_errors()
        sending, _ = self.worker.get_finished(finished_req_ids)
        self.scheduler.update_connector_output(
            KVConnectorOutput(
                finished_sending=sending,
                invalid_block_ids=self._last_failed,
                # As vLLM carries them: from the worker process, pickled.
                kv_connector_stats=pickle.loads(pickle.dumps(self.worker.get_kv_connector_stats())),
            )
        )
        return sending or set()

    def _first_failed(self, seq: Sequence, failed_ids: set[int]) -> int:
        return min(index for index, page in enumerate(seq.page_ids) if page in failed_ids)

    def _finish(self, request: Request, seq: Sequence) -> None:
        """request_finished, then idle steps until the worker is done with the pages."""
        delay, _ = self.scheduler.request_finished(request, list(seq.page_ids))
        if delay:
            # vLLM passes the id to the workers with the next step's finished_req_ids.
            announced = {request.request_id}
            while request.request_id not in self._report(announced):
                announced = set()
                time.sleep(_DRAIN_POLL_S)
        self.cache.free(seq)


@dataclass
class _RunTally:
    fallback: str | None
    loaded_blocks: int = 0
    bytes_fetched: int = 0
    stall_s: float = 0.0
    drain_s: float = 0.0

    def record_load(self, load: Any) -> None:
        if load is None:
            return
        self.loaded_blocks += load.num_blocks
        self.bytes_fetched += load.num_bytes
        self.stall_s += load.stall_s


def _fallback(reason: str) -> str | None:
    return f"{reason}, recomputing" if reason.startswith("lookup failed") else None
