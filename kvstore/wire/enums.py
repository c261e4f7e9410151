"""The core's enums to and from kvstore.v1's enum numbers.

The core enums were given the proto's numbers (tests/wire/test_enum_numbers.py pins
that), so each conversion is a cast; these functions keep the casts, and the check of
numbers a peer may send, in one place.
"""

from __future__ import annotations

from kvstore.checksum import ChecksumKind
from kvstore.enums import Durability, PutOutcome, TierKind
from kvstore.layout import DType
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.errors import WireError

_TIERS = {kind.value: kind for kind in TierKind}
_OUTCOMES = {outcome.value: outcome for outcome in PutOutcome}


def tier_to_wire(kind: TierKind) -> pb.Tier.ValueType:
    return pb.Tier.ValueType(kind.value)


def tier_from_wire(number: int) -> TierKind:
    try:
        return _TIERS[number]
    except KeyError:
        raise WireError(
            f"unknown tier number {number}; this client knows {sorted(_TIERS)}"
        ) from None


def outcome_to_wire(outcome: PutOutcome) -> pb.PutOutcome.ValueType:
    return pb.PutOutcome.ValueType(outcome.value)


def durability_to_wire(durability: Durability) -> pb.Durability.ValueType:
    return pb.Durability.ValueType(durability.value)


def durability_from_wire(number: int) -> Durability | None:
    """None for 0: a server from before durability was reported."""
    if number == 0:
        return None
    try:
        return Durability(number)
    except ValueError:
        raise WireError(
            f"unknown durability number {number}; this client knows "
            f"{[member.value for member in Durability]}"
        ) from None


def outcome_from_wire(number: int) -> PutOutcome:
    try:
        return _OUTCOMES[number]
    except KeyError:
        raise WireError(
            f"unknown put outcome number {number}; this client knows {sorted(_OUTCOMES)}"
        ) from None


def dtype_to_wire(dtype: DType) -> pb.DType.ValueType:
    return pb.DType.ValueType(dtype.value)


def checksum_kind_to_wire(kind: ChecksumKind) -> pb.ChecksumKind.ValueType:
    return pb.ChecksumKind.ValueType(kind.value)


def checksum_kind_from_wire(number: int) -> ChecksumKind:
    """The wire's checksum kind; 0 (unset) means the default, XXH3_64."""
    if number == 0:
        return ChecksumKind.XXH3_64
    try:
        return ChecksumKind(number)
    except ValueError:
        raise WireError(f"unknown checksum_kind {number}; use XXH3_64 or CRC32C") from None
