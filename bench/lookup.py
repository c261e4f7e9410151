"""`kvstore-bench lookup`: LookupPrefix latency for a long chain, client to server process.

Puts a chain of `--keys` small blocks, then times lookups of the whole chain (all
hits), of a chain that misses at its first key, and of no keys at all, one call at a
time from one client. "hit" goes over the client's lookup streams (open
LookupPrefixStream calls); "hit, unary" is the same lookup as a unary LookupPrefix call;
"hit, data plane" is the same lookup as a LOOKUP frame on the TCP data plane.

The baselines, measured in the same run, are plain grpcio carrying the same request
bytes to a server that answers 8 bytes, without protobuf or any kvstore code: as one
message on an open stream ("plain grpcio stream", the floor for the streamed cases)
and as a unary call ("plain grpcio unary", the floor for "hit, unary"). Those are the
floors for any lookup through Python gRPC on this machine. The cases take turns in
short rounds, so a shift in the machine's speed lands on all of them alike. Each
server runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import torch

from kvstore.allocator import tune_allocator
from kvstore.bench.ceiling import OPTIONS, StreamCall, unary_call
from kvstore.bench.lookup_load import add_under_load_arguments, run_under_load
from kvstore.bench.nodes import add_nodes_argument, check_nodes, local_cluster
from kvstore.bench.spawn import spawned_ceiling_server, spawned_server
from kvstore.client import ClientOptions, DType, KVClient, KVForm, KVLayout, Namespace
from kvstore.wire.lookup import encode_lookup_request

_LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=16, dtype=DType.FLOAT16, block_tokens=16)
_ROUNDS = 10
_WARMUP = 20
STREAM_FLOOR = "plain grpcio stream"
UNARY_FLOOR = "plain grpcio unary"
UNARY_HIT = "hit, unary"
AUTH_HIT = "hit, with auth"
DATA_PLANE_HIT = "hit, data plane"
AUTH_UNARY_HIT = "hit, unary, with auth"
# Which floor each case is measured against.
FLOOR_OF = {
    STREAM_FLOOR: STREAM_FLOOR,
    UNARY_FLOOR: UNARY_FLOOR,
    "no keys": STREAM_FLOOR,
    "hit": STREAM_FLOOR,
    "miss": STREAM_FLOOR,
    UNARY_HIT: UNARY_FLOOR,
    DATA_PLANE_HIT: STREAM_FLOOR,
    AUTH_HIT: STREAM_FLOOR,
    AUTH_UNARY_HIT: UNARY_FLOOR,
}
# The same lookup without authentication, for the cost of a token.
WITHOUT_AUTH = {AUTH_HIT: "hit", AUTH_UNARY_HIT: UNARY_HIT}
GOAL_P50_MS = 1.0
GOAL_AUTH_MS = 0.05


async def _timed(call: Callable[[], Awaitable[object]], iterations: int) -> list[float]:
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


async def measure_lookups(
    target: str,
    ceiling_target: str,
    num_keys: int,
    iterations: int,
    auth: tuple[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Every case's latency; with `auth` (a daemon that authenticates, and a token it
    accepts), the hits there too, streamed and unary."""
    namespace = Namespace(tenant="bench", model_fingerprint="lookup", layout=_LAYOUT)
    tokens = np.arange(num_keys * _LAYOUT.block_tokens, dtype=np.int64)
    auth_target, token = auth if auth is not None else (target, None)
    async with (
        KVClient(target, namespace, options=ClientOptions(data_plane=False)) as client,
        KVClient(
            target, namespace, options=ClientOptions(lookup_streams=0, data_plane=False)
        ) as unary_client,
        KVClient(target, namespace) as data_plane_client,
        KVClient(
            auth_target, namespace, options=ClientOptions(token=token, data_plane=False)
        ) as auth_client,
        KVClient(
            auth_target,
            namespace,
            options=ClientOptions(lookup_streams=0, token=token, data_plane=False),
        ) as auth_unary_client,
        grpc.aio.insecure_channel(ceiling_target, options=OPTIONS) as ceiling,
    ):
        keys = client.keys(tokens)
        kv = torch.zeros((num_keys, 1, *_LAYOUT.layer_shape), dtype=torch.float16)
        await client.put_blocks(keys, kv, form=KVForm.BLOCKS)
        lookups = [client.lookup_keys, unary_client.lookup_keys, data_plane_client.lookup_keys]
        if auth is not None:
            await auth_client.put_blocks(keys, kv, form=KVForm.BLOCKS)
            lookups += [auth_client.lookup_keys, auth_unary_client.lookup_keys]
        missing = [b"absent-" + key[:16] for key in keys]
        for lookup in lookups:
            if (await lookup(keys)).num_matched != num_keys:
                raise RuntimeError("the chain was not stored")
            if (await lookup(missing)).num_matched != 0:
                raise RuntimeError("a chain that was never stored matched")
        # The same bytes a hit's LookupPrefix carries, sent as one raw message.
        request = encode_lookup_request(keys)
        raw_call = unary_call(ceiling)
        raw_stream = StreamCall(ceiling)
        cases: dict[str, Callable[[int], Awaitable[list[float]]]] = {
            STREAM_FLOOR: lambda count: _timed(lambda: raw_stream(request), count),
            UNARY_FLOOR: lambda count: _timed(lambda: raw_call(request), count),
            "no keys": lambda count: _timed(lambda: client.lookup_keys([]), count),
            "hit": lambda count: _timed(lambda: client.lookup_keys(keys), count),
            "miss": lambda count: _timed(lambda: client.lookup_keys(missing), count),
            UNARY_HIT: lambda count: _timed(lambda: unary_client.lookup_keys(keys), count),
            DATA_PLANE_HIT: lambda count: _timed(
                lambda: data_plane_client.lookup_keys(keys), count
            ),
        }
        if auth is not None:
            cases[AUTH_HIT] = lambda count: _timed(lambda: auth_client.lookup_keys(keys), count)
            cases[AUTH_UNARY_HIT] = lambda count: _timed(
                lambda: auth_unary_client.lookup_keys(keys), count
            )
        for case in cases.values():
            await case(_WARMUP)
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for round_index in range(_ROUNDS):  # `iterations` calls per case in all
            count = iterations // _ROUNDS + (round_index < iterations % _ROUNDS)
            for name, case in cases.items():
                if count:
                    samples[name] += await case(count)
        raw_stream.close()
    results = {}
    for name, seconds in samples.items():
        ms = np.array(seconds) * 1000
        results[name] = {
            "calls": len(seconds),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()),
        }
    for name, row in results.items():
        row["p50_ratio_to_floor"] = row["p50_ms"] / results[FLOOR_OF[name]]["p50_ms"]
    return results


