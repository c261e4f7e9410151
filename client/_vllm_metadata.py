"""What the scheduler-side connector hands the worker-side connector each step.

vLLM pickles it to every worker, so it holds only plain data: keys, block ids, ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.client._vllm_types import KVConnectorMetadata

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
    layer by layer as this step's forward pass writes them."""

    request_id: str
    keys: list[bytes]
    block_ids: list[int]
    parent_key: bytes


@dataclass(frozen=True)
class KVStoreConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    # Requests preempted since the last step: their blocks are freed and may be rewritten,
    # so their saves in flight are cancelled before the forward pass.
    preempted_req_ids: frozenset[str] = frozenset()
