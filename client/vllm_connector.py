"""KVStoreConnector: kvstore as a vLLM KV connector (v1), loaded out of tree.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.client.vllm_connector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"target": "10.0.0.5:50051", ...}}'

vLLM makes one instance in its scheduler process (role SCHEDULER) and one per worker (role
WORKER); each uses only its role's methods. Settings come from `kv_connector_extra_config`
(kvstore.client._vllm_config lists them). When `vllm` is importable the class subclasses its
`KVConnectorBase_V1`; without it, a stand-in base with the same constructor, so that the
emulator in kvstore.bench.disagg.engine drives the same code.

The store is a best-effort cache: `requires_kv_delivery` is False, a failed save is a future
miss, and a failed load is reported as block ids that vLLM recomputes.
"""

from __future__ import annotations

from typing import Any

import torch

from kvstore.client._vllm_config import ConnectorConfig, ConnectorConfigError
from kvstore.client._vllm_metadata import KVStoreConnectorMetadata, KVStoreConnectorStats
from kvstore.client._vllm_scheduler import (
    LOAD_PARAM,
    SAVE_PARAM,
    SESSION_END_PARAM,
    SESSION_PARAM,
    MatchPlan,
    SchedulerSide,
)
from kvstore.client._vllm_types import VLLM_AVAILABLE, KVConnectorBase, KVConnectorRole
from kvstore.client._vllm_worker import WorkerSide

__all__ = [
    "LOAD_PARAM",
    "SAVE_PARAM",
    "SESSION_END_PARAM",
    "SESSION_PARAM",
    "VLLM_AVAILABLE",
    "ConnectorConfig",
    "ConnectorConfigError",
    "KVConnectorRole",
    "KVStoreConnector",
    "KVStoreConnectorMetadata",
    "KVStoreConnectorStats",
    "MatchPlan",
]


class KVStoreConnector(KVConnectorBase):  # type: ignore[misc]
    """vLLM's KV connector v1 contract over a kvstore server."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.config = ConnectorConfig.from_vllm_config(vllm_config)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(self.config)
        else:
            self._worker = WorkerSide(self.config)

    @property
    def requires_kv_delivery(self) -> bool:
        return False

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Loads and saves run layer by layer from Python (`wait_for_layer_load`,
        `save_kv_layer`): a full CUDA graph's replay would skip them, so vLLM must capture
        piecewise graphs around attention."""
        return True

    @property
    def scheduler_side(self) -> SchedulerSide:
        if self._scheduler is None:
            raise RuntimeError("a scheduler-side method was called on a WORKER connector")
        return self._scheduler

    @property
    def worker_side(self) -> WorkerSide:
        if self._worker is None:
            raise RuntimeError("a worker-side method was called on a SCHEDULER connector")
        return self._worker

    # -- scheduler side -----------------------------------------------------------------------

    def on_new_request(self, request: Any) -> None:
        """vLLM's scheduler added `request`: its lookup starts now, so that the first
        `get_num_new_matched_tokens` does not wait a round trip for it."""
        self.scheduler_side.on_new_request(request)

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens beyond `num_computed_tokens` to load: whole stored blocks, and only as many
        as arrive sooner than they could be recomputed. Never loads asynchronously."""
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVStoreConnectorMetadata:
        return self.scheduler_side.build_connector_meta(scheduler_output)

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """True while the request's saves run (vLLM frees its blocks once `get_finished`
        lists it). Pins the chain for `pin_ttl_s`; a request whose kv_transfer_params say
        `kvstore_session_end` releases its session's pins instead."""
        return self.scheduler_side.request_finished(request, block_ids)

    def update_connector_output(self, connector_output: Any) -> None:
        self.scheduler_side.update_connector_output(connector_output)

    # -- worker side ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker_side.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        self.worker_side.handle_preemptions(kv_connector_metadata)

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        """Bind the step's metadata, and open its saves now: this is the one call vLLM
        makes before every forward pass, whatever the release."""
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None and isinstance(connector_metadata, KVStoreConnectorMetadata):
            self._worker.begin_step(connector_metadata, connector_metadata.num_step_tokens)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, KVStoreConnectorMetadata)
        num_tokens = kwargs.get("num_step_tokens")  # the emulator passes it; vLLM does not
        if not isinstance(num_tokens, int):
            num_tokens = metadata.num_step_tokens or _step_tokens(forward_context)
        self.worker_side.start_load_kv(metadata, num_tokens)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker_side.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        self.worker_side.save_kv_layer(layer_name)

    def wait_for_save(self) -> None:
        self.worker_side.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker_side.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.get_block_ids_with_load_errors()

    def get_kv_connector_stats(self) -> KVStoreConnectorStats | None:
        """The rates this worker measured, for the scheduler side's plans (None on the
        scheduler, or before anything was measured)."""
        if self._worker is None:
            return None
        data = self._worker.stats()
        return KVStoreConnectorStats(data=dict(data)) if data else None

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVStoreConnectorStats | None:
        """Stats rebuilt from their data, as vLLM does after sending them between
        processes."""
        return KVStoreConnectorStats(data=dict(data or {}))

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown()
        if self._worker is not None:
            self._worker.shutdown()


def _step_tokens(forward_context: Any) -> int:
    """Tokens the step computes, where the forward context says (0: unknown)."""
    value = getattr(forward_context, "num_tokens", 0)
    return value if isinstance(value, int) else 0
