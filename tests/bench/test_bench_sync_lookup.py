"""`kvstore-bench sync-lookup`: both paths look up the stored chain, and the report says
each one's latency and their ratio."""

from __future__ import annotations

import json

import pytest

from kvstore.bench.cli import main


def test_both_paths_answer_every_lookup_and_the_ratio_is_theirs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["sync-lookup", "--keys", "8", "--calls", "4", "--idle-ms", "2", "--json"]) == 0
    busy, idle = json.loads(capsys.readouterr().out)
    assert (busy["gap"], idle["gap"]) == ("busy", "after 2 ms idle")
    for report in (busy, idle):
        assert report["keys"] == 8
        assert report["calls"] == 4
        assert 0 < report["caller_thread_p50_ms"] <= report["caller_thread_p90_ms"]
        assert 0 < report["loop_thread_p50_ms"] <= report["loop_thread_p90_ms"]
        assert report["ratio"] == pytest.approx(
            report["caller_thread_p50_ms"] / report["loop_thread_p50_ms"]
        )


def test_bad_arguments_are_refused_before_a_daemon_starts() -> None:
    with pytest.raises(SystemExit, match="--keys must be at least 1"):
        main(["sync-lookup", "--keys", "0"])
    with pytest.raises(SystemExit, match="--calls at least 2"):
        main(["sync-lookup", "--calls", "1"])
