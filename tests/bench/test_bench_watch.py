"""kvstore-bench watch, run small: a server process, watcher processes, the ratio."""

from __future__ import annotations

import json

import pytest

from kvstore.bench.cli import main as bench_main


@pytest.mark.slow
def test_watch_reports_the_ratio_and_checks_every_watcher_saw_every_block(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["watch", "--watchers", "2", "--puts", "10", "--rounds", "1", "--control-wakers"]
    argv.append("--json")
    assert bench_main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["every_watcher_saw_every_block"] is True
    assert results["watchers"] == 2
    assert len(results["rounds_none"]) == len(results["rounds_watched"]) == 1
    assert len(results["rounds_wakers"]) == 1
    assert results["blocks_per_s_wakers"] > 0
    for name in ("blocks_per_s", "server_cpu_us_per_block"):
        none, watched = results[f"{name}_none"], results[f"{name}_watched"]
        assert none > 0
        assert watched > 0
        assert results[f"{name}_ratio"] == pytest.approx(watched / none)


def test_watch_needs_a_watcher() -> None:
    with pytest.raises(SystemExit, match="--watchers must be >= 1"):
        bench_main(["watch", "--watchers", "0"])
