"""The on-disk format of one block, written so that a torn or corrupt file is detected.

    offset 0   magic  b"KVSBLK01"
           8   u32    header length H
          12   header (JSON, UTF-8): namespace, key, parent_key, checksum kind,
                       per-layer checksums, chain_root, and, only when some layer is
                       compressed, per-layer encodings, stored sizes and stored checksums
        12+H   u64    xxh3-64 of the header bytes
        20+H   payload: the stored layers, layer-major: num_layers * layer_bytes bytes
                        when no layer is compressed

A file is written under a temporary name and renamed into place only once complete, so
a crash leaves either no file or a whole one; the header checksum, the exact file size
and the per-layer payload checksums catch anything else (a torn page, bit rot). Restart
checks the first two (a small read per file); every read of the block checks all three.

Compressed layers (kvstore.layer_codec) carry an xxh3-64 of their stored bytes, checked
before they are decoded; the layer checksum, over the original bytes, is checked after.
Files without the optional keys are all raw: files written before compression existed
read as they always did, and so does every file of a tier with compression off.
`chain_root` (the block was put as a chain's first block, not under a parent here or
on another node) is optional too: a file without it, written before it existed, reads
as not a chain root, which is how such blocks were treated then.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import xxhash

from kvstore.checksum import ChecksumKind, checksum
from kvstore.errors import InvalidRequest
from kvstore.layer_codec import LayerCodec, LayerEncoding, decode_layer
from kvstore.layout import DType, KVLayout, Namespace

MAGIC = b"KVSBLK01"
_PREFIX = struct.Struct("<8sI")
_FIXED64 = struct.Struct("<Q")


# A header is JSON of a namespace, two keys and a few numbers per layer: kilobytes.
MAX_HEADER_BYTES = 1 << 20
_LZ4_MAX_RATIO = 255


class CorruptBlockFile(Exception):
    """The file is not a complete, intact block."""


@dataclass(frozen=True, slots=True)
class BlockFileHeader:
    namespace: Namespace
    key: bytes
    parent_key: bytes
    checksum_kind: ChecksumKind
    layer_checksums: tuple[int, ...]
    chain_root: bool = False  # see kvstore.index.BlockEntry.chain_root
    # Empty: every layer raw. Otherwise one each per layer; a raw layer's stored
    # checksum is 0 (its layer checksum covers its stored bytes).
    layer_encodings: tuple[LayerEncoding, ...] = ()
    layer_stored_bytes: tuple[int, ...] = ()
    stored_checksums: tuple[int, ...] = ()

    @property
    def payload_bytes(self) -> int:
        """The payload's bytes in the file: less than the block's when layers compress."""
        if self.layer_stored_bytes:
            return sum(self.layer_stored_bytes)
        return _block_bytes(self.namespace.layout)

    @property
    def compressed(self) -> bool:
        return bool(self.layer_encodings)


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
            "chain_root": header.chain_root,
            **_encoding_fields(header),
        },
        sort_keys=True,
    ).encode()
    return _PREFIX.pack(MAGIC, len(body)) + body + _FIXED64.pack(xxhash.xxh3_64_intdigest(body))


def _encoding_fields(header: BlockFileHeader) -> dict[str, object]:
    if not header.layer_encodings:
        return {}
    return {
        "layer_encodings": [encoding.value for encoding in header.layer_encodings],
        "layer_stored_bytes": list(header.layer_stored_bytes),
        "stored_checksums": list(header.stored_checksums),
    }


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"a flag must be true or false, got {value!r}")
    return value


def header_bytes(prefix: bytes) -> int:
    """How many bytes the header takes (payload offset), from at least its first 12 bytes."""
    if len(prefix) < _PREFIX.size:
        raise CorruptBlockFile("shorter than the block file prefix")
    magic, length = _PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise CorruptBlockFile("bad magic")
    if length > MAX_HEADER_BYTES:
        raise CorruptBlockFile(
            f"a {length}-byte header; a block file's is under {MAX_HEADER_BYTES}"
        )
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
            chain_root=_flag(data.get("chain_root", False)),
            layer_encodings=tuple(
                LayerEncoding(value) for value in data.get("layer_encodings", ())
            ),
            layer_stored_bytes=tuple(int(value) for value in data.get("layer_stored_bytes", ())),
            stored_checksums=tuple(int(value) for value in data.get("stored_checksums", ())),
        )
    # OverflowError: an Infinity where a number belongs; RecursionError: nesting deeper
    # than the parser goes. A hostile file must not stop recovery.
    except (
        KeyError,
        ValueError,
        TypeError,
        AssertionError,
        InvalidRequest,
        OverflowError,
        RecursionError,
    ) as error:
        raise CorruptBlockFile(f"unreadable header: {error}") from error
    num_layers = namespace.layout.num_layers
    if len(header.layer_checksums) != num_layers:
        raise CorruptBlockFile("layer checksum count does not match the layout")
    if header.layer_encodings and not (
        len(header.layer_encodings)
        == len(header.layer_stored_bytes)
        == len(header.stored_checksums)
        == num_layers
    ):
        raise CorruptBlockFile("layer encoding counts do not match the layout")
    if any(nbytes < 0 for nbytes in header.layer_stored_bytes):
        raise CorruptBlockFile("a negative stored layer size")
    layer_bytes = namespace.layout.layer_bytes
    for layer, (encoding, stored) in enumerate(
        zip(header.layer_encodings, header.layer_stored_bytes, strict=True)
    ):
        # Nothing is allocated for a layer before this: a file cannot declare more than
        # its stored bytes can decode to (lz4 expands at most about 255-fold).
        limit = layer_bytes if encoding is LayerEncoding.RAW else _LZ4_MAX_RATIO * stored + 64
        if layer_bytes > limit or (encoding is LayerEncoding.RAW and stored != layer_bytes):
            raise CorruptBlockFile(
                f"layer {layer} stores {stored} B ({encoding.value}) for {layer_bytes} B"
            )
    return header, end + _FIXED64.size


def stored_layer_bytes(header: BlockFileHeader, layer: int) -> int:
    """The bytes layer `layer` takes in the file's payload."""
    if header.layer_stored_bytes:
        return header.layer_stored_bytes[layer]
    return header.namespace.layout.layer_bytes


