"""A cluster lookup's plan and merge: which keys each owner is asked for, and how its
answers make one prefix.

A plan depends only on the chain's keys and the placement, so the cluster client keeps
the plans of the chains it looked up last (`LookupPlans`): an agent, or a scheduler
that asks each step, looks the same chain up again and again, and cutting a 1,000-key
chain into spans and grouping them by owner costs more client time than asking the
owners does.

Each owner is asked for its spans' keys back to back and answers with how many of them,
from the first, it holds. So its first missing key is the first block it lacks, and the
chain's prefix ends at the earliest first missing block over all owners: one step per
owner, not per span. Once the answers in hand put that end before every block an owner
still to answer holds, its answer cannot change the prefix: the lookup returns without
it (`ask_owners`), so a slow or hung node whose runs lie past a miss delays nothing.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.client._cluster_nodes import cancel_and_wait
from kvstore.client._results import PrefixMatch
from kvstore.cluster.members import Member
from kvstore.cluster.placement import Placement, Run
from kvstore.enums import TierKind

# Asks per member that lookups leave to end on their own (Stragglers).
STRAGGLERS_PER_MEMBER = 4
# Chains whose plans are kept. A plan holds references to its chain's keys, about 16
# bytes per key: 64 plans of 1,000-key chains hold about 1 MiB.
PLANS_KEPT = 64


@dataclass(frozen=True, slots=True)
class OwnerAsk:
    """What one owner is asked: its spans' keys back to back, in chain order."""

    member: Member
    keys: list[bytes]
    span_starts: tuple[int, ...]  # chain position of each of its spans
    offsets: tuple[int, ...]  # where in `keys` each of its spans begins

    def first_missing(self, num_held: int, chain_length: int) -> int:
        """The chain position of the first block this owner lacks, given that it holds
        the first `num_held` of `keys` (`chain_length` when it lacks none)."""
        if num_held >= len(self.keys):
            return chain_length
        span = bisect.bisect_right(self.offsets, num_held) - 1
        return self.span_starts[span] + num_held - self.offsets[span]


@dataclass(frozen=True, slots=True)
class LookupPlan:
    """A chain's spans and, per owner, what it is asked. `owners[0]` owns the chain's
    first span: its answer says whether the chain's first block is a chain root."""

    spans: tuple[Run, ...]
    owners: tuple[OwnerAsk, ...]
    span_owner: tuple[int, ...]  # for each span, its owner's index in `owners`
    span_offset: tuple[int, ...]  # for each span, where it begins in its owner's keys


def plan_lookup(placement: Placement, keys: Sequence[bytes]) -> LookupPlan:
    """Cut `keys`, a whole chain, into spans and group them by owner (in one pass)."""
    spans = placement.spans(keys)
    index_of: dict[str, int] = {}
    members: list[Member] = []
    owner_keys: list[list[bytes]] = []
    span_starts: list[list[int]] = []
    offsets: list[list[int]] = []
    span_owner: list[int] = []
    span_offset: list[int] = []
    for span in spans:
        index = index_of.get(span.owner.node_id)
        if index is None:
            index = index_of[span.owner.node_id] = len(members)
            members.append(span.owner)
            owner_keys.append([])
            span_starts.append([])
            offsets.append([])
        span_owner.append(index)
        span_offset.append(len(owner_keys[index]))
        span_starts[index].append(span.start)
        offsets[index].append(span_offset[-1])
        owner_keys[index].extend(keys[span.start : span.stop])
    owners = tuple(
        OwnerAsk(member, asked, tuple(starts), tuple(at))
        for member, asked, starts, at in zip(members, owner_keys, span_starts, offsets, strict=True)
    )
    return LookupPlan(tuple(spans), owners, tuple(span_owner), tuple(span_offset))


class LookupPlans:
    """The plans of the chains looked up last, by their keys, under one placement: a
    new placement (the membership changed) drops them all, as none places right under
    it."""

    def __init__(self, kept: int = PLANS_KEPT) -> None:
        self._kept = kept
        self._placement: Placement | None = None
        self._plans: OrderedDict[tuple[bytes, ...], LookupPlan] = OrderedDict()

    def __len__(self) -> int:
        return len(self._plans)

    def plan(self, placement: Placement, keys: list[bytes]) -> LookupPlan:
        if placement is not self._placement:
            self._plans.clear()
            self._placement = placement
        # Keyed by the keys' values, not the list's identity: a caller may change a
        # list between lookups, and a freed list's id is reused.
        chain = tuple(keys)
        found = self._plans.get(chain)
        if found is not None:
            self._plans.move_to_end(chain)
            return found
        found = self._plans[chain] = plan_lookup(placement, chain)
        if len(self._plans) > self._kept:
            self._plans.popitem(last=False)
        return found


