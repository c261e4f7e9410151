"""kvstore-bench lookup --under-load, and the bulk load behind it, run small against a
real daemon process and real load processes."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from kvstore.bench.bulk_load import BulkLoad
from kvstore.bench.cli import main as bench_main
from kvstore.bench.lookup_load import LOOKUP_LAYOUT as RESIDENT_LAYOUT
from kvstore.bench.lookup_load import ChainLookups
from kvstore.bench.throughput import layout_for
from kvstore.client import KVClient, Namespace, SyncKVClient

LOAD_NAMESPACE = Namespace(
    tenant="bench", model_fingerprint="bulk-load", layout=layout_for(1 << 20)
)


@pytest.mark.slow
def test_lookup_under_load_reports_both_phases_and_the_loop_lag(
    store_target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["lookup", "--keys", "64", "--under-load", "0.05", "--duration", "1.5"]
    args += ["--target", store_target]
    args += ["--load-processes", "1", "--load-transfer", "2MiB", "--json"]
    assert bench_main(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"idle", "loaded"}
    for row in results.values():
        assert row["num_lookups"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
        # The daemon's probe woke a dozen times or more in each phase: some lag, however small.
        assert row["loop_lag_max_ms"] >= row["loop_lag_p99_ms"] >= 0
        assert row["loop_lag_max_ms"] > 0
        assert 0 <= row["loop_lag_max_runqueue_ms"] <= row["loop_lag_max_ms"]
    assert results["idle"]["load_gbps"] == 0
    # Paced at 0.05 GB/s: it moved bytes, and not much faster than asked.
    assert 0 < results["loaded"]["load_gbps"] < 0.2


@pytest.mark.slow
def test_resident_blocks_add_a_filling_phase_and_stay_stored(
    store_target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["lookup", "--keys", "32", "--under-load", "0.05", "--duration", "1"]
    args += ["--target", store_target, "--resident-blocks", "2500"]
    args += ["--load-processes", "1", "--load-transfer", "2MiB", "--json"]
    assert bench_main(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert list(results) == ["idle", "filling", "loaded"]
    assert results["filling"]["num_lookups"] > 0
    assert results["filling"]["load_gbps"] == 0
    resident = Namespace(tenant="bench", model_fingerprint="resident", layout=RESIDENT_LAYOUT)
    with SyncKVClient(store_target, resident) as client:
        keys = [b"resident-%d" % index for index in range(2000, 2500)]  # the last chain
        assert client.lookup_keys(keys).num_matched == 500


@pytest.mark.slow
def test_the_bulk_load_moves_bytes_at_about_its_rate_and_leaves_nothing_stored(
    store_target: str,
) -> None:
    with (
        BulkLoad(store_target, 0.02, num_processes=1, transfer_bytes=2 << 20) as load,
        SyncKVClient(store_target, LOAD_NAMESPACE) as client,
    ):
        before = client.stats()
        load.start()
        time.sleep(1.5)
        result = load.stop()
        after = client.stats()
        num_cycles = -(-result.num_transfers // 2)
        stored = [
            client.lookup_keys([f"load0-c{cycle}-b{block}".encode()]).num_matched
            for cycle in range(num_cycles)
            for block in (0, 1)
        ]
    assert result.num_transfers >= 2  # a put and its get, at least
    assert result.bytes_moved == result.num_transfers * (2 << 20)
    assert result.gbps < 0.05  # paced: 2 MiB transfers at 0.02 GB/s are ~100 ms apart
    moved = after.bytes_put + after.bytes_got - before.bytes_put - before.bytes_got
    assert moved == result.bytes_moved
    # A process stops between cycles, and each cycle deletes what it put.
    assert stored == [0] * (2 * num_cycles)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate_gbps": 0}, "above 0"),
        ({"rate_gbps": 1, "num_processes": 0}, "at least one process"),
        ({"rate_gbps": 1, "block_bytes": 100_000}, "multiple of"),
        ({"rate_gbps": 1, "block_bytes": 1 << 20, "transfer_bytes": 1 << 19}, "at least one block"),
    ],
)
def test_a_bulk_load_with_bad_settings_is_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BulkLoad("127.0.0.1:1", **kwargs)  # type: ignore[arg-type]


def test_a_phase_times_after_its_warm_up_and_always_has_a_lookup(store_target: str) -> None:
    """On a busy machine the warm-up alone may outlast a phase: the phase starts after it,
    and a phase over before its first lookup still times one, so it has figures."""

    async def phases() -> tuple[list[float], list[float]]:
        namespace = Namespace(tenant="t", model_fingerprint="phase", layout=RESIDENT_LAYOUT)
        async with KVClient(store_target, namespace) as client:
            lookups = ChainLookups(client, num_keys=8)
            await lookups.store()
            return await lookups.run_for(0.0), await lookups.run_while(lambda: False)

    timed, while_going = asyncio.run(phases())
    assert len(timed) == 1
    assert len(while_going) == 1
    assert all(seconds > 0 for seconds in timed + while_going)
