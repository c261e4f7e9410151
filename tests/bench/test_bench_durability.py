"""kvstore-bench durability: run tiny against four real daemons, and its guard."""

from __future__ import annotations

import json

import pytest

from kvstore.bench.cli import main as bench_main
from kvstore.bench.cost import CpuCost, Phase
from kvstore.bench.durability import SETTINGS, _rows, _Run
from kvstore.enums import Durability

ROUND_BYTES = 1 << 20


@pytest.mark.slow
def test_durability_command_puts_into_every_setting_and_says_what_each_promised(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["durability", "--block", "128KiB", "--total", "1MiB", "--rounds", "1"]
    assert bench_main([*args, "--chunk", "64KiB", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["round_bytes"], report["rounds"]) == (ROUND_BYTES, 1)
    rows = {row["setting"]: row for row in report["rows"]}
    assert list(rows) == ["DRAM only", "write-back", "write-through", "write-through + fsync"]
    assert [row["durability"] for row in rows.values()] == [
        "DURABLE_IN_MEMORY",
        "DURABLE_IN_MEMORY",
        "DURABLE_ON_SSD",
        "DURABLE_ON_SSD_FSYNCED",
    ]
    for row in rows.values():
        assert row["put_gbps"] > 0
        assert row["put_cpu"]["client_s_per_gb"] > 0
        assert row["put_cpu"]["server_s_per_gb"] > 0
    assert rows["DRAM only"]["ratio"] == 1.0
    # One round: each ratio is that round's ratio of the two speeds.
    for name in ("write-back", "write-through", "write-through + fsync"):
        expected = rows[name]["put_gbps"] / rows["DRAM only"]["put_gbps"]
        assert rows[name]["ratio"] == pytest.approx(expected)
    # Every block of the warm-up round and the measured one was written, once.
    for name in ("write-through", "write-through + fsync"):
        assert rows[name]["ssd_bytes_written"] == 2 * ROUND_BYTES
    # DRAM holds two rounds: write-back never needed the disk; DRAM-only has none.
    assert rows["write-back"]["ssd_bytes_written"] == 0
    assert rows["DRAM only"]["ssd_bytes_written"] == 0


def _run(durabilities: set[Durability | None]) -> _Run:
    phase = Phase(gbps=1.0, cpu=CpuCost(client_s_per_gb=1.0, server_s_per_gb=1.0))
    return _Run(puts=[phase], durabilities=durabilities, ssd_bytes_written=0)


def test_a_setting_whose_replies_promise_less_is_an_error_not_a_figure() -> None:
    runs = {setting.name: _run({setting.promised}) for setting in SETTINGS}
    assert [row.ratio for row in _rows(runs)] == [1.0] * len(SETTINGS)
    # One write-through put the SSD could not take: that daemon measured something else.
    runs["write-through"] = _run({Durability.DURABLE_ON_SSD, Durability.DURABLE_IN_MEMORY})
    with pytest.raises(RuntimeError, match="write-through: the puts' replies said"):
        _rows(runs)
    # A server too old to say: no figure either.
    runs["write-through"] = _run({None})
    with pytest.raises(RuntimeError, match="not only DURABLE_ON_SSD"):
        _rows(runs)


def test_a_dram_smaller_than_a_round_is_refused_before_any_daemon_starts() -> None:
    args = ["durability", "--block", "128KiB", "--total", "2MiB", "--dram-bytes", "1MiB"]
    with pytest.raises(SystemExit, match="--dram-bytes must hold a round"):
        bench_main(args)
