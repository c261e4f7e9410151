"""The language-neutral vectors in tests/vectors/, checked two ways.

kvstore must reproduce every vector (its generator, run now, writes exactly the committed
files), and every vector must also follow from docs/protocol.md's formulas, computed
here with hashlib, xxhash, struct and the generated protobuf classes directly, so a
vector cannot merely echo the implementation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import xxhash

from kvstore.checksum import ChecksumKind, checksum, checksum_of_parts, new_hasher
from kvstore.codec import KVForm, block_layer_pieces
from kvstore.keys import HashAlgorithm, chain_keys
from kvstore.layout import DType, KVLayout
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import decode_get_message, decode_put_message
from kvstore.wire.frames import HEADER, HELLO_PAYLOAD, decode_deadline, decode_error

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
U32_MAX = 2**32 - 1

# docs/protocol.md's tables, written out again rather than read from kvstore.
FRAME_KINDS = {
    "HELLO": 1,
    "PUT": 2,
    "PUT_END": 3,
    "PUT_DONE": 4,
    "GET": 5,
    "GET_DATA": 6,
    "GET_END": 7,
    "ERROR": 8,
    "DEADLINE": 9,
    "PUT_TAIL": 18,
}
ITEMSIZES = {"FLOAT16": 2, "BFLOAT16": 2, "FLOAT32": 4, "UINT8": 1, "INT8": 1}
STRUCT_FORMATS = {"FLOAT16": "<e", "FLOAT32": "<f"}
CRC32C_POLYNOMIAL = 0x1EDC6F41
CRC32C_REFLECTED = 0x82F63B78


@cache
def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def cases(name: str) -> list[Any]:
    return list(load(name)["cases"])


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kvstore_vectors", VECTORS / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the documented formulas, without kvstore -------------------------------------------


def reference_keys(tokens: list[int], block_tokens: int, extra: bytes, algorithm: str) -> list[str]:
    def digest(data: bytes) -> bytes:
        if algorithm == "sha256":
            return hashlib.sha256(data).digest()
        # The 128-bit value, most significant byte first.
        return xxhash.xxh3_128_intdigest(data).to_bytes(16, "big")

    parent = bytes(32 if algorithm == "sha256" else 16) + extra
    keys = []
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        key = digest(
            parent + struct.pack(f"<{block_tokens}I", *tokens[start : start + block_tokens])
        )
        keys.append(key.hex())
        parent = key
    return keys


def reference_crc32c(data: bytes) -> int:
    """Bit by bit, from the parameters: reflected, init and xorout 0xFFFFFFFF."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (CRC32C_REFLECTED if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def reference_checksum(kind: str, data: bytes) -> int:
    if kind == "xxh3_64":
        return xxhash.xxh3_64_intdigest(data, seed=0)
    return reference_crc32c(data)


def reference_layer_bytes(
    case: dict[str, Any], rule: dict[str, int], block: int, layer: int
) -> bytes:
    layout = case["layout"]
    block_tokens = layout["block_tokens"]
    element = STRUCT_FORMATS[layout["dtype"]]
    out = b""
    for kv in range(2):  # K, then V
        for token in range(block * block_tokens, (block + 1) * block_tokens):
            for head in range(layout["num_kv_heads"]):
                for dim in range(layout["head_dim"]):
                    value = (
                        rule["layer"] * layer
                        + rule["kv"] * kv
                        + rule["token"] * token
                        + rule["head"] * head
                        + rule["dim"] * dim
                    )
                    out += struct.pack(element, value)
    return out


# -- kvstore reproduces the vectors -----------------------------------------------------


@pytest.mark.parametrize(
    "name", ["keys.json", "checksums.json", "block.json", "frames.json", "messages.json"]
)
def test_kvstore_reproduces_the_committed_vectors(name: str) -> None:
    generator = load_generator()
    assert sorted(generator.vectors()) == sorted(p.name for p in VECTORS.glob("*.json"))
    assert generator.render(generator.vectors()[name]) == (VECTORS / name).read_text(), (
        f"kvstore no longer produces tests/vectors/{name}: the protocol changed; if on purpose, "
        f"run `python tests/vectors/generate.py` and update docs/protocol.md"
    )


