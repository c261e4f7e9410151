"""LookupPrefix, whichever transport carried it: the gRPC unary and streamed calls
(kvstore.server.servicer) and the data plane's LOOKUP frame (kvstore.server.dataplane)
answer through this one function, so validation, authorization, limits, metrics and
the store's counters are identical."""

from __future__ import annotations

import asyncio
import time

from kvstore.server.auth import Caller
from kvstore.server.decode import MalformedRequest, open_keyed_request
from kvstore.server.replies import prefix_match_to_wire
from kvstore.server.request_metrics import RequestMetrics
from kvstore.store import BlockStore
from kvstore.v1 import kvstore_pb2 as pb


class Lookups:
    def __init__(self, store: BlockStore, max_keys: int) -> None:
        self._store = store
        self._max_keys = max_keys
        self.request_metrics: RequestMetrics | None = None  # the lookup histograms, if on

    def answer(
        self, request: pb.LookupPrefixRequest | MalformedRequest, caller: Caller
    ) -> pb.LookupPrefixResponse:
        started_s = time.perf_counter()
        _, namespace, keys = open_keyed_request(request, self._max_keys, allow_empty=True)
        caller.authorize(namespace.tenant)
        match = self._store.lookup(namespace, keys, defer_touch=True)
        # Runs after the handler returns, once the reply is on its way.
        asyncio.get_running_loop().call_soon(self._store.settle_touches)
        reply = prefix_match_to_wire(match)
        if self.request_metrics is not None:
            self.request_metrics.observe_lookup(
                time.perf_counter() - started_s, match.num_matched * match.block_bytes
            )
        return reply
