"""`kvstore-bench wire-lz4`'s measurement on a real server: the three modes deliver the
stored bytes, lz4 shrinks narrow-range KV on the wire, and auto chooses it on a slow link."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from kvstore.bench.cli import build_parser
from kvstore.bench.lz4 import layout_of, prefill_kv
from kvstore.bench.wire_lz4 import MODES, _measure, bench_datasets
from kvstore.layout import Namespace
from kvstore.server import RunningServer

ServerFactory = Callable[..., Awaitable[RunningServer]]
MB = 1000**2


async def test_a_slow_link_measures_every_mode_and_auto_chooses_lz4(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(store__read_bytes_per_s={"dram": 8 * MB})
    config, kv = prefill_kv(128)  # 2 pages of 256 KiB
    blocks = bench_datasets(kv, ["narrow"])["narrow"]
    layout = layout_of(config, blocks.dtype)
    namespace = Namespace(tenant="bench", model_fingerprint="wire-narrow", layout=layout)
    gbps, ratio, asked, rates = await _measure(
        f"127.0.0.1:{server.port}", namespace, blocks, copies=4, rounds=2, grpc_only=False
    )
    assert set(gbps) == set(ratio) == set(MODES)
    assert all(value > 0 for value in gbps.values())
    assert ratio["off"] == 1.0
    assert ratio["lz4"] > 1.5
    assert asked >= 1
    assert rates["link"] is not None
    assert rates["link"] < 1.5 * 8 * MB


def test_the_command_is_registered() -> None:
    args = build_parser().parse_args(["wire-lz4", "--throttle", "50MB", "--grpc"])
    assert (args.throttle, args.grpc, args.rounds) == ("50MB", True, 3)