class Stragglers:
    """Asks whose answers no lookup needed, left to end on their own, at most
    `per_member` per member at once: a hung node's asks end only at their timeout, and
    lookups that left one behind each would pile them up (and a connection each)."""

    def __init__(self, per_member: int = STRAGGLERS_PER_MEMBER) -> None:
        self._per_member = per_member
        self._members: dict[asyncio.Task[PrefixMatch | None], str] = {}
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._members)

    def count(self, node_id: str) -> int:
        """The asks to `node_id` left to end on their own."""
        return self._counts.get(node_id, 0)

    def admit(self, node_id: str, task: asyncio.Task[PrefixMatch | None], *, force: bool) -> bool:
        """Leave `task` to end on its own, unless its member has its share already (and
        not `force`): False then, and the caller waits for it."""
        if not force and self._counts.get(node_id, 0) >= self._per_member:
            return False
        self._members[task] = node_id
        self._counts[node_id] = self._counts.get(node_id, 0) + 1
        task.add_done_callback(self._retire)
        return True

    def _retire(self, task: asyncio.Task[PrefixMatch | None]) -> None:
        node_id = self._members.pop(task)
        self._counts[node_id] -= 1
        if not self._counts[node_id]:
            del self._counts[node_id]
        if not task.cancelled():
            task.exception()  # retrieved: a straggler's error bears on no lookup

    async def cancel(self) -> None:
        """Cancel every straggler and wait until they have ended."""
        await cancel_and_wait(list(self._members))


async def ask_owners(
    plan: LookupPlan,
    chain_length: int,
    ask: Callable[[OwnerAsk], Coroutine[Any, Any, PrefixMatch | None]],
    stragglers: Stragglers,
) -> list[PrefixMatch | None]:
    """Every owner's answer (None: it failed) that can bear on the prefix; the others
    are left None and their asks, all sent at once at the start, are left to
    `stragglers` (a caller's error from one of them is dropped: it no longer bears on
    this lookup), or waited for where their member has its share of stragglers. A
    caller's error from an owner that bears on the prefix is raised, the other asks
    left as stragglers; a cancelled lookup cancels its asks."""
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(ask(owner)) for owner in plan.owners]
    answers: list[PrefixMatch | None] = [None] * len(tasks)
    waiting = dict(enumerate(tasks))
    end = chain_length  # the prefix ends here at the latest, by the answers so far
    try:
        while needed := [
            task for index, task in waiting.items() if plan.owners[index].span_starts[0] < end
        ]:
            await asyncio.wait(needed, return_when=asyncio.FIRST_COMPLETED)
            for index, task in list(waiting.items()):
                if task.done():
                    del waiting[index]
                    answer = answers[index] = task.result()
                    held = answer.num_matched if answer is not None else 0
                    end = min(end, plan.owners[index].first_missing(held, chain_length))
    except asyncio.CancelledError:
        for task in waiting.values():
            task.cancel()
        raise
    except BaseException:
        for index, task in waiting.items():
            stragglers.admit(plan.owners[index].member.node_id, task, force=True)
        raise
    unwanted = [
        task
        for index, task in waiting.items()
        if not stragglers.admit(plan.owners[index].member.node_id, task, force=False)
    ]
    if unwanted:
        await asyncio.wait(unwanted)
        for task in unwanted:
            if not task.cancelled():
                task.exception()  # its answer bears on nothing, nor does its error
    return answers


def merge_answers(
    plan: LookupPlan,
    keys: list[bytes],
    answers: Sequence[PrefixMatch | None],
    block_tokens: int,
) -> PrefixMatch:
    """The chain's stored prefix from each owner's answer (None: it failed, so it holds
    nothing): up to the earliest block that some owner lacks."""
    num_matched = len(keys)
    for owner, answer in zip(plan.owners, answers, strict=True):
        held = answer.num_matched if answer is not None else 0
        num_matched = min(num_matched, owner.first_missing(held, len(keys)))
    first = answers[0]
    return PrefixMatch(
        keys=keys,
        num_matched=num_matched,
        tiers=_tiers(plan, answers, num_matched),
        block_tokens=block_tokens,
        first_is_chain_root=first is not None and num_matched > 0 and first.first_is_chain_root,
    )


def _tiers(
    plan: LookupPlan, answers: Sequence[PrefixMatch | None], num_matched: int
) -> tuple[TierKind, ...]:
    """Each matched block's tier, from its owner's answer."""
    if not num_matched:
        return ()
    # The common case, every block in one tier (all in DRAM), without a pass per span.
    held = [answer.tiers for answer in answers if answer is not None and answer.tiers]
    tier = held[0][0]
    if all(tiers.count(tier) == len(tiers) for tiers in held):
        return (tier,) * num_matched
    tiers: list[TierKind] = []
    for span, index, offset in zip(plan.spans, plan.span_owner, plan.span_offset, strict=True):
        if span.start >= num_matched:
            break
        answer = answers[index]
        assert answer is not None  # every owner of a block before num_matched held it
        tiers.extend(answer.tiers[offset : offset + min(span.stop, num_matched) - span.start])
    return tuple(tiers)
