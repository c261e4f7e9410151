"""The core enums carry kvstore.v1's enum numbers: this pins that mapping.

kvstore.wire.enums converts by casting (`Tier(kind.value)`), which is only right while
every core member has the proto value of the same name and number, and every proto
value but UNSPECIFIED has a core member.
"""

from __future__ import annotations

import enum

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from kvstore.checksum import ChecksumKind
from kvstore.enums import Durability, PutOutcome, TierKind
from kvstore.events import BlockEventKind
from kvstore.layout import DType
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.enums import (
    checksum_kind_from_wire,
    checksum_kind_to_wire,
    dtype_to_wire,
    durability_from_wire,
    durability_to_wire,
    outcome_from_wire,
    outcome_to_wire,
    tier_from_wire,
    tier_to_wire,
)
from kvstore.wire.errors import WireError
from kvstore.wire.namespace import namespace_from_wire

PAIRS: list[tuple[type[enum.Enum], EnumTypeWrapper]] = [
    (TierKind, pb.Tier),
    (PutOutcome, pb.PutOutcome),
    (Durability, pb.Durability),
    (ChecksumKind, pb.ChecksumKind),
    (DType, pb.DType),
    (BlockEventKind, pb.BlockEventKind),
]


def proto_members(wrapper: EnumTypeWrapper) -> dict[str, int]:
    """Name → number of every value but the zero `*_UNSPECIFIED`."""
    members = {name: int(number) for name, number in wrapper.items()}
    unspecified = [name for name, number in members.items() if number == 0]
    assert len(unspecified) == 1
    assert unspecified[0].endswith("_UNSPECIFIED")
    del members[unspecified[0]]
    return members


@pytest.mark.parametrize(("core", "wrapper"), PAIRS, ids=lambda p: getattr(p, "__name__", ""))
def test_same_names_and_numbers(core: type[enum.Enum], wrapper: EnumTypeWrapper) -> None:
    assert {member.name: member.value for member in core} == proto_members(wrapper)


def test_the_pinned_numbers() -> None:
    """The numbers themselves, as docs/protocol.md lists them: a renumbering on both
    sides at once would still break every other implementation."""
    assert proto_members(pb.Tier) == {"HBM": 1, "DRAM": 2, "SSD": 3}
    assert proto_members(pb.PutOutcome) == {
        "COMMITTED": 1,
        "ALREADY_PRESENT": 2,
        "PARENT_MISSING": 3,
        "NODE_UNREACHABLE": 4,
    }
    assert proto_members(pb.ChecksumKind) == {"XXH3_64": 1, "CRC32C": 2}
    assert proto_members(pb.BlockEventKind) == {
        "SNAPSHOT": 1,
        "SNAPSHOT_END": 2,
        "STORED": 3,
        "REMOVED": 4,
        "TIER_CHANGED": 5,
        "GAP": 6,
    }
    assert proto_members(pb.Durability) == {
        "DURABLE_IN_MEMORY": 1,
        "DURABLE_ON_SSD": 2,
        "DURABLE_ON_SSD_FSYNCED": 3,
    }
    assert proto_members(pb.DType) == {
        "FLOAT16": 1,
        "BFLOAT16": 2,
        "FLOAT32": 3,
        "UINT8": 4,
        "INT8": 5,
        "FLOAT8_E4M3FN": 6,
        "FLOAT8_E5M2": 7,
    }


@pytest.mark.parametrize("durability", list(Durability), ids=lambda d: d.name)
def test_durability_round_trip(durability: Durability) -> None:
    number = durability_to_wire(durability)
    assert pb.Durability.Name(number) == durability.name
    assert durability_from_wire(number) is durability


def test_durability_zero_is_unknown_and_other_numbers_are_refused() -> None:
    assert durability_from_wire(0) is None
    with pytest.raises(WireError, match="unknown durability number 9"):
        durability_from_wire(9)


@pytest.mark.parametrize("kind", list(TierKind), ids=lambda k: k.name)
def test_tier_round_trip(kind: TierKind) -> None:
    number = tier_to_wire(kind)
    assert pb.Tier.Name(number) == kind.name
    assert tier_from_wire(number) is kind


@pytest.mark.parametrize("outcome", list(PutOutcome), ids=lambda o: o.name)
def test_outcome_round_trip(outcome: PutOutcome) -> None:
    number = outcome_to_wire(outcome)
    assert pb.PutOutcome.Name(number) == outcome.name
    assert outcome_from_wire(number) is outcome


@pytest.mark.parametrize("kind", list(ChecksumKind), ids=lambda k: k.name)
def test_checksum_kind_round_trip(kind: ChecksumKind) -> None:
    number = checksum_kind_to_wire(kind)
    assert pb.ChecksumKind.Name(number) == kind.name
    assert checksum_kind_from_wire(number) is kind


def test_unset_checksum_kind_means_xxh3_64() -> None:
    assert checksum_kind_from_wire(pb.CHECKSUM_KIND_UNSPECIFIED) is ChecksumKind.XXH3_64


def namespace_with_dtype(number: int) -> pb.Namespace:
    layout = pb.KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, block_tokens=16)
    layout.dtype = number  # type: ignore[assignment]  # numbers a peer may send
    return pb.Namespace(tenant="acme", model_fingerprint="tiny@1", layout=layout)


@pytest.mark.parametrize("dtype", list(DType), ids=lambda d: d.name)
def test_dtype_round_trip(dtype: DType) -> None:
    number = dtype_to_wire(dtype)
    assert pb.DType.Name(number) == dtype.name
    assert namespace_from_wire(namespace_with_dtype(number), True).layout.dtype is dtype


@pytest.mark.parametrize("number", [0, 4, 99, -1])
def test_unknown_tier_number(number: int) -> None:
    with pytest.raises(WireError, match=f"unknown tier number {number}"):
        tier_from_wire(number)


@pytest.mark.parametrize("number", [0, 5, 99, -1])
def test_unknown_outcome_number(number: int) -> None:
    with pytest.raises(WireError, match=f"unknown put outcome number {number}"):
        outcome_from_wire(number)


@pytest.mark.parametrize("number", [3, 99, -1])
def test_unknown_checksum_kind(number: int) -> None:
    with pytest.raises(WireError, match=f"unknown checksum_kind {number}"):
        checksum_kind_from_wire(number)


@pytest.mark.parametrize(
    ("number", "message"),
    [(0, "dtype is required"), (8, "unknown namespace.layout.dtype 8"), (99, "unknown namespace")],
)
def test_unknown_dtype(number: int, message: str) -> None:
    with pytest.raises(WireError, match=message):
        namespace_from_wire(namespace_with_dtype(number), True)
