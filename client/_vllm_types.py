"""vLLM's KV connector v1 base class and the types its hooks receive: the real ones when
`vllm` is importable, else stand-ins with the same names and the fields the connector reads.

The stand-ins are what the disaggregated emulator (kvstore.bench.disagg.engine) builds to
drive the connector the way vLLM's scheduler and model runner would. Only the fields
`KVStoreConnector` reads are here, under vLLM's names: `Request.request_id`,
`prompt_token_ids`, `all_token_ids`, `kv_transfer_params`; `SchedulerOutput.scheduled_new_reqs`,
`scheduled_cached_reqs`, `num_scheduled_tokens`, `finished_req_ids`, `preempted_req_ids`;
`KVConnectorOutput.finished_sending`, `finished_recving`, `kv_connector_stats`,
`invalid_block_ids`; `KVCacheBlocks.get_block_ids()`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

__all__ = [
    "VLLM_AVAILABLE",
    "CachedRequestData",
    "KVCacheBlocks",
    "KVConnectorBase",
    "KVConnectorMetadata",
    "KVConnectorOutput",
    "KVConnectorRole",
    "KVConnectorStats",
    "KVTransferConfig",
    "NewRequestData",
    "Request",
    "SchedulerOutput",
    "VllmConfig",
]


class _StandInRole(enum.Enum):
    SCHEDULER = 0
    WORKER = 1


class _StandInMetadata:
    """Scheduler-side connector -> worker-side connector, once per step."""


class _StandInBase:
    """The parts of vLLM's `KVConnectorBase_V1` that are not abstract and that the connector
    relies on: the constructor's bookkeeping and the metadata binding."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        if vllm_config.kv_transfer_config is None:
            raise ValueError("kv_transfer_config must be set for KVConnectorBase_V1")
        self._connector_metadata: Any = None
        self._vllm_config = vllm_config
        self._kv_transfer_config = vllm_config.kv_transfer_config
        self._kv_cache_config = kv_cache_config
        self._role = role

    @property
    def role(self) -> Any:
        return self._role

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        self._connector_metadata = connector_metadata

    def clear_connector_metadata(self) -> None:
        self._connector_metadata = None

    def has_connector_metadata(self) -> bool:
        return self._connector_metadata is not None

    def _get_connector_metadata(self) -> Any:
        assert self._connector_metadata is not None
        return self._connector_metadata


@dataclass
class _StandInStats:
    """vLLM's `KVConnectorStats`: a worker's telemetry, carried to the scheduler in
    `KVConnectorOutput.kv_connector_stats` (and to vLLM's logger)."""

    data: dict[str, Any] = field(default_factory=dict)


if TYPE_CHECKING:
    KVConnectorStats: Any = _StandInStats
    KVConnectorBase: Any = _StandInBase
    KVConnectorMetadata: Any = _StandInMetadata
    KVConnectorRole: Any = _StandInRole
    VLLM_AVAILABLE = False
else:
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import (
            KVConnectorBase_V1 as KVConnectorBase,
        )
        from vllm.distributed.kv_transfer.kv_connector.v1.base import (
            KVConnectorMetadata,
            KVConnectorRole,
        )

        VLLM_AVAILABLE = True
    except ImportError:
        KVConnectorBase = _StandInBase
        KVConnectorMetadata = _StandInMetadata
        KVConnectorRole = _StandInRole
        VLLM_AVAILABLE = False
    try:  # vLLM releases before connector stats (about 0.10) lack the module
        from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    except ImportError:
        KVConnectorStats = _StandInStats


# -- stand-ins for what vLLM passes in (the emulator builds these) ---------------------------


@dataclass
class KVTransferConfig:
    kv_connector: str = "KVStoreConnector"
    kv_role: str = "kv_both"
    kv_connector_module_path: str = "kvstore.client.vllm_connector"
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class VllmConfig:
    kv_transfer_config: KVTransferConfig | None


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    kv_transfer_params: dict[str, Any] | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]


@dataclass(frozen=True)
class KVCacheBlocks:
    blocks: tuple[list[int], ...]  # block ids per KV cache group; this emulator has one

    def get_block_ids(self) -> tuple[list[int], ...]:
        return self.blocks


@dataclass(frozen=True)
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int


@dataclass(frozen=True)
class CachedRequestData:
    req_ids: list[str] = field(default_factory=list)
    # For a request in resumed_req_ids (back from preemption), its whole block table.
    new_block_ids: list[tuple[list[int], ...] | None] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)


@dataclass
class KVConnectorOutput:
    finished_sending: set[str] | None = None
    finished_recving: set[str] | None = None
    kv_connector_stats: Any = None
    invalid_block_ids: set[int] = field(default_factory=set)