def decode_layer_checked(
    header: BlockFileHeader,
    layer: int,
    stored: bytes | memoryview | None,
    out: memoryview,
) -> None:
    """Layer `layer`'s verified bytes from its stored bytes, into `out` (layer_bytes long);
    raises CorruptBlockFile. `stored` None: `out` holds them already (a raw layer read in
    place). A compressed layer's stored checksum is checked before it is decoded, and
    every layer's checksum after: no byte of `out` may be used before this returns."""
    encoding = header.layer_encodings[layer] if header.compressed else LayerEncoding.RAW
    if stored is not None:
        if encoding is not LayerEncoding.RAW and (
            xxhash.xxh3_64_intdigest(stored) != header.stored_checksums[layer]
        ):
            raise CorruptBlockFile(f"layer {layer} stored checksum mismatch")
        try:
            decode_layer(encoding, stored, header.namespace.layout.dtype.itemsize, out)
        except ValueError as error:
            raise CorruptBlockFile(f"layer {layer}: {error}") from error
    elif encoding is not LayerEncoding.RAW:
        raise ValueError("only a raw layer can be read in place")
    if checksum(header.checksum_kind, out) != header.layer_checksums[layer]:
        raise CorruptBlockFile(f"layer {layer} checksum mismatch")


def decode_payload(header: BlockFileHeader, stored: bytes | memoryview) -> bytes | bytearray:
    """The block's verified bytes from its stored payload; raises CorruptBlockFile.

    Each layer is checked as `decode_layer_checked` does; an all-raw payload is
    returned as it is."""
    layout = header.namespace.layout
    if len(stored) != header.payload_bytes:
        raise CorruptBlockFile(f"payload is {len(stored)} bytes, expected {header.payload_bytes}")
    if not header.compressed:
        out: bytes | bytearray = stored if isinstance(stored, bytes) else bytes(stored)
        in_place = True
    else:
        out = bytearray(layout.block_bytes)
        in_place = False
    source, target = memoryview(stored), memoryview(out)
    layer_bytes = layout.layer_bytes
    start = 0
    for layer in range(layout.num_layers):
        end = start + stored_layer_bytes(header, layer)
        decode_layer_checked(
            header,
            layer,
            None if in_place else source[start:end],
            target[layer * layer_bytes : (layer + 1) * layer_bytes],
        )
        start = end
    return out


def encode_payload(
    header: BlockFileHeader, payload: Sequence[bytes | memoryview], codec: LayerCodec
) -> tuple[BlockFileHeader, list[bytes | memoryview]]:
    """The header and stored layers of the block with each layer encoded by `codec`
    (kept raw where compression does not pay). With every layer raw, the header and
    payload come back as they were: the file is the same as one written uncompressed."""
    layout = header.namespace.layout
    layers = [codec.encode(layer) for layer in _layers(payload, layout.layer_bytes)]
    if all(layer.encoding is LayerEncoding.RAW for layer in layers):
        return header, list(payload)
    encoded_header = dataclasses.replace(
        header,
        layer_encodings=tuple(layer.encoding for layer in layers),
        layer_stored_bytes=tuple(len(layer.data) for layer in layers),
        stored_checksums=tuple(
            0 if layer.encoding is LayerEncoding.RAW else xxhash.xxh3_64_intdigest(layer.data)
            for layer in layers
        ),
    )
    return encoded_header, [layer.data for layer in layers]


def _layers(payload: Sequence[bytes | memoryview], layer_bytes: int) -> Iterator[memoryview]:
    """The payload cut into layers: views where a layer lies in one part, else a join."""
    pending: list[memoryview] = []
    pending_bytes = 0
    for part in payload:
        view = memoryview(part).cast("B")
        while view:
            take = min(len(view), layer_bytes - pending_bytes)
            piece, view = view[:take], view[take:]
            if not pending and take == layer_bytes:
                yield piece
                continue
            pending.append(piece)
            pending_bytes += take
            if pending_bytes == layer_bytes:
                yield memoryview(b"".join(pending))
                pending, pending_bytes = [], 0
    if pending:
        raise ValueError(f"payload ends inside a layer ({pending_bytes} of {layer_bytes} B)")
