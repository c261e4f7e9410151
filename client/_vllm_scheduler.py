"""The scheduler side of the vLLM connector: how many tokens to load, and what each step loads
and saves.

A request's life here: `on_new_request`, as vLLM's scheduler adds it, starts the lookup of
its prompt while other requests run, so the first `get_num_new_matched_tokens`, often a step
later, finds the answer in; an idle engine schedules it at once, and that call looks it up
from the scheduler's own thread, which answers sooner (kvstore.client._blocking_lookup).
One lookup either way; a miss costs nothing more. It plans how much of the match to fetch, only
what arrives sooner than it could be recomputed (`plan_fetch`); `update_state_after_alloc`
turns the plan into a load into the blocks vLLM allocated; each `build_connector_meta`
hands the worker that load and the saves of the blocks this step fills; `request_finished`
keeps the blocks until the worker reports the saves done, and pins the chain for the think
time of an agent's tool call.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from kvstore.client._async import KVClient
from kvstore.client._blocking_lookup import BlockingLookups
from kvstore.client._errors import KVStoreClientError
from kvstore.client._loop import LoopThread
from kvstore.client._results import PrefixMatch
from kvstore.client._vllm_block_view import StoredKeysMirror
from kvstore.client._vllm_config import ConnectorConfig
from kvstore.client._vllm_metadata import (
    TIER_RATE_PREFIX,
    KVStoreConnectorMetadata,
    LoadSpec,
    SaveSpec,
)
from kvstore.client.cost import (
    FetchPlan,
    PrefillModel,
    break_even_bandwidth,
    plan_fetch_blocks,
)
from kvstore.keys import chain_keys

logger = logging.getLogger(__name__)

# kv_transfer_params keys a request may carry.
SESSION_PARAM = "kvstore_session"  # requests of one agent session share this id
SESSION_END_PARAM = "kvstore_session_end"  # true on the session's last request
LOAD_PARAM = "kvstore_load"  # false: never load this request from the store
SAVE_PARAM = "kvstore_save"  # false: never save this request's blocks

# A lookup started at arrival answers the request's first get_num_new_matched_tokens if it
# is at most this old; that call takes it, and any later call looks up afresh.
PREFETCH_MAX_AGE_S = 1.0
# Arrivals neither matched nor finished yet, at most: past it the oldest lookup is dropped.
MAX_PREFETCHED = 4096
# After a failed lookup, the scheduler side looks nothing up for this long, doubling
# while lookups keep failing, up to the maximum.
LOOKUP_BACKOFF_S = 1.0
LOOKUP_BACKOFF_MAX_S = 30.0
# A fetch made only to measure the store again loads this much of its match, at least one
# block: what the client's BandwidthMeter needs for one sample.
REMEASURE_BYTES = 64 * 1024


@dataclass(frozen=True)
class MatchPlan:
    """What `get_num_new_matched_tokens` found and decided for one request."""

    keys: list[bytes]  # the prompt's loadable full blocks (the last token is never loaded)
    num_matched_blocks: int  # stored, counted from the first block (0 if not looked up)
    first_block: int  # the first block not computed locally: loads start here
    fetch: FetchPlan
    # False when no lookup was made because no tier's rate could beat recomputing: what the
    # store holds is unknown, so the worker's save looks it up itself, off the forward pass.
    looked_up: bool = True

    @property
    def num_load_blocks(self) -> int:
        return self.fetch.num_load_blocks


@dataclass(frozen=True)
class _Prefetch:
    keys: list[bytes]
    started_s: float  # time.monotonic()
    # None: not started, the match looks up from its own thread (an idle engine).
    lookup: concurrent.futures.Future[PrefixMatch] | None

    def cancel(self) -> None:
        if self.lookup is not None:
            self.lookup.cancel()


@dataclass(frozen=True)
class _SessionPin:
    chain: list[bytes]
    expires_s: float  # time.monotonic() when the server lets the pin go


@dataclass
class _Tracked:
    request: Any
    plan: MatchPlan | None
    block_ids: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # of the first `len(keys)` full blocks
    stored_blocks: int = 0  # blocks [0, stored_blocks) are in the store or being saved
    stored_unknown: bool = False  # no lookup was made: the next save skips what is stored
    pending_load: LoadSpec | None = None
    saves_scheduled: bool = False


class SchedulerSide:
    def __init__(self, config: ConnectorConfig) -> None:
        self.config = config
        self._loop = LoopThread("kvstore-vllm-scheduler")
        self._client: KVClient = self._loop.open_client(
            config.target, config.namespace, config.options
        )
        self._blocking = BlockingLookups(self._client)
        self._mirror = StoredKeysMirror(self._loop, self._client) if config.block_view else None
        self._plans: dict[str, MatchPlan] = {}
        self._prefetched: dict[str, _Prefetch] = {}  # arrival order
        self._tracked: dict[str, _Tracked] = {}
        # Request id -> (its session, the chain to pin once the worker reports its saves).
        self._pin_after_save: dict[str, tuple[str | None, list[bytes]]] = {}
        self._sessions: dict[str, _SessionPin] = {}  # session id -> its pin, expiry order
        self._control: list[concurrent.futures.Future[int]] = []
        self._fetch_bytes_per_s = config.fetch_bytes_per_s
        self._bandwidth_measured = False
        self._tier_bytes_per_s: dict[str, float] = {}  # "dram", "ssd", ...: measured
        self._measured_prefill_tokens_per_s: float | None = None
        # While no plan fetches, nothing measures the store: after `remeasure_s` without a
        # fetch, one plan loads a few blocks (REMEASURE_BYTES) to measure it again.
        self._last_fetch_planned_s = time.monotonic()
        # After a failed lookup none is made until _lookups_resume_s (time.monotonic()).
        self._lookup_backoff_s = 0.0
        self._lookups_resume_s = 0.0
        self._last_lookup_error = ""

    # -- on_new_request ----------------------------------------------------------------------

    def on_new_request(self, request: Any) -> None:
        """Start the lookup of a request vLLM's scheduler just added; nothing waits for it."""
        if not _param(request, LOAD_PARAM, True) or self._no_tier_can_pay() is not None:
            return
        if _uncacheable(request) is not None or self._lookups_paused() is not None:
            return
        keys = self._loadable_keys(request)
        if not keys:
            return
        self._drop_prefetch(request.request_id)  # added again: the newer lookup answers
        while len(self._prefetched) >= MAX_PREFETCHED:
            self._drop_prefetch(next(iter(self._prefetched)))
        # With nothing running or waiting, the next schedule takes this request at once:
        # no step to hide the lookup behind, and the match's own lookup answers sooner.
        # Arrivals behind it (a burst) start theirs now, to overlap while it is matched.
        # A miss by the block view needs none. The keys are kept either way.
        idle = not self._tracked and not self._prefetched and self._blocking.available
        lookup = (
            None
            if idle or self._miss_by_view(keys, 0) is not None
            else self._loop.submit(self._client.lookup_keys(keys))
        )
        self._prefetched[request.request_id] = _Prefetch(keys, time.monotonic(), lookup)

    def _lookup_failed(self, error: KVStoreClientError) -> None:
        """A lookup failed (the store down, or hung until the lookup timeout): look nothing
        up for a while, doubling while it keeps failing, so that a store that does not
        answer costs vLLM's scheduler one timeout, not one per request."""
        self._lookup_backoff_s = min(
            LOOKUP_BACKOFF_MAX_S, max(LOOKUP_BACKOFF_S, 2 * self._lookup_backoff_s)
        )
        self._lookups_resume_s = time.monotonic() + self._lookup_backoff_s
        self._last_lookup_error = str(error)
        logger.warning(
            "kvstore lookup failed, recomputing; no lookups for %.0f s: %s",
            self._lookup_backoff_s,
            error,
        )

    def _lookups_paused(self) -> str | None:
        left_s = self._lookups_resume_s - time.monotonic()
        if left_s <= 0:
            return None
        return (
            f"recompute, no lookup: lookups pause {left_s:.1f} s more after a failed one "
            f"({self._last_lookup_error})"
        )

    def _drop_prefetch(self, request_id: str) -> None:
        prefetch = self._prefetched.pop(request_id, None)
        if prefetch is not None:
            prefetch.cancel()

    # -- get_num_new_matched_tokens ---------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        plan = self._match(request, num_computed_tokens)
        self._plans[request.request_id] = plan
        if plan.num_load_blocks == 0:
            return 0, False
        end = (plan.first_block + plan.num_load_blocks) * self.config.block_tokens
        return end - num_computed_tokens, False

    def _loadable_keys(self, request: Any) -> list[bytes]:
        """The keys of the prompt's full blocks but the one holding its last token, whose
        logits come from the forward pass: one token is always computed."""
        block_tokens = self.config.block_tokens
        prompt = list(request.prompt_token_ids)
        return self._request_keys(
            request, prompt[: (len(prompt) - 1) // block_tokens * block_tokens]
        )

    def _request_keys(
        self, request: Any, tokens: list[int], after: bytes | None = None
    ) -> list[bytes]:
        """The chain keys of `tokens` for this request: its LoRA adapter and cache salt
        are hashed into the first block, as vLLM's own prefix cache does, so requests
        that must not share KV (another adapter, another salt) never match. `after`:
        `tokens` continue the request's chain after the block of that key."""
        options = self.config.options
        return chain_keys(
            tokens,
            self.config.block_tokens,
            extra=options.key_extra + _request_salt(request) if after is None else b"",
            algorithm=options.hash_algorithm,
            after=after,
        )

    def _match(self, request: Any, num_computed_tokens: int) -> MatchPlan:
        block_tokens = self.config.block_tokens
        first_block = num_computed_tokens // block_tokens
        uncacheable = _uncacheable(request)
        if uncacheable is not None:
            return MatchPlan([], 0, first_block, _no_fetch(uncacheable), looked_up=False)
        prefetch = self._prefetched.pop(request.request_id, None)
        keys = prefetch.keys if prefetch is not None else self._loadable_keys(request)
        if num_computed_tokens % block_tokens:
            # Loads fill whole blocks; one computed in part locally cannot take one.
            return MatchPlan(keys, 0, first_block, _no_fetch("local prefix ends mid-block"))
        if not _param(request, LOAD_PARAM, True) or first_block >= len(keys):
            return MatchPlan(keys, 0, first_block, _no_fetch("nothing to load"))
        no_tier_pays = self._no_tier_can_pay()
        if no_tier_pays is not None:
            if prefetch is not None:
                prefetch.cancel()
            return MatchPlan(keys, 0, first_block, _no_fetch(no_tier_pays), looked_up=False)
        paused = self._lookups_paused()
        if paused is not None:
            if prefetch is not None:
                prefetch.cancel()
            return MatchPlan(keys, 0, first_block, _no_fetch(paused), looked_up=False)
        held = self._miss_by_view(keys, first_block)
        if held is not None:
            if prefetch is not None:
                prefetch.cancel()
            return MatchPlan(keys, held, first_block, _no_fetch("miss, by the block view"))
        try:
            match = self._lookup(keys, prefetch)
        except KVStoreClientError as error:
            self._lookup_failed(error)
            return MatchPlan(keys, 0, first_block, _no_fetch(f"lookup failed: {error}"))
        self._lookup_backoff_s = 0.0
        tiers = [tier.name.lower() for tier in match.tiers[first_block : match.num_matched]]
        return MatchPlan(keys, match.num_matched, first_block, self._plan(tiers))

    def wait_for_block_view(self, timeout_s: float) -> bool:
        """With `block_view` on: whether the view of the store became complete within
        `timeout_s` (until then every request is looked up). False with it off."""
        return self._mirror is not None and self._mirror.wait_complete(timeout_s)

    def _miss_by_view(self, keys: list[bytes], first_block: int) -> int | None:
        """With the block view on and complete: 0 where the store holds not even the
        chain's first block, so nothing can be loaded and no lookup is made; else None,
        and a lookup decides. (Where it holds blocks that the local prefix covers, the
        lookup is still made: it touches them, keeping a shared prefix warm in the
        store.)"""
        if self._mirror is None or not keys:
            return None
        return 0 if self._mirror.held_prefix(keys[:1]) == 0 else None

    def _lookup(self, keys: list[bytes], prefetch: _Prefetch | None) -> PrefixMatch:
        """The arrival's lookup while it is fresh (waiting for it if it is still out),
        else one made now."""
        if prefetch is not None and prefetch.lookup is not None:
            if time.monotonic() - prefetch.started_s <= PREFETCH_MAX_AGE_S:
                return prefetch.lookup.result()
            prefetch.cancel()
        match = self._blocking.lookup_keys(keys)
        if match is None:
            match = self._loop.run(self._client.lookup_keys(keys))
        return match

    def _plan(self, tiers: list[str]) -> FetchPlan:
        """Fetch the part of the match (its blocks' tiers) that arrives sooner than it could
        be recomputed: all of it, a prefix (a fast tier's head), or none."""
        if not tiers:
            return _no_fetch("miss")
        prefill = self._prefill_model()
        if prefill is None or self._fetch_bytes_per_s is None:
            # Nothing to weigh yet; the first fetch is what measures the store.
            unknown = "prefill rate" if prefill is None else "bandwidth"
            self._last_fetch_planned_s = time.monotonic()
            return FetchPlan(len(tiers), 0.0, 0.0, f"fetch: no {unknown} measured yet")
        overall = self._fetch_bytes_per_s
        bandwidths = [self._tier_bytes_per_s.get(tier, overall) for tier in tiers]
        block_bytes = self.config.namespace.layout.block_bytes
        plan = plan_fetch_blocks(
            block_bandwidths=bandwidths,
            block_bytes=block_bytes,
            block_tokens=self.config.block_tokens,
            prefill=prefill,
            per_fetch_overhead_s=self.config.fetch_overhead_s,
            bandwidth_source=self._bandwidth_source,
        )
        if plan.num_load_blocks == 0 and self._remeasure_due():
            num_probe = min(len(tiers), max(1, -(-REMEASURE_BYTES // block_bytes)))
            idle_s = time.monotonic() - self._last_fetch_planned_s
            plan = replace(
                plan,
                num_load_blocks=num_probe,
                fetch_s=self.config.fetch_overhead_s
                + sum(block_bytes / rate for rate in bandwidths[:num_probe]),
                recompute_s=num_probe * prefill.marginal_seconds(self.config.block_tokens),
                reason=f"fetch {num_probe} block(s) to measure the store again "
                f"(no fetch planned for {idle_s:.0f} s)",
            )
        if plan.num_load_blocks:
            self._last_fetch_planned_s = time.monotonic()
        return plan

    @property
    def _bandwidth_source(self) -> str:
        return "measured" if self._bandwidth_measured else "configured prior"

    def _remeasure_due(self) -> bool:
        interval = self.config.remeasure_s
        return interval > 0 and time.monotonic() - self._last_fetch_planned_s >= interval

    def _no_tier_can_pay(self) -> str | None:
        """Why no block of any match could arrive sooner than it is recomputed (every rate
        the plans may use is below break-even), or None. Then a lookup cannot change the
        plan, and a request costs a hash, not a round trip.

        Only a worker's fetch measures the store, so every `remeasure_s` one request is
        looked up and loads a few blocks of its match to measure it again.
        """
        prefill = self._prefill_model()
        if prefill is None or self._fetch_bytes_per_s is None:
            return None
        fastest = max([self._fetch_bytes_per_s, *self._tier_bytes_per_s.values()])
        layout = self.config.namespace.layout
        break_even = break_even_bandwidth(
            block_bytes=layout.block_bytes, block_tokens=self.config.block_tokens, prefill=prefill
        )
        if fastest >= break_even or self._remeasure_due():
            return None
        return (
            f"recompute, no lookup: the fastest tier delivers {fastest / 1e6:.3g} MB/s "
            f"({self._bandwidth_source}), below break-even {break_even / 1e6:.3g} MB/s"
        )

    def _prefill_model(self) -> PrefillModel | None:
        rate = self.config.prefill_tokens_per_s or self._measured_prefill_tokens_per_s
        if rate is None:
            return None
        return PrefillModel(tokens_per_s=rate, fixed_s=self.config.prefill_fixed_s)

    def plan_for(self, request_id: str) -> MatchPlan | None:
        """The last plan made for `request_id` (kept until the request finishes)."""
        tracked = self._tracked.get(request_id)
        return tracked.plan if tracked is not None else self._plans.get(request_id)

    # -- update_state_after_alloc, build_connector_meta -------------------------------------

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        plan = self._plans.pop(request.request_id, None)
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            tracked = _Tracked(request=request, plan=plan)
            self._tracked[request.request_id] = tracked
        tracked.block_ids = list(blocks.get_block_ids()[0])
        if plan is None:
            return
        # The store holds the matched blocks whether this request loads them or not.
        tracked.stored_blocks = plan.num_matched_blocks
        tracked.keys = list(plan.keys)  # every loadable block's, hashed at the match
        tracked.stored_unknown = not plan.looked_up
        if num_external_tokens <= 0:
            return
        num_load = plan.num_load_blocks
        first, end = plan.first_block, plan.first_block + num_load
        if len(tracked.block_ids) < end:
            raise ValueError(
                f"request {request.request_id}: {len(tracked.block_ids)} blocks allocated, "
                f"the load needs {end}"
            )
        tracked.pending_load = LoadSpec(
            request.request_id, plan.keys[first:end], tracked.block_ids[first:end]
        )

    def build_connector_meta(self, scheduler_output: Any) -> KVStoreConnectorMetadata:
        computed_after: dict[str, int] = {}
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            scheduled = scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
            computed_after[new.req_id] = new.num_computed_tokens + scheduled
        cached = scheduler_output.scheduled_cached_reqs
        resumed = _resumed_req_ids(cached)
        for index, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_block_ids = cached.new_block_ids[index]
            if req_id in resumed:
                # Back from preemption: vLLM sends its whole block table, not an addition.
                tracked.block_ids = list(new_block_ids[0]) if new_block_ids is not None else []
            elif new_block_ids is not None:
                tracked.block_ids.extend(new_block_ids[0])
            scheduled = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            computed_after[req_id] = cached.num_computed_tokens[index] + scheduled
        loads: list[LoadSpec] = []
        saves: list[SaveSpec] = []
        for req_id, num_tokens in computed_after.items():
            tracked = self._tracked[req_id]
            if tracked.pending_load is not None:
                loads.append(tracked.pending_load)
                tracked.pending_load = None
            save = self._save_for(tracked, num_tokens)
            if save is not None:
                saves.append(save)
        preempted = frozenset(getattr(scheduler_output, "preempted_req_ids", None) or ())
        for req_id in preempted:
            # Its blocks are freed; when it resumes, vLLM asks for its match again.
            self._tracked.pop(req_id, None)
        num_step_tokens = getattr(scheduler_output, "total_num_scheduled_tokens", None)
        if not isinstance(num_step_tokens, int):
            num_step_tokens = sum(scheduler_output.num_scheduled_tokens.values())
        return KVStoreConnectorMetadata(
            loads=loads,
            saves=saves,
            preempted_req_ids=preempted,
            num_step_tokens=num_step_tokens,
        )

    def _save_for(self, tracked: _Tracked, num_computed_tokens: int) -> SaveSpec | None:
        """The blocks that are full once this step has run and that are not stored yet."""
        request = tracked.request
        if not _param(request, SAVE_PARAM, True) or _uncacheable(request) is not None:
            return None
        tokens = request.all_token_ids if self.config.save_decoded else request.prompt_token_ids
        block_tokens = self.config.block_tokens
        num_full = min(num_computed_tokens, len(tokens)) // block_tokens
        num_full = min(num_full, len(tracked.block_ids))
        first = tracked.stored_blocks
        if num_full <= first:
            return None
        hashed = len(tracked.keys)
        if hashed < num_full:
            # Only the blocks not hashed yet: a long decode adds a block at a time.
            tail = list(tokens[hashed * block_tokens : num_full * block_tokens])
            after = tracked.keys[-1] if hashed else None
            tracked.keys.extend(self._request_keys(request, tail, after))
        tracked.stored_blocks = num_full
        tracked.saves_scheduled = True
        skip_stored, tracked.stored_unknown = tracked.stored_unknown, False
        return SaveSpec(
            request_id=request.request_id,
            keys=tracked.keys[first:num_full],
            block_ids=tracked.block_ids[first:num_full],
            parent_key=tracked.keys[first - 1] if first else b"",
            skip_stored=skip_stored,
        )

    # -- request_finished, update_connector_output ------------------------------------------

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._plans.pop(request.request_id, None)
        self._drop_prefetch(request.request_id)
        tracked = self._tracked.pop(request.request_id, None)
        session = _param(request, SESSION_PARAM, None)
        session_id = str(session) if session is not None else None
        if _param(request, SESSION_END_PARAM, False):
            # Even for a request that never ran (aborted while waiting): the session is over.
            self._end_session(session_id)
            return (tracked.saves_scheduled if tracked is not None else False), None
        if tracked is None:
            return False, None
        if self.config.pin_ttl_s > 0:
            chain = tracked.keys[: tracked.stored_blocks]
            if tracked.saves_scheduled:
                self._pin_after_save[request.request_id] = (session_id, chain)
            else:
                self._pin(session_id, chain)
        # With saves scheduled the worker still reads the blocks: vLLM keeps them until the
        # worker lists the request in finished_sending.
        return tracked.saves_scheduled, None

    def update_connector_output(self, connector_output: Any) -> None:
        failed = set(getattr(connector_output, "invalid_block_ids", None) or ())
        if failed:
            self._forget_failed(failed)
        for req_id in connector_output.finished_sending or ():
            pending = self._pin_after_save.pop(req_id, None)
            if pending is not None:
                self._pin(*pending)
        stats = getattr(connector_output, "kv_connector_stats", None)
        data = getattr(stats, "data", stats)
        if isinstance(data, dict):
            rate = data.get("fetch_bytes_per_s")
            if isinstance(rate, int | float) and rate > 0:
                self._fetch_bytes_per_s = float(rate)
                self._bandwidth_measured = True
            for key, value in data.items():
                tier = key.removeprefix(TIER_RATE_PREFIX)
                if tier != key and isinstance(value, int | float) and value > 0:
                    self._tier_bytes_per_s[tier] = float(value)
            prefill = data.get("prefill_tokens_per_s")
            if isinstance(prefill, int | float) and prefill > 0:
                self._measured_prefill_tokens_per_s = float(prefill)

    def _forget_failed(self, failed: set[int]) -> None:
        """Blocks that failed to load are recomputed by vLLM, and the step's saves after
        them were dropped by the worker: save them again from the first failed block."""
        for tracked in self._tracked.values():
            positions = [i for i, block in enumerate(tracked.block_ids) if block in failed]
            if positions:
                tracked.stored_blocks = min(tracked.stored_blocks, positions[0])

    @property
    def fetch_bytes_per_s(self) -> float | None:
        """The bandwidth the plans use: the workers' latest measure, else the configured one."""
        return self._fetch_bytes_per_s

    def _pin(self, session_id: str | None, chain: list[bytes]) -> None:
        """Pin `chain` for `pin_ttl_s`. A session's chain is remembered until the session
        ends (to unpin it then) or its pin expires; a request of no session is not: its
        pin simply expires."""
        if not chain:
            return
        if session_id is not None:
            now = time.monotonic()
            self._sessions.pop(session_id, None)
            self._sessions[session_id] = _SessionPin(chain, now + self.config.pin_ttl_s)
            # Entries are in expiry order (every pin lasts pin_ttl_s): drop the expired
            # ones of sessions that never ended, so abandoned sessions hold no memory.
            while self._sessions:
                oldest = next(iter(self._sessions.values()))
                if oldest.expires_s > now:
                    break
                del self._sessions[next(iter(self._sessions))]
        self._control_call(self._client.pin(chain, self.config.pin_ttl_s))

    def _end_session(self, session_id: str | None) -> None:
        if session_id is None:
            return
        # A pin still waiting for an earlier turn's saves must not pin the ended session.
        for req_id, (pending_session, _) in list(self._pin_after_save.items()):
            if pending_session == session_id:
                del self._pin_after_save[req_id]
        pinned = self._sessions.pop(session_id, None)
        if pinned is not None and pinned.expires_s > time.monotonic():
            self._control_call(self._client.unpin(pinned.chain))

    def _control_call(self, coroutine: Any) -> None:
        # Pins run on the loop thread: the scheduler's step does not wait on the network.
        future = self._loop.submit(coroutine)
        future.add_done_callback(_log_failure)
        self._control = [call for call in self._control if not call.done()] + [future]

    def wait_for_control_calls(self, timeout: float | None = None) -> None:
        """Wait for the pins and unpins sent so far (tests and shutdown)."""
        concurrent.futures.wait(self._control, timeout)

    def shutdown(self) -> None:
        if not self._loop.running:
            return
        for request_id in list(self._prefetched):
            self._drop_prefetch(request_id)
        self.wait_for_control_calls(self.config.options.timeouts.control)
        if self._mirror is not None:
            self._mirror.close()
        self._blocking.close()
        self._loop.run(self._client.close())
        self._loop.stop()


def _uncacheable(request: Any) -> str | None:
    """Why a request's KV cannot be keyed by its token ids alone, or None."""
    if getattr(request, "prompt_token_ids", None) is None:
        return "no store: the prompt is given as embeddings, not token ids"
    for name in ("mm_features", "mm_hashes", "mm_positions"):
        if getattr(request, name, None):
            return "no store: multimodal inputs make its KV more than its token ids"
    return None


def _request_salt(request: Any) -> bytes:
    """What besides its tokens decides a request's KV, length-prefixed so that no two
    requests' salts run together: its LoRA adapter and its cache salt."""
    lora = getattr(request, "lora_request", None)
    adapter = getattr(lora, "lora_name", None) or getattr(lora, "lora_int_id", None)
    salt = b""
    for tag, value in ((b"lora", adapter), (b"salt", getattr(request, "cache_salt", None))):
        if value is not None:
            encoded = str(value).encode()
            salt += tag + len(encoded).to_bytes(4, "little") + encoded
    return salt


def _resumed_req_ids(cached: Any) -> set[str]:
    """The cached requests back from preemption this step: `resumed_req_ids` in current
    vLLM, a `resumed_from_preemption` flag per request in older releases."""
    resumed = getattr(cached, "resumed_req_ids", None)
    if resumed is not None:
        return set(resumed)
    flags = getattr(cached, "resumed_from_preemption", None) or ()
    return {req_id for req_id, flag in zip(cached.req_ids, flags, strict=False) if flag}


def _no_fetch(reason: str) -> FetchPlan:
    return FetchPlan(num_load_blocks=0, fetch_s=0.0, recompute_s=0.0, reason=reason)


def _param(request: Any, key: str, default: Any) -> Any:
    params = getattr(request, "kv_transfer_params", None) or {}
    return params.get(key, default)


def _log_failure(future: concurrent.futures.Future[int]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("kvstore pin/unpin failed: %s", future.exception())
