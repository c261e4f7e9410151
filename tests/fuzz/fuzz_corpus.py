"""The fuzzer's universe and its valid (or deliberately hostile) requests.

Requests start valid, naming the fuzz namespace and its victim chain, so that after
mutation they still reach deep into the server; a share carry hostile sizes built on
purpose (limits, boundaries of every integer type, unknown enum values). The seeded
namespace is never named here: its blocks must come through untouched.
"""

from __future__ import annotations

import random

from kvstore.checksum import ChecksumKind, checksum
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import MIN_CHUNK_BYTES, varint
from kvstore.wire.namespace import namespace_to_wire

# A tiny layout: 16-byte layers, so a get with max_chunk_bytes=1 stays cheap.
FUZZ_LAYOUT = KVLayout(
    num_layers=2, num_kv_heads=1, head_dim=2, dtype=DType.FLOAT16, block_tokens=2
)
# Layers of 16 KiB: chunks split them, and several fill a message.
WIDE_LAYOUT = KVLayout(
    num_layers=2, num_kv_heads=4, head_dim=64, dtype=DType.FLOAT16, block_tokens=16
)
FUZZ_NS = Namespace(tenant="fuzz", model_fingerprint="toy", layout=FUZZ_LAYOUT)
WIDE_NS = Namespace(tenant="fuzz", model_fingerprint="wide", layout=WIDE_LAYOUT)
# Stored in FUZZ_NS before every batch, for lookups, gets, pins and deletes to hit.
VICTIM_KEYS = [b"victim-%d" % index for index in range(4)]

# The fuzz server's limits (see conftest.py), which the hostile sizes aim at.
MAX_KEYS = 64
MAX_MESSAGE_BYTES = 64 << 10
MAX_NAMESPACES = 8
# Short, so that a stalled put or get is cut quickly; a case that is not cut short
# waits on nothing near as long.
STREAM_IDLE_TIMEOUT_S = 0.5
FRAME_TIMEOUT_S = 0.5
MAX_TRANSFER_S = 5.0
# The least layer data in a get message whatever max_chunk_bytes asks for: the server's
# floor (kvstore.wire.chunks.MIN_CHUNK_BYTES), or less where its message limit is less.
GET_FLOOR_BYTES = min(MIN_CHUNK_BYTES, MAX_MESSAGE_BYTES - 4096)

U32_EDGES = (0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1)
HOSTILE_NAMES = ("", "t" * 256, "t" * 257, "é" * 256, "😀" * 257, "\x00", " ")
CHECKSUM_KINDS = (0, ChecksumKind.XXH3_64.value, ChecksumKind.CRC32C.value)


def fuzz_namespace_bytes(namespace: Namespace = FUZZ_NS) -> bytes:
    return namespace_to_wire(namespace).SerializeToString()


def _hostile_layout(rng: random.Random) -> pb.KVLayout:
    layout = namespace_to_wire(FUZZ_NS).layout
    name = rng.choice(("num_layers", "num_kv_heads", "head_dim", "block_tokens", "dtype"))
    edges = {
        "num_layers": (1024, 1025),
        "num_kv_heads": (1024, 1025),
        "head_dim": (4096, 4097),
        "block_tokens": (65536, 65537),
    }.get(name)
    if edges is None:  # an enum: int32 on the wire, negative ones as 10-byte varints
        layout.dtype = rng.choice((0, 7, 8, 99, 2**31 - 1, -1))  # type: ignore[assignment]
    else:
        setattr(layout, name, rng.choice(U32_EDGES + edges))
    if rng.random() < 0.2:  # a block larger than any DRAM: every field at its maximum
        layout.num_layers, layout.num_kv_heads, layout.head_dim = 1024, 1024, 4096
        layout.block_tokens = 65536
    return layout


