"""Write the language-neutral test vectors in this folder from kvstore's own code.

Run from anywhere: `python tests/vectors/generate.py`. The vectors are the reference
for other implementations (docs/protocol.md); tests/wire/test_vectors.py checks that
kvstore still reproduces every one, and that each also follows from the documented
formula computed without kvstore. Regenerate only when the protocol changes on purpose.

Every 64-bit value is written as a hex string: JSON numbers lose precision past 2**53
in many languages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvstore.checksum import ChecksumKind, checksum
from kvstore.codec import ByteMap, KVForm
from kvstore.keys import HashAlgorithm, chain_keys
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import (
    GET_RUNS,
    PUT_RUNS,
    encode_get_header,
    encode_put_header,
    run_parts,
    tailed_run_message,
)
from kvstore.wire.frames import (
    HELLO_PAYLOAD,
    TAIL_PREFIX,
    FrameKind,
    encode_deadline,
    encode_error,
    frame_header,
)
from kvstore.wire.namespace import namespace_to_wire

HERE = Path(__file__).resolve().parent
SALT = b"tenant-salt"
# value(layer, kv, token, head, dim) = sum of coefficient * index; small integers are
# exact in every float type used here, so the bytes do not depend on rounding.
VALUE_RULE = {"layer": 256, "kv": 128, "token": 16, "head": 4, "dim": 1}


def u64_hex(value: int) -> str:
    return f"{value:016x}"


def key_cases() -> list[dict[str, Any]]:
    inputs: list[tuple[list[int], int, bytes]] = [
        (list(range(32)), 16, b""),
        (list(range(32)), 16, SALT),
        # Large ids show the little-endian u32 encoding; the trailing 2 tokens are a
        # partial block and get no key.
        ([0, 1, 0x01020304, 0xFFFFFFFF, 7, 65536, 2**31, 42, 9, 10], 4, b""),
    ]
    cases = []
    for algorithm in HashAlgorithm:
        for tokens, block_tokens, extra in inputs:
            keys = chain_keys(tokens, block_tokens, extra=extra, algorithm=algorithm)
            cases.append(
                {
                    "algorithm": algorithm.value,
                    "block_tokens": block_tokens,
                    "tokens": tokens,
                    "extra_hex": extra.hex(),
                    "keys_hex": [key.hex() for key in keys],
                }
            )
    return cases


def checksum_cases() -> list[dict[str, Any]]:
    inputs = [
        ("empty", b""),
        ("ascii 123456789 (the CRC catalogue's check input)", b"123456789"),
        ("bytes 0x00..0xff", bytes(range(256))),
        ("1000 bytes, byte i = (i * 7 + 3) mod 256", bytes((i * 7 + 3) % 256 for i in range(1000))),
    ]
    cases = []
    for name, data in inputs:
        case: dict[str, Any] = {"name": name, "data_hex": data.hex()}
        for kind in ChecksumKind:
            value = checksum(kind, data)
            case[kind.name.lower()] = {
                "value_hex": u64_hex(value),
                "fixed64_wire_hex": value.to_bytes(8, "little").hex(),
            }
        cases.append(case)
    return cases


def sequence_tensor(layout: KVLayout, num_blocks: int) -> torch.Tensor:
    """The `sequence` form [num_layers, 2, tokens, heads, dims] filled by VALUE_RULE."""
    shape = (layout.num_layers, 2, num_blocks * layout.block_tokens)
    shape += (layout.num_kv_heads, layout.head_dim)
    grids = torch.meshgrid(*(torch.arange(size) for size in shape), indexing="ij")
    values = sum(
        coefficient * grid for coefficient, grid in zip(VALUE_RULE.values(), grids, strict=True)
    )
    assert isinstance(values, torch.Tensor)
    return values.to(layout.dtype.torch_dtype).contiguous()


def layout_fields(layout: KVLayout) -> dict[str, Any]:
    return {
        "num_layers": layout.num_layers,
        "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "dtype": layout.dtype.name,
        "block_tokens": layout.block_tokens,
    }


def block_case(layout: KVLayout, num_blocks: int) -> dict[str, Any]:
    source = ByteMap(sequence_tensor(layout, num_blocks), layout, KVForm.SEQUENCE)
    blocks = []
    for block in range(num_blocks):
        layers = []
        for layer in range(layout.num_layers):
            data = b"".join(bytes(part) for part in source.layer_parts(block, layer))
            layers.append(
                {
                    "layer": layer,
                    "bytes_hex": data.hex(),
                    "xxh3_64_hex": u64_hex(checksum(ChecksumKind.XXH3_64, data)),
                    "crc32c_hex": u64_hex(checksum(ChecksumKind.CRC32C, data)),
                }
            )
        blocks.append({"block": block, "layers": layers})
    return {
        "layout": layout_fields(layout),
        "itemsize": layout.dtype.itemsize,
        "layer_bytes": layout.layer_bytes,
        "block_bytes": layout.block_bytes,
        "num_blocks": num_blocks,
        "blocks": blocks,
    }


def tiny_layout(dtype: DType) -> KVLayout:
    return KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype=dtype, block_tokens=2)


def put_tail_frame() -> dict[str, Any]:
    """A PUT_TAIL frame: the prefix length, then a put message whose last field is a
    LayerRun, the run's data last (the frame's tail)."""
    data = bytes(range(16))
    head = encode_put_header(checksum_kind=1, blocks=[(b"k0", b"")])
    run = run_parts(PUT_RUNS, 0, 0, [0x0123456789ABCDEF], [data])
    message = b"".join(bytes(part) for part in tailed_run_message([head], run))
    before_tail = len(message) - len(data)
    payload = TAIL_PREFIX.pack(before_tail) + message
    return {
        "name": "PUT_TAIL of a one-block, one-run put message with a 16-byte tail",
        "kind": FrameKind.PUT_TAIL.name,
        "kind_number": int(FrameKind.PUT_TAIL),
        "before_tail": before_tail,
        "tail_hex": data.hex(),
        "payload_hex": payload.hex(),
        "frame_hex": (frame_header(FrameKind.PUT_TAIL, len(payload)) + payload).hex(),
    }


def frame_cases() -> list[dict[str, Any]]:
    def frame(name: str, kind: FrameKind, payload: bytes, **inputs: Any) -> dict[str, Any]:
        return {
            "name": name,
            "kind": kind.name,
            "kind_number": int(kind),
            **inputs,
            "payload_hex": payload.hex(),
            "frame_hex": (frame_header(kind, len(payload)) + payload).hex(),
        }

    reply = pb.PutBlocksResponse(outcomes=[1, 2, 3], num_committed=1).SerializeToString()
    cases = [
        frame("HELLO, either direction", FrameKind.HELLO, HELLO_PAYLOAD, version=4),
        frame("DEADLINE of 1.5 s", FrameKind.DEADLINE, encode_deadline(1.5), seconds=1.5),
        frame("DEADLINE of 120 s", FrameKind.DEADLINE, encode_deadline(120.0), seconds=120.0),
        frame("DEADLINE under 1 ms", FrameKind.DEADLINE, encode_deadline(0.0001), seconds=0.0001),
        frame("DEADLINE past u32 ms", FrameKind.DEADLINE, encode_deadline(5e6), seconds=5e6),
        frame(
            "ERROR INVALID_ARGUMENT with a UTF-8 message",
            FrameKind.ERROR,
            encode_error(3, "keys[0] is empty — keys are 1 to 64 bytes"),
            code=3,
            message="keys[0] is empty — keys are 1 to 64 bytes",
        ),
        frame("PUT_END", FrameKind.PUT_END, b""),
        frame(
            "PUT_DONE: outcomes COMMITTED, ALREADY_PRESENT, PARENT_MISSING; 1 committed",
            FrameKind.PUT_DONE,
            reply,
        ),
        frame("GET_END", FrameKind.GET_END, b""),
        put_tail_frame(),
    ]
    for kind, length in ((FrameKind.PUT, 1048700), (FrameKind.GET_DATA, 65536)):
        cases.append(
            {
                "name": f"{kind.name} header of a {length}-byte payload",
                "kind": kind.name,
                "kind_number": int(kind),
                "payload_length": length,
                "header_hex": frame_header(kind, length).hex(),
            }
        )
    return cases


def message_cases() -> dict[str, Any]:
    """A whole first PutBlocksRequest and GetBlocksResponse carrying block.json's fp16
    blocks as one LayerRun of layer 0, as kvstore's codec lays them out."""
    layout = tiny_layout(DType.FLOAT16)
    namespace = Namespace(tenant="acme", model_fingerprint="tiny@1", layout=layout)
    # The keys of tokens 0..3 under xxh3-128, as keys.json's formula gives them.
    keys = chain_keys(list(range(4)), layout.block_tokens, algorithm=HashAlgorithm.XXH3_128)
    source = ByteMap(sequence_tensor(layout, 2), layout, KVForm.SEQUENCE)
    layer0 = [b"".join(bytes(p) for p in source.layer_parts(block, 0)) for block in range(2)]
    checksums = [checksum(ChecksumKind.CRC32C, data) for data in layer0]
    namespace_bytes = namespace_to_wire(namespace).SerializeToString()
    put = encode_put_header(
        namespace=namespace_bytes,
        checksum_kind=ChecksumKind.CRC32C.value,
        blocks=[(keys[0], b""), (keys[1], keys[0])],
    )
    put += b"".join(bytes(part) for part in run_parts(PUT_RUNS, 0, 0, checksums, layer0))
    get = encode_get_header(
        checksum_kind=ChecksumKind.CRC32C.value,
        block_bytes=layout.block_bytes,
        num_blocks=2,
        tiers=[2, 2],
    )
    get += b"".join(bytes(part) for part in run_parts(GET_RUNS, 0, 0, checksums, layer0))
    fields = {
        "namespace": {
            "tenant": namespace.tenant,
            "model_fingerprint": namespace.model_fingerprint,
            "layout": layout_fields(layout),
            "tp_rank": namespace.tp_rank,
            "tp_size": namespace.tp_size,
        },
        "checksum_kind": ChecksumKind.CRC32C.name,
        "keys_hex": [key.hex() for key in keys],
        "parent_keys_hex": ["", keys[0].hex()],
        "run": {"layer": 0, "first_block": 0, "num_blocks": 2},
        "layer0_checksums_hex": [u64_hex(value) for value in checksums],
        "get_tiers": ["DRAM", "DRAM"],
    }
    return {
        "description": (
            "Hand-encoded messages as kvstore sends them: fields need not be in field-number "
            "order and scalar fields at their default are omitted; any protobuf decoder "
            "reads them. The data are block.json's FLOAT16 case, layer 0 of blocks 0 and 1."
        ),
        "inputs": fields,
        "put_first_message_hex": put.hex(),
        "namespace_hex": namespace_bytes.hex(),
        "get_first_message_hex": get.hex(),
    }


