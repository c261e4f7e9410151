"""What the scheduler-side connector hands the worker-side connector each step.

vLLM pickles it to every worker, so it holds only plain data: keys, block ids, ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvstore.client._vllm_types import KVConnectorMetadata, KVConnectorStats

# The worker side's stats, back to the scheduler side in KVConnectorOutput.kv_connector_stats,
# name each tier's measured rate "fetch_bytes_per_s:dram" and so on.
TIER_RATE_PREFIX = "fetch_bytes_per_s:"


@dataclass(frozen=True)
class LoadSpec:
    """Fetch `keys` (a run of one request's chain) into the cache blocks `block_ids`."""

    request_id: str
    keys: list[bytes]
    block_ids: list[int]


@dataclass(frozen=True)
class SaveSpec:
    """Put the blocks `block_ids` as `keys`, chained from `parent_key` (b"": the root),
    layer by layer as this step's forward pass writes them. With `skip_stored` the scheduler
    did not look the keys up: the worker's put looks them up first and sends only the
    blocks after the stored prefix."""

    request_id: str
    keys: list[bytes]
    block_ids: list[int]
    parent_key: bytes
    skip_stored: bool = False


@dataclass(frozen=True)
class KVStoreConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    # Requests preempted since the last step: their blocks are freed and may be rewritten,
    # so their saves in flight are cancelled before the forward pass.
    preempted_req_ids: frozenset[str] = frozenset()
    # Tokens the step computes (vLLM's total_num_scheduled_tokens): with the step's
    # time, the worker's prefill-rate sample. vLLM does not pass it to start_load_kv.
    num_step_tokens: int = 0


@dataclass
class KVStoreConnectorStats(KVConnectorStats):  # type: ignore[misc]
    """The worker side's measured rates (`fetch_bytes_per_s`, one per tier under
    TIER_RATE_PREFIX, `prefill_tokens_per_s`), as vLLM carries connector stats from each
    worker to the scheduler process: `get_kv_connector_stats` on the worker, merged over
    the ranks by `aggregate`, then `KVConnectorOutput.kv_connector_stats` in the
    scheduler side's `update_connector_output`.

    The rates are moving measures, not counts of an interval, so `aggregate` keeps each
    one's minimum: a load finishes when the slowest rank has its blocks, and a step's
    prefill when the slowest rank has computed it.
    """

    data: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: Any) -> KVStoreConnectorStats:
        merged = dict(self.data)
        for name, value in (getattr(other, "data", None) or {}).items():
            if isinstance(value, int | float) and value > 0:
                mine = merged.get(name)
                merged[name] = value if not isinstance(mine, int | float) else min(mine, value)
        return KVStoreConnectorStats(data=merged)

    def reduce(self) -> dict[str, int | float]:
        return {name: value for name, value in self.data.items() if isinstance(value, int | float)}

    def is_empty(self) -> bool:
        return not self.data
