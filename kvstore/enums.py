"""The small enums both sides of the wire share: where a block lives, what became of a put.

They live apart from the engine so that `import kvstore.client` loads none of the store,
the mover, the tiers or eviction. Their values equal the kvstore.v1 enums' numbers;
tests/wire/test_enum_numbers.py pins that mapping.
"""

from __future__ import annotations

import enum


class TierKind(enum.IntEnum):
    """Fastest first.

    An IntEnum because entries key their copies by it: int hashing is C-speed, while
    Enum's is Python code, which showed in the profile of a 1,000-key lookup.
    """

    HBM = 1
    DRAM = 2
    SSD = 3


class PutOutcome(enum.Enum):
    """What became of one block of a put."""

    COMMITTED = 1
    ALREADY_PRESENT = 2
    PARENT_MISSING = 3
    # A cluster client's own: the block's node could not be reached, so it was not
    # stored. No server sends it.
    NODE_UNREACHABLE = 4


class Durability(enum.IntEnum):
    """What an acknowledged (COMMITTED) block survives; ordered weakest first."""

    DURABLE_IN_MEMORY = 1  # in DRAM or HBM only: a daemon crash loses it
    DURABLE_ON_SSD = 2  # its block file is renamed into place: survives a daemon crash
    DURABLE_ON_SSD_FSYNCED = 3  # file and directory fsynced too: survives power loss