def vectors() -> dict[str, dict[str, Any]]:
    """Each vector file's name and content."""
    return {
        "keys.json": {
            "description": (
                "Chained block keys (docs/protocol.md, Block keys): key_0 = H(root || extra "
                "|| tokens_0), key_i = H(key_{i-1} || tokens_i); tokens as little-endian "
                "u32; root = digest-size zero bytes; xxh3_128 digests are big-endian."
            ),
            "cases": key_cases(),
        },
        "checksums.json": {
            "description": (
                "Layer checksums (docs/protocol.md, Checksums): xxh3_64 with seed 0, and "
                "CRC32C (Castagnoli). value_hex is the u64 in the fixed64 field (a CRC32C "
                "in its low 32 bits); fixed64_wire_hex is its 8 bytes on the wire."
            ),
            "cases": checksum_cases(),
        },
        "block.json": {
            "description": (
                "Layer bytes of tiny blocks (docs/protocol.md, Block layout). Element "
                "value(layer, kv, token, head, dim) = sum of value_rule[i] * index, where "
                "kv is 0 for K and 1 for V and token counts from the sequence's start; "
                "elements are little-endian in [kv][token][head][dim] order."
            ),
            "value_rule": VALUE_RULE,
            "cases": [
                block_case(tiny_layout(DType.FLOAT16), 2),
                block_case(tiny_layout(DType.FLOAT32), 1),
            ],
        },
        "frames.json": {
            "description": (
                "Data-plane frames (docs/protocol.md, The data plane): kind (u8), payload "
                "length (u32 little-endian), payload."
            ),
            "cases": frame_cases(),
        },
        "messages.json": message_cases(),
    }


def render(content: dict[str, Any]) -> str:
    return json.dumps(content, indent=1, ensure_ascii=False) + "\n"


def main() -> None:
    for name, content in vectors().items():
        (HERE / name).write_text(render(content))


if __name__ == "__main__":
    main()
