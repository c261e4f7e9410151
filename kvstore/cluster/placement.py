"""Where a chain's blocks live in a cluster: weighted rendezvous hashing over runs.

A chain is cut into runs of `run_blocks` consecutive blocks. A run belongs to the
member with the highest score for the key of the run's first block. That key is a
chain hash, so it names the whole prefix before it: every client computes the same
owner without asking anyone.

The score is weighted rendezvous (highest-random-weight) hashing, `-weight / ln(u)`,
where `u` in (0, 1) is a hash of (node id, key). A member with twice the weight owns
about twice the runs. When a member joins or leaves, only the runs it wins or held move,
about 1/N of them; no other run changes owner.

Runs keep a long chain's lookup to a few parallel round trips, one per member that owns
some of its runs. They also spread a chain over the members, a shared system prompt
included: the prompt's runs go to their owners like any others.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.cluster.members import Member

# Blocks per run unless configured: at 512-token blocks, 8K tokens per owner.
DEFAULT_RUN_BLOCKS = 16
_SCALE = float(1 << 64)


def member_weight(member: Member) -> float:
    """A member's share of runs: its DRAM capacity (the tier that serves hits), else its
    total capacity, else 1."""
    capacity = member.capacity_bytes
    weight = capacity.get("dram") or sum(capacity.values())
    return float(weight) if weight > 0 else 1.0


def rendezvous_score(node_id: str, key: bytes, weight: float) -> float:
    """The member's score for `key`: higher wins. Deterministic in (node_id, key)."""
    digest = hashlib.blake2b(key, digest_size=8, key=node_id.encode()[:64]).digest()
    unit = (int.from_bytes(digest, "little") + 0.5) / _SCALE  # in (0, 1)
    return -weight / math.log(unit)


@dataclass(frozen=True)
class Run:
    """Blocks [start, stop) of a chain, and the member that owns them."""

    start: int
    stop: int
    owner: Member


class Placement:
    """Owners of runs over a fixed set of members."""

    def __init__(self, members: Sequence[Member], run_blocks: int = DEFAULT_RUN_BLOCKS) -> None:
        if run_blocks < 1:
            raise ValueError(f"run_blocks must be >= 1, got {run_blocks}")
        ids = [member.node_id for member in members]
        if len(set(ids)) != len(ids):
            raise ValueError("two members share a node id")
        self.members = tuple(sorted(members, key=lambda member: member.node_id))
        self.run_blocks = run_blocks
        self._weights = [member_weight(member) for member in self.members]

    def owner(self, run_key: bytes) -> Member:
        """The member that owns the run whose first block has `run_key`."""
        if not self.members:
            raise LookupError("the cluster has no members")
        scores = [
            rendezvous_score(member.node_id, run_key, weight)
            for member, weight in zip(self.members, self._weights, strict=True)
        ]
        return self.members[max(range(len(scores)), key=scores.__getitem__)]

    def runs(self, keys: Sequence[bytes]) -> list[Run]:
        """The chain `keys` cut into runs of `run_blocks`, each with its owner, in order."""
        return [
            Run(start, min(start + self.run_blocks, len(keys)), self.owner(keys[start]))
            for start in range(0, len(keys), self.run_blocks)
        ]
