"""The on-disk format of one block, written so that a torn or corrupt file is detected.

    offset 0   magic  b"KVSBLK01"
           8   u32    header length H
          12   header (JSON, UTF-8): namespace, key, parent_key, checksum kind,
                       per-layer checksums, layer_bytes, num_layers
        12+H   u64    xxh3-64 of the header bytes
        20+H   payload: num_layers * layer_bytes bytes, layer-major

A file is written under a temporary name and renamed into place only once complete, so
a crash leaves either no file or a whole one; the header checksum, the exact file size
and the per-layer payload checksums catch anything else (a torn page, bit rot). Restart
checks the first two (a small read per file); every read of the block checks all three.
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass

import xxhash

from kvstore.checksum import ChecksumKind, checksum
from kvstore.errors import InvalidRequest
from kvstore.layout import DType, KVLayout, Namespace

MAGIC = b"KVSBLK01"
_PREFIX = struct.Struct("<8sI")
_FIXED64 = struct.Struct("<Q")


class CorruptBlockFile(Exception):
    """The file is not a complete, intact block."""


@dataclass(frozen=True, slots=True)
class BlockFileHeader:
    namespace: Namespace
    key: bytes
    parent_key: bytes
    checksum_kind: ChecksumKind
    layer_checksums: tuple[int, ...]

    @property
    def payload_bytes(self) -> int:
        return _block_bytes(self.namespace.layout)


@functools.lru_cache(maxsize=1024)
def _block_bytes(layout: KVLayout) -> int:
    # A restart asks once per file; the layout computes it through torch's dtype sizes.
    return layout.block_bytes


def namespace_to_json(namespace: Namespace) -> dict[str, object]:
    layout = namespace.layout
    return {
        "tenant": namespace.tenant,
        "model_fingerprint": namespace.model_fingerprint,
        "tp_rank": namespace.tp_rank,
        "tp_size": namespace.tp_size,
        "layout": {
            "num_layers": layout.num_layers,
            "num_kv_heads": layout.num_kv_heads,
            "head_dim": layout.head_dim,
            "dtype": layout.dtype.name,
            "block_tokens": layout.block_tokens,
        },
    }


def namespace_from_json(data: dict[str, object]) -> Namespace:
    layout = data["layout"]
    assert isinstance(layout, dict)
    fields = tuple(data[name] for name in ("tenant", "model_fingerprint", "tp_rank", "tp_size"))
    return _namespace_from_fields(fields, tuple(layout.items()))


@functools.lru_cache(maxsize=1024)
def _namespace_from_fields(
    fields: tuple[object, ...], layout_items: tuple[tuple[str, object], ...]
) -> Namespace:
    # Files of one namespace share one Namespace: a restart parses thousands of headers.
    tenant, model_fingerprint, tp_rank, tp_size = fields
    layout = dict(layout_items)
    return Namespace(
        tenant=str(tenant),
        model_fingerprint=str(model_fingerprint),
        tp_rank=int(tp_rank),  # type: ignore[call-overload]
        tp_size=int(tp_size),  # type: ignore[call-overload]
        layout=KVLayout(
            num_layers=int(layout["num_layers"]),  # type: ignore[call-overload]
            num_kv_heads=int(layout["num_kv_heads"]),  # type: ignore[call-overload]
            head_dim=int(layout["head_dim"]),  # type: ignore[call-overload]
            dtype=DType[str(layout["dtype"])],
            block_tokens=int(layout["block_tokens"]),  # type: ignore[call-overload]
        ),
    )


def encode_header(header: BlockFileHeader) -> bytes:
    body = json.dumps(
        {
            "namespace": namespace_to_json(header.namespace),
            "key": header.key.hex(),
            "parent_key": header.parent_key.hex(),
            "checksum_kind": header.checksum_kind.name,
            "layer_checksums": list(header.layer_checksums),
        },
        sort_keys=True,
    ).encode()
    return _PREFIX.pack(MAGIC, len(body)) + body + _FIXED64.pack(xxhash.xxh3_64_intdigest(body))


def header_bytes(prefix: bytes) -> int:
    """How many bytes the header takes (payload offset), from at least its first 12 bytes."""
    if len(prefix) < _PREFIX.size:
        raise CorruptBlockFile("shorter than the block file prefix")
    magic, length = _PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise CorruptBlockFile("bad magic")
    return int(_PREFIX.size + length + _FIXED64.size)


def decode_header(prefix_and_body: bytes) -> tuple[BlockFileHeader, int]:
    """Parse a header from the start of a file; returns it and the payload's offset."""
    end = header_bytes(prefix_and_body) - _FIXED64.size
    if len(prefix_and_body) < end + _FIXED64.size:
        raise CorruptBlockFile("truncated header")
    body = prefix_and_body[_PREFIX.size : end]
    if _FIXED64.unpack_from(prefix_and_body, end)[0] != xxhash.xxh3_64_intdigest(body):
        raise CorruptBlockFile("header checksum mismatch")
    try:
        data = json.loads(body)
        namespace = namespace_from_json(data["namespace"])
        header = BlockFileHeader(
            namespace=namespace,
            key=bytes.fromhex(data["key"]),
            parent_key=bytes.fromhex(data["parent_key"]),
            checksum_kind=ChecksumKind[data["checksum_kind"]],
            layer_checksums=tuple(int(value) for value in data["layer_checksums"]),
        )
    except (KeyError, ValueError, TypeError, AssertionError, InvalidRequest) as error:
        raise CorruptBlockFile(f"unreadable header: {error}") from error
    if len(header.layer_checksums) != namespace.layout.num_layers:
        raise CorruptBlockFile("layer checksum count does not match the layout")
    return header, end + _FIXED64.size


def verify_payload(header: BlockFileHeader, payload: bytes | memoryview) -> None:
    layout = header.namespace.layout
    if len(payload) != layout.block_bytes:
        raise CorruptBlockFile(f"payload is {len(payload)} bytes, expected {layout.block_bytes}")
    view = memoryview(payload)
    for layer, expected in enumerate(header.layer_checksums):
        part = view[layer * layout.layer_bytes : (layer + 1) * layout.layer_bytes]
        if checksum(header.checksum_kind, part) != expected:
            raise CorruptBlockFile(f"layer {layer} checksum mismatch")