# -- keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    cases("keys.json"),
    ids=lambda c: f"{c['algorithm']}-{c['block_tokens']}-{c['extra_hex']}",
)
def test_keys_follow_the_formula(case: dict[str, Any]) -> None:
    extra = bytes.fromhex(case["extra_hex"])
    expected = case["keys_hex"]
    assert len(expected) == len(case["tokens"]) // case["block_tokens"]
    assert (
        reference_keys(case["tokens"], case["block_tokens"], extra, case["algorithm"]) == expected
    )
    keys = chain_keys(
        case["tokens"],
        case["block_tokens"],
        extra=extra,
        algorithm=HashAlgorithm(case["algorithm"]),
    )
    assert [key.hex() for key in keys] == expected


def test_keys_cover_both_hashes_with_and_without_extra() -> None:
    covered = {(c["algorithm"], bool(c["extra_hex"])) for c in cases("keys.json")}
    assert covered == {(a.value, e) for a in HashAlgorithm for e in (False, True)}


# -- checksums --------------------------------------------------------------------------


def test_crc32c_parameters() -> None:
    reflected = int(f"{CRC32C_POLYNOMIAL:032b}"[::-1], 2)
    assert reflected == CRC32C_REFLECTED
    # The CRC catalogue's check value for CRC-32C (iSCSI / Castagnoli).
    assert reference_crc32c(b"123456789") == 0xE3069283
    catalogue = next(c for c in cases("checksums.json") if c["data_hex"] == b"123456789".hex())
    assert catalogue["crc32c"]["value_hex"] == "00000000e3069283"