def wire_namespace(rng: random.Random) -> pb.Namespace:
    """Mostly the fuzz namespace; else a fresh tenant, or a hostile one."""
    roll = rng.random()
    namespace = namespace_to_wire(FUZZ_NS if roll < 0.6 else WIDE_NS if roll < 0.7 else FUZZ_NS)
    if roll < 0.7:
        return namespace
    if roll < 0.8:
        namespace.tenant = f"fresh-{rng.randrange(10**6)}"
    elif roll < 0.85:
        namespace.tenant = rng.choice(HOSTILE_NAMES)
    elif roll < 0.9:
        namespace.model_fingerprint = rng.choice(HOSTILE_NAMES)
    elif roll < 0.95:
        namespace.tp_rank, namespace.tp_size = rng.choice(U32_EDGES), rng.choice(U32_EDGES)
    elif roll < 0.98:
        namespace.layout.CopyFrom(_hostile_layout(rng))
    else:
        namespace.ClearField("layout")
    return namespace


def random_key(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice((1, 2, 8, 16, 32, 63, 64)))


def wire_keys(rng: random.Random) -> list[bytes]:
    """Mostly a prefix of the victim chain; else random keys, or hostile counts and sizes."""
    roll = rng.random()
    if roll < 0.5:
        return VICTIM_KEYS[: rng.randint(1, len(VICTIM_KEYS))]
    if roll < 0.65:
        return VICTIM_KEYS[: rng.randint(0, 3)] + [
            random_key(rng) for _ in range(rng.randint(1, 3))
        ]
    if roll < 0.8:
        return [random_key(rng) for _ in range(rng.randint(1, 8))]
    return rng.choice(
        (
            [],
            [b""],
            [*VICTIM_KEYS[:2], b""],
            [b"k" * 64],
            [b"k" * 65],
            [b"\xff" * 4096],
            [rng.randbytes(64) for _ in range(MAX_KEYS)],
            [rng.randbytes(4) for _ in range(MAX_KEYS + 1)],
            VICTIM_KEYS * 16,  # duplicates, MAX_KEYS of them
        )
    )


def unary_request(rng: random.Random, rpc: str) -> bytes:
    """A request for `rpc` (not PutBlocks, not the health service), valid or hostile."""
    if rpc in ("Stats", "GetDataPlane"):
        return b""
    namespace, keys = wire_namespace(rng), wire_keys(rng)
    if rpc == "LookupPrefix":
        return pb.LookupPrefixRequest(namespace=namespace, keys=keys).SerializeToString()
    if rpc == "GetBlocks":
        return get_request(rng, namespace, keys)
    if rpc == "Pin":
        ttl_ms = rng.choice((0, 1, 100, 60_000, 2**32 - 1))
        return pb.PinRequest(namespace=namespace, keys=keys, ttl_ms=ttl_ms).SerializeToString()
    if rpc == "Unpin":
        return pb.UnpinRequest(namespace=namespace, keys=keys).SerializeToString()
    assert rpc == "Delete", rpc
    return pb.DeleteRequest(namespace=namespace, keys=keys).SerializeToString()


def get_request(
    rng: random.Random, namespace: pb.Namespace | None = None, keys: list[bytes] | None = None
) -> bytes:
    """A GetBlocksRequest; max_chunk_bytes is often 0, 1, 2 or 2**32 - 1."""
    max_chunk_bytes = rng.choice((0, 0, 1, 2, 3, 15, 16, 17, 4096, 1 << 20, 2**31, 2**32 - 1))
    return pb.GetBlocksRequest(
        namespace=namespace if namespace is not None else wire_namespace(rng),
        keys=keys if keys is not None else wire_keys(rng),
        max_chunk_bytes=max_chunk_bytes,
    ).SerializeToString()


def health_request(rng: random.Random) -> bytes:
    """A well-formed HealthCheckRequest, for the fuzz to mutate."""
    service = rng.choice(("", "kvstore.v1.KVStore", "nope", "kvstore.v1.KVStor", "s" * 10_000))
    body = b"\x0a" + varint(len(service.encode())) + service.encode() if service else b""
    if rng.random() < 0.3:  # an unknown field: protobuf skips it, as the health service does
        body += b"\x98\x06\x01"
    return body


def layer_data(rng: random.Random, layout: KVLayout) -> bytes:
    return rng.randbytes(layout.layer_bytes)


def layer_checksum(kind_value: int, data: bytes) -> int:
    return checksum(ChecksumKind(kind_value or ChecksumKind.XXH3_64.value), data)
