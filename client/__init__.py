"""kvstore.client: the library prefill and decode workers embed.

    from kvstore.client import KVClient, Namespace, KVLayout, DType

    async with KVClient("127.0.0.1:50051", namespace) as client:
        match = await client.lookup(token_ids)
        await client.get_into(match, kv)        # kv: [layers, 2, tokens, kv_heads, head_dim]
        await client.put(token_ids, kv)

`SyncKVClient` offers the same calls, blocking.
"""

from kvstore.checksum import ChecksumKind
from kvstore.client._async import KVClient, LayerPut
from kvstore.client._credentials import TOKEN_ENV
from kvstore.client._errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    ChecksumError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    KVStoreClientError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from kvstore.client._options import ClientOptions, Timeouts, TLSOptions
from kvstore.client._results import (
    LayerArrival,
    PrefixMatch,
    PutResult,
    StoreStats,
    TenantStats,
    TenantTierStats,
    TierStats,
)
from kvstore.client._sync import SyncKVClient, SyncLayerPut
from kvstore.client._watch import BlockEvents, BlockView, WatchedBlock
from kvstore.client.cost import (
    BandwidthMeter,
    FetchPlan,
    PrefillModel,
    break_even_bandwidth,
    plan_fetch,
)
from kvstore.cluster.etcd_options import EtcdOptions
from kvstore.codec import KVForm
from kvstore.enums import Durability, PutOutcome, TierKind
from kvstore.events import BlockEvent, BlockEventKind
from kvstore.keys import HashAlgorithm
from kvstore.layout import DType, KVLayout, Namespace

__all__ = [
    "TOKEN_ENV",
    "Aborted",
    "AlreadyExists",
    "BandwidthMeter",
    "BlockEvent",
    "BlockEventKind",
    "BlockEvents",
    "BlockView",
    "Cancelled",
    "ChecksumError",
    "ChecksumKind",
    "ClientOptions",
    "DType",
    "DataLoss",
    "DeadlineExceeded",
    "Durability",
    "EtcdOptions",
    "FailedPrecondition",
    "FetchPlan",
    "HashAlgorithm",
    "Internal",
    "InvalidArgument",
    "KVClient",
    "KVForm",
    "KVLayout",
    "KVStoreClientError",
    "LayerArrival",
    "LayerPut",
    "Namespace",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PrefillModel",
    "PrefixMatch",
    "ProtocolError",
    "PutOutcome",
    "PutResult",
    "ResourceExhausted",
    "StoreStats",
    "SyncKVClient",
    "SyncLayerPut",
    "TLSOptions",
    "TenantStats",
    "TenantTierStats",
    "TierKind",
    "TierStats",
    "Timeouts",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "WatchedBlock",
    "break_even_bandwidth",
    "plan_fetch",
]