@pytest.mark.parametrize("case", cases("checksums.json"), ids=lambda c: c["name"])
@pytest.mark.parametrize("kind", list(ChecksumKind), ids=lambda k: k.name)
def test_checksums_follow_the_formula(case: dict[str, Any], kind: ChecksumKind) -> None:
    data = bytes.fromhex(case["data_hex"])
    vector = case[kind.name.lower()]
    value = int(vector["value_hex"], 16)
    assert reference_checksum(kind.name.lower(), data) == value
    if kind is ChecksumKind.CRC32C:
        assert value <= U32_MAX, "a CRC32C sits in the low 32 bits of the fixed64"
    wire = bytes.fromhex(vector["fixed64_wire_hex"])
    assert wire == struct.pack("<Q", value)
    chunk = pb.LayerChunk(layer_checksum=value).SerializeToString()
    assert chunk == (b"\x29" + wire if value else b"")  # field 5, wire type 1 (I64)
    assert checksum(kind, data) == value
    assert checksum_of_parts(kind, [data]) == value
    # Streamed over pieces (the chunks of one layer), as the server and client hash.
    pieces = [data[: len(data) // 3], data[len(data) // 3 : len(data) // 2], data[len(data) // 2 :]]
    assert checksum_of_parts(kind, pieces) == value
    hasher = new_hasher(kind)
    for piece in pieces:
        hasher.update(memoryview(piece))
    assert hasher.value() == value


# -- block layout ---------------------------------------------------------------------


def block_cases() -> list[dict[str, Any]]:
    return cases("block.json")


def case_layout(case: dict[str, Any]) -> KVLayout:
    fields = dict(case["layout"])
    return KVLayout(**{**fields, "dtype": DType[fields["dtype"]]})


def blocks_tensor(case: dict[str, Any]) -> torch.Tensor:
    """The case's blocks in the `blocks` form, [blocks, layers, 2, T, H, D], by the rule."""
    layout = case_layout(case)
    rule = load("block.json")["value_rule"]
    shape = (
        case["num_blocks"],
        layout.num_layers,
        2,
        layout.block_tokens,
        layout.num_kv_heads,
        layout.head_dim,
    )
    values = torch.zeros(shape, dtype=torch.float64)
    for block, layer, kv, token, head, dim in torch.cartesian_prod(
        *(torch.arange(n) for n in shape)
    ).tolist():
        values[block, layer, kv, token, head, dim] = (
            rule["layer"] * layer
            + rule["kv"] * kv
            + rule["token"] * (block * layout.block_tokens + token)
            + rule["head"] * head
            + rule["dim"] * dim
        )
    return values.to(layout.dtype.torch_dtype)


@pytest.mark.parametrize("case", block_cases(), ids=lambda c: c["layout"]["dtype"])
def test_layer_bytes_follow_the_formula(case: dict[str, Any]) -> None:
    fields = case["layout"]
    itemsize = ITEMSIZES[fields["dtype"]]
    layer_bytes = (
        2 * fields["block_tokens"] * fields["num_kv_heads"] * fields["head_dim"] * itemsize
    )
    assert case["itemsize"] == itemsize
    assert case["layer_bytes"] == layer_bytes
    assert case["block_bytes"] == layer_bytes * fields["num_layers"]
    layout = case_layout(case)
    assert (layout.dtype.itemsize, layout.layer_bytes, layout.block_bytes) == (
        itemsize,
        layer_bytes,
        layer_bytes * fields["num_layers"],
    )
    rule = load("block.json")["value_rule"]
    kv = blocks_tensor(case)
    for block in case["blocks"]:
        for layer in block["layers"]:
            data = bytes.fromhex(layer["bytes_hex"])
            assert len(data) == layer_bytes
            assert data == reference_layer_bytes(case, rule, block["block"], layer["layer"])
            pieces = block_layer_pieces(
                kv, KVForm.BLOCKS, block["block"], layer["layer"], layout.block_tokens
            )
            assert b"".join(piece.numpy().tobytes() for piece in pieces) == data
            for kind in ChecksumKind:
                expected = int(layer[f"{kind.name.lower()}_hex"], 16)
                assert reference_checksum(kind.name.lower(), data) == expected
                assert checksum(kind, data) == expected


def test_a_block_is_its_layers_in_order() -> None:
    """Layer l of a block occupies bytes [l * layer_bytes, (l + 1) * layer_bytes)."""
    case = block_cases()[0]
    layout = case_layout(case)
    kv = blocks_tensor(case)
    for block in case["blocks"]:
        whole = kv[block["block"]].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        assert len(whole) == layout.block_bytes
        assert whole == b"".join(bytes.fromhex(layer["bytes_hex"]) for layer in block["layers"])


# -- data-plane frames ----------------------------------------------------------------


@pytest.mark.parametrize("case", cases("frames.json"), ids=lambda c: c["name"])
def test_frames_follow_the_formula(case: dict[str, Any]) -> None:
    kind = case["kind_number"]
    assert FRAME_KINDS[case["kind"]] == kind
    if "header_hex" in case:
        header = bytes.fromhex(case["header_hex"])
        assert header == struct.pack("<BI", kind, case["payload_length"])
        assert HEADER.unpack(header) == (kind, case["payload_length"])
        return
    payload = bytes.fromhex(case["payload_hex"])
    assert bytes.fromhex(case["frame_hex"]) == struct.pack("<BI", kind, len(payload)) + payload
    if case["kind"] == "HELLO":
        assert payload == b"KVDP" + struct.pack("<H", case["version"])
        assert payload == HELLO_PAYLOAD
    elif case["kind"] == "DEADLINE":
        millis = min(max(1, round(case["seconds"] * 1000)), U32_MAX)
        assert payload == struct.pack("<I", millis)
        assert decode_deadline(payload) == millis / 1000
    elif case["kind"] == "ERROR":
        assert payload == struct.pack("<I", case["code"]) + case["message"].encode("utf-8")
        assert decode_error(payload) == (case["code"], case["message"])
    elif case["kind"] == "PUT_TAIL":
        (before_tail,) = struct.unpack_from("<I", payload)
        assert before_tail == case["before_tail"]
        message = payload[4:]
        request = pb.PutBlocksRequest.FromString(message)  # the whole message parses
        assert message[before_tail:] == request.runs[-1].data == bytes.fromhex(case["tail_hex"])
        decoded = decode_put_message(message[:before_tail], len(message) - before_tail)
        assert decoded.data_bytes(decoded.runs[-1]) == len(request.runs[-1].data)
        assert list(decoded.runs[-1].layer_checksums) == list(request.runs[-1].layer_checksums)
    elif case["kind"] == "PUT_DONE":
        reply = pb.PutBlocksResponse.FromString(payload)
        assert list(reply.outcomes) == [pb.COMMITTED, pb.ALREADY_PRESENT, pb.PARENT_MISSING]
        assert reply.num_committed == 1
    else:
        assert payload == b""


# -- whole messages ---------------------------------------------------------------------


def expected_run_data() -> bytes:
    block_case = block_cases()[0]
    return b"".join(
        bytes.fromhex(block["layers"][0]["bytes_hex"]) for block in block_case["blocks"]
    )


def test_the_put_message_parses_as_documented() -> None:
    vector = load("messages.json")
    inputs = vector["inputs"]
    data = expected_run_data()
    checksums = [reference_crc32c(data[:64]), reference_crc32c(data[64:])]
    assert [int(value, 16) for value in inputs["layer0_checksums_hex"]] == checksums
    assert inputs["keys_hex"] == reference_keys([0, 1, 2, 3], 2, b"", "xxh3_128")

    raw = bytes.fromhex(vector["put_first_message_hex"])
    request = pb.PutBlocksRequest.FromString(raw)
    namespace = inputs["namespace"]
    assert request.namespace.tenant == namespace["tenant"]
    assert request.namespace.model_fingerprint == namespace["model_fingerprint"]
    assert (request.namespace.tp_rank, request.namespace.tp_size) == (0, 1)
    layout = request.namespace.layout
    assert pb.DType.Name(layout.dtype) == namespace["layout"]["dtype"]
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_tokens) == (
        2,
        2,
        4,
        2,
    )
    assert request.namespace.SerializeToString() == bytes.fromhex(vector["namespace_hex"])
    assert request.checksum_kind == pb.CRC32C
    assert [(b.key.hex(), b.parent_key.hex()) for b in request.blocks] == list(
        zip(inputs["keys_hex"], inputs["parent_keys_hex"], strict=True)
    )
    assert not request.chunks
    (run,) = request.runs
    assert (run.layer, run.first_block, run.num_blocks) == (0, 0, 2)
    assert run.data == data
    assert list(run.layer_checksums) == checksums

    decoded = decode_put_message(raw)
    assert decoded.namespace == bytes.fromhex(vector["namespace_hex"])
    assert decoded.checksum_kind == ChecksumKind.CRC32C.value
    assert [(b.key.hex(), b.parent_key.hex()) for b in decoded.blocks] == [
        (b.key.hex(), b.parent_key.hex()) for b in request.blocks
    ]
    (wire_run,) = decoded.runs
    assert bytes(wire_run.data) == data
    assert list(wire_run.layer_checksums) == checksums


def test_the_get_message_parses_as_documented() -> None:
    vector = load("messages.json")
    raw = bytes.fromhex(vector["get_first_message_hex"])
    reply = pb.GetBlocksResponse.FromString(raw)
    assert reply.checksum_kind == pb.CRC32C
    assert reply.block_bytes == block_cases()[0]["block_bytes"]
    assert reply.num_blocks == 2
    assert [pb.Tier.Name(tier) for tier in reply.tiers] == vector["inputs"]["get_tiers"]
    (run,) = reply.runs
    assert (run.layer, run.first_block, run.num_blocks) == (0, 0, 2)
    assert run.data == expected_run_data()

    decoded = decode_get_message(raw)
    assert (decoded.checksum_kind, decoded.block_bytes, decoded.num_blocks) == (
        reply.checksum_kind,
        reply.block_bytes,
        reply.num_blocks,
    )
    assert decoded.tiers == list(reply.tiers)
    assert bytes(decoded.runs[0].data) == run.data
    assert list(decoded.runs[0].layer_checksums) == list(run.layer_checksums)
