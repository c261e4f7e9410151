"""Core values → wire messages, for the client side."""

from __future__ import annotations

from kvstore.layout import Namespace
from kvstore.v1 import kvstore_pb2 as pb


def namespace_to_wire(namespace: Namespace) -> pb.Namespace:
    layout = namespace.layout
    return pb.Namespace(
        tenant=namespace.tenant,
        model_fingerprint=namespace.model_fingerprint,
        layout=pb.KVLayout(
            num_layers=layout.num_layers,
            num_kv_heads=layout.num_kv_heads,
            head_dim=layout.head_dim,
            dtype=layout.dtype.value,  # type: ignore[arg-type]
            block_tokens=layout.block_tokens,
        ),
        tp_rank=namespace.tp_rank,
        tp_size=namespace.tp_size,
    )
