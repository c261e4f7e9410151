"""Namespace and KVLayout to and from their kvstore.v1 messages.

Decoding is strict, as for every request: unknown fields, a missing layout or an
unknown dtype raise WireError. The layout's own rules (positive sizes, tp_rank below
tp_size) are the core's, checked when KVLayout and Namespace are built.
"""

from __future__ import annotations

from google.protobuf import unknown_fields
from google.protobuf.message import Message

from kvstore.layout import DType, KVLayout, Namespace
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.enums import dtype_to_wire
from kvstore.wire.errors import WireError


def reject_unknown_fields(message: Message, where: str) -> None:
    """WireError for fields this server does not know (a newer or foreign client)."""
    unknown = unknown_fields.UnknownFieldSet(message)
    if len(unknown):
        numbers = sorted({unknown[index].field_number for index in range(len(unknown))})
        raise WireError(
            f"{where} has unknown field number(s) {numbers}; this server speaks kvstore.v1 as "
            f"of its proto file; upgrade the server or drop the field(s)"
        )


def namespace_to_wire(namespace: Namespace) -> pb.Namespace:
    layout = namespace.layout
    return pb.Namespace(
        tenant=namespace.tenant,
        model_fingerprint=namespace.model_fingerprint,
        layout=pb.KVLayout(
            num_layers=layout.num_layers,
            num_kv_heads=layout.num_kv_heads,
            head_dim=layout.head_dim,
            dtype=dtype_to_wire(layout.dtype),
            block_tokens=layout.block_tokens,
        ),
        tp_rank=namespace.tp_rank,
        tp_size=namespace.tp_size,
    )


def namespace_from_wire(message: pb.Namespace, present: bool) -> Namespace:
    """The request's namespace; `present` is whether the request set the field at all."""
    if not present:
        raise WireError("namespace is required: tenant, model_fingerprint and layout")
    reject_unknown_fields(message, "namespace")
    if not message.HasField("layout"):
        raise WireError("namespace.layout is required")
    layout_message = message.layout
    reject_unknown_fields(layout_message, "namespace.layout")
    if layout_message.dtype == pb.DTYPE_UNSPECIFIED:
        raise WireError("namespace.layout.dtype is required (FLOAT16, BFLOAT16, ...)")
    try:
        dtype = DType(layout_message.dtype)
    except ValueError:
        raise WireError(f"unknown namespace.layout.dtype {layout_message.dtype}") from None
    layout = KVLayout(
        num_layers=layout_message.num_layers,
        num_kv_heads=layout_message.num_kv_heads,
        head_dim=layout_message.head_dim,
        dtype=dtype,
        block_tokens=layout_message.block_tokens,
    )
    return Namespace(
        tenant=message.tenant,
        model_fingerprint=message.model_fingerprint,
        layout=layout,
        tp_rank=message.tp_rank,
        tp_size=message.tp_size or 1,
    )