def add_lookup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keys", type=int, default=1000, help="blocks in the chain")
    parser.add_argument("--iterations", type=int, default=1000, help="timed calls per case")
    parser.add_argument(
        "--target",
        help="HOST:PORT of a running server, or a cluster: etcd://HOST:PORT/PREFIX or "
        "cluster://H1:P1,H2:P2 (default: start one)",
    )
    add_nodes_argument(parser)
    parser.add_argument(
        "--compare-auth",
        action="store_true",
        help="also start a daemon with a tokens file and time the hits there with a token: "
        "what authentication adds (not with --target)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_under_load_arguments(parser)


_DRAM_BYTES = 256 << 20
_PAGE_BYTES = 64 << 10
_SERVER_ARGS = ["--dram-bytes", str(_DRAM_BYTES), "--log-level", "warning"]


def run_lookup(args: argparse.Namespace) -> int:
    if args.iterations < 1:
        raise SystemExit("kvstore-bench lookup: --iterations must be at least 1")
    if args.under_load is not None:
        if args.nodes is not None:
            raise SystemExit(
                "kvstore-bench lookup: --under-load measures one daemon beside its load "
                "processes; drop --nodes (or measure a cluster's lookups without --under-load)"
            )
        return run_under_load(args)
    tune_allocator()
    if args.compare_auth and (args.target or args.nodes):
        raise SystemExit(
            "kvstore-bench lookup: --compare-auth starts its own daemon; drop --target and --nodes"
        )
    nodes = check_nodes(args, "lookup")
    with contextlib.ExitStack() as stack:
        ceiling_target = stack.enter_context(spawned_ceiling_server())
        if args.target:
            target = args.target
        elif nodes is not None:
            cluster = local_cluster(
                nodes,
                total_dram_bytes=_DRAM_BYTES,
                page_bytes=_PAGE_BYTES,
                server_args=["--log-level", "warning"],
            )
            target = stack.enter_context(cluster).etcd_target
        else:
            target = stack.enter_context(spawned_server(_SERVER_ARGS))
        auth = None
        if args.compare_auth:
            token = secrets.token_urlsafe(32)
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            tokens_file = folder / "tokens.toml"
            digest = hashlib.sha256(token.encode()).hexdigest()
            tokens_file.write_text(f'[[tokens]]\nsha256 = "{digest}"\ntenant = "bench"\n')
            auth_args = [*_SERVER_ARGS, "--tokens-file", str(tokens_file)]
            auth = (stack.enter_context(spawned_server(auth_args)), token)
        results = asyncio.run(
            measure_lookups(target, ceiling_target, args.keys, args.iterations, auth)
        )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"LookupPrefix of a {args.keys}-key chain, {args.iterations} sequential calls per case:")
    for name, row in results.items():
        print(
            f"  {name:20}  p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  "
            f"max {row['max_ms']:.3f} ms  (p50 {row['p50_ratio_to_floor']:.2f}x {FLOOR_OF[name]})"
        )
    print(
        "  (plain grpcio: the hit's request bytes, answered by 8 bytes, as one message on an "
        "open stream or as a unary call)"
    )
    verdict = "met" if results["hit"]["p50_ms"] <= GOAL_P50_MS else "not met"
    print(f"  goal: hit p50 <= {GOAL_P50_MS:.0f} ms: {verdict}")
    for name, plain in WITHOUT_AUTH.items():
        if name in results:
            added_ms = results[name]["p50_ms"] - results[plain]["p50_ms"]
            verdict = "met" if added_ms <= GOAL_AUTH_MS else "not met"
            print(
                f"  authentication adds {added_ms:+.3f} ms to the p50 of '{plain}' "
                f"(goal <= +{GOAL_AUTH_MS} ms: {verdict})"
            )
    return 0
