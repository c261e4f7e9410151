"""`kvstore-bench sync-lookup`: a blocking caller's lookup, from its own thread against
through a loop thread.

A blocking caller (the vLLM scheduler, any code that uses `SyncKVClient`) waits for each
lookup. `SyncKVClient` sends it from the calling thread on a data-plane connection of
its own (kvstore.client._blocking_lookup); the baseline is what it did before, and what
a caller does with its own event-loop thread: the async `KVClient` on that loop, each
lookup handed over with `asyncio.run_coroutine_threadsafe`. Both look up the same chain
of `--keys` blocks (all stored) on one daemon in its own process, taking turns call by
call, back to back ("busy") and after `--idle-ms` without a call ("after idle", as a
request that arrives at an idle engine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch

from kvstore.bench.spawn import spawned_server
from kvstore.client import DType, KVClient, KVForm, KVLayout, Namespace, SyncKVClient
from kvstore.codec import expected_shape

_LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=16, dtype=DType.FLOAT16, block_tokens=16)
_WARMUP = 20
T = TypeVar("T")


@dataclass(frozen=True)
class SyncLookupReport:
    keys: int
    gap: str  # "busy" or "after N ms idle"
    calls: int
    caller_thread_p50_ms: float
    caller_thread_p90_ms: float
    loop_thread_p50_ms: float
    loop_thread_p90_ms: float

    @property
    def ratio(self) -> float:
        """The calling thread's p50 over the loop thread's: below 1 is faster."""
        return self.caller_thread_p50_ms / self.loop_thread_p50_ms


def add_sync_lookup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keys", type=int, default=64, help="blocks in the chain looked up")
    parser.add_argument("--calls", type=int, default=200, help="lookups per path and gap")
    parser.add_argument(
        "--idle-ms", type=float, default=40.0, help="the pause before each 'after idle' call"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_sync_lookup(args: argparse.Namespace) -> int:
    if args.keys < 1 or args.calls < 2 or args.idle_ms <= 0:
        raise SystemExit(
            "kvstore-bench sync-lookup: --keys must be at least 1, --calls at least 2 and "
            "--idle-ms above 0"
        )
    reports = measure(args.keys, args.calls, args.idle_ms / 1000)
    if args.json:
        print(json.dumps([asdict(report) | {"ratio": report.ratio} for report in reports]))
        return 0
    print(f"lookups of a {args.keys}-key chain, all stored, one daemon in its own process")
    print(f"{'gap':<20} {'calling thread p50/p90':>24} {'loop thread p50/p90':>22} {'ratio':>7}")
    for report in reports:
        mine = f"{report.caller_thread_p50_ms:.3f} / {report.caller_thread_p90_ms:.3f} ms"
        loop = f"{report.loop_thread_p50_ms:.3f} / {report.loop_thread_p90_ms:.3f} ms"
        print(f"{report.gap:<20} {mine:>24} {loop:>22} {report.ratio:>6.2f}x")
    return 0


def measure(num_keys: int, calls: int, idle_s: float) -> list[SyncLookupReport]:
    namespace = Namespace(tenant="bench", model_fingerprint="sync-lookup", layout=_LAYOUT)
    tokens = list(range(num_keys * _LAYOUT.block_tokens))
    with spawned_server([]) as target, SyncKVClient(target, namespace) as client:
        blocks = torch.zeros(expected_shape(_LAYOUT, KVForm.BLOCKS, num_keys), dtype=torch.float16)
        client.put(tokens, blocks, form=KVForm.BLOCKS)
        keys = client.keys(tokens)
        with _LoopThreadClient(target, namespace) as baseline:
            paths: dict[str, Callable[[], int]] = {
                "caller": lambda: client.lookup_keys(keys).num_matched,
                "loop": lambda: baseline.lookup_matched(keys),
            }
            for _ in range(_WARMUP):
                for lookup in paths.values():
                    _check(lookup(), num_keys)
            return [
                _report(num_keys, "busy", paths, calls, 0.0),
                _report(num_keys, f"after {idle_s * 1000:g} ms idle", paths, calls, idle_s),
            ]


def _report(
    num_keys: int, gap: str, paths: dict[str, Callable[[], int]], calls: int, idle_s: float
) -> SyncLookupReport:
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(calls):
        for name, lookup in paths.items():  # turns, so drift lands on both alike
            if idle_s:
                time.sleep(idle_s)
            started = time.perf_counter()
            matched = lookup()
            times[name].append((time.perf_counter() - started) * 1000)
            _check(matched, num_keys)

    def p90(values: list[float]) -> float:
        return statistics.quantiles(values, n=10)[-1]

    return SyncLookupReport(
        keys=num_keys,
        gap=gap,
        calls=calls,
        caller_thread_p50_ms=statistics.median(times["caller"]),
        caller_thread_p90_ms=p90(times["caller"]),
        loop_thread_p50_ms=statistics.median(times["loop"]),
        loop_thread_p90_ms=p90(times["loop"]),
    )


def _check(matched: int, num_keys: int) -> None:
    if matched != num_keys:
        raise RuntimeError(f"a lookup matched {matched} of {num_keys} stored blocks")


class _LoopThreadClient:
    """The async client on an event loop of its own thread, called from another."""

    def __init__(self, target: str, namespace: Namespace) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def create() -> KVClient:
            return KVClient(target, namespace)

        self._client = self._run(create())

    def lookup_matched(self, keys: list[bytes]) -> int:
        return self._run(self._client.lookup_keys(keys)).num_matched

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> _LoopThreadClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
