"""Where a chain's blocks live in a cluster: weighted rendezvous hashing over runs.

A chain is cut into runs of consecutive blocks, `run_blocks` long on average. The
chain's first block (its root) is a run alone; a run starts at its second block and at
every later block whose key is a *run start*: its CRC-32 is 0 modulo `run_blocks`. The
cut depends only on the keys and on whether a list begins at the chain's root, never on
a block's position in the caller's list, so a client that puts a chain's tail
(`put_blocks` with a `parent_key`) cuts it where a client holding the whole chain does.
A run belongs to the member with the highest score for the key of the run's first block.
That key is a chain hash, so it names the whole prefix before it: every client computes
the same owner without asking anyone.

The root is alone because many chains share it (a system prompt): were it to head a run
of `run_blocks`, its owner would also get every such chain's next blocks, up to their
first run start, and evict first. With it alone, each chain's own blocks go to the owner
of their own first key.

A tail whose parent is a chain's root starts a run at its first block. Any other tail's
first blocks, before its first run start, belong to the run its parent is in; that run's
first key is not in the tail, so the client asks the members which holds the parent, and
whether it is a chain's root (`Placement.lead_blocks` says how many blocks that is).

The score is weighted rendezvous (highest-random-weight) hashing, `-weight / ln(u)`,
where `u` in (0, 1) is a hash of (node id, key). A member with twice the weight owns
about twice the runs. When a member joins or leaves, only the runs it wins or held move,
about 1/N of them; no other run changes owner.

Runs keep a long chain's lookup to a few parallel round trips, one per member that owns
some of its runs. They also spread a chain over the members, a shared system prompt
included: the prompt is cut where its keys say, and its runs go to their owners like
any others; a conversation's own blocks start runs of their own within about
`run_blocks` blocks of where they leave the shared prompt.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import zlib
from collections.abc import Sequence
from typing import NamedTuple

from kvstore.cluster.members import Member

# Blocks per run on average unless configured: at 512-token blocks, 2K tokens per owner.
# Shorter runs spread a shared prompt's conversations sooner; each run of a put is one
# call to its owner.
DEFAULT_RUN_BLOCKS = 4
_SCALE = float(1 << 64)
_OWNER_CACHE_RUNS = 1 << 16


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


class Run(NamedTuple):
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
        self._owners: dict[bytes, Member] = {}

    def owner(self, run_key: bytes) -> Member:
        """The member that owns the run whose first block has `run_key`."""
        found = self._owners.get(run_key)
        if found is not None:
            return found
        if not self.members:
            raise LookupError("the cluster has no members")
        scores = [
            rendezvous_score(member.node_id, run_key, weight)
            for member, weight in zip(self.members, self._weights, strict=True)
        ]
        found = self.members[max(range(len(scores)), key=scores.__getitem__)]
        # An agent looks its chain up again every turn: remember owners, bounded. A
        # placement lives until membership changes, which makes a new one.
        if len(self._owners) >= _OWNER_CACHE_RUNS:
            self._owners.clear()
        self._owners[run_key] = found
        return found

    def is_run_start(self, key: bytes) -> bool:
        """Whether a run starts at the block with `key` (beside a chain's first and
        second blocks, where runs always start)."""
        return zlib.crc32(key) % self.run_blocks == 0

    def lead_blocks(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, the tail of a chain whose parent is not the chain's root,
        come before its first run start: they belong to the run of the tail's parent,
        whose owner the keys do not name."""
        for index, key in enumerate(keys):
            if self.is_run_start(key):
                return index
        return len(keys)

    def runs(
        self, keys: Sequence[bytes], *, tail: bool = False, lead_owner: Member | None = None
    ) -> list[Run]:
        """The chain `keys` cut into runs, each with its owner, in order.

        By default `keys` is a whole chain: `keys[0]`, its root, is a run alone and
        `keys[1]` starts the next. With `tail`, `keys` continues a parent block: its
        first `lead_blocks(keys)` blocks continue the parent's run, held by `lead_owner`;
        without a `lead_owner` they start a run of their own (the parent is a chain's
        root, which is a run alone).
        """
        if not keys:
            return []
        first_owner, starts = self._cut(keys, tail, lead_owner)
        bounds = [0, *starts, len(keys)]
        return [
            Run(start, stop, first_owner if start == 0 else self.owner(keys[start]))
            for start, stop in itertools.pairwise(bounds)
        ]

    def spans(
        self, keys: Sequence[bytes], *, tail: bool = False, lead_owner: Member | None = None
    ) -> list[Run]:
        """`runs`, with neighbours of one owner joined: what a client sends each owner
        as one piece (one lookup range, one get stream)."""
        if not keys:
            return []
        span_owner, starts = self._cut(keys, tail, lead_owner)
        spans: list[Run] = []
        span_start = 0
        for start in starts:
            owner = self.owner(keys[start])
            if owner.node_id != span_owner.node_id:
                spans.append(Run(span_start, start, span_owner))
                span_start, span_owner = start, owner
        spans.append(Run(span_start, len(keys), span_owner))
        return spans

    def _cut(
        self, keys: Sequence[bytes], tail: bool, lead_owner: Member | None
    ) -> tuple[Member, list[int]]:
        """The owner of the first run of `keys`, and where the later runs start."""
        if lead_owner is not None and not tail:
            raise ValueError("lead_owner is the owner of a tail's parent: pass tail=True")
        run_blocks, crc32 = self.run_blocks, zlib.crc32  # once per key: kept lean
        if not tail:  # the root alone, then a run from keys[1]
            later = enumerate(itertools.islice(keys, 2, None), 2)
            starts = [index for index, key in later if not crc32(key) % run_blocks]
            return self.owner(keys[0]), [1, *starts] if len(keys) > 1 else []
        starts = [index for index, key in enumerate(keys) if not crc32(key) % run_blocks]
        if starts[:1] == [0]:
            return self.owner(keys[0]), starts[1:]
        return (lead_owner if lead_owner is not None else self.owner(keys[0])), starts
