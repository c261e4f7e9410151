"""`kvstore-bench transfer-cost`: a daemon's CPU per GB of TCP puts and small gets' p50,
measured against a real daemon, with the bytes checked."""

from __future__ import annotations

import json

import pytest

from kvstore.bench.cli import main


def test_each_block_size_reports_the_daemons_put_cost_and_both_paths_gets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    arguments = ["--put-bytes", "8MiB", "--chain-blocks", "8", "--rounds", "2", "--gets", "10"]
    assert main(["transfer-cost", "--block-sizes", "1MiB,128KiB", *arguments, "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [report["block_bytes"] for report in reports] == [1 << 20, 128 << 10]
    for report in reports:
        assert report["put_daemon_cpu_s_per_gb"] > 0
        assert report["put_gbps"] > 0
        assert report["get_blocks"] == 4
        assert report["get_p50_ms_shm"] > 0
        assert report["get_p50_ms_tcp"] > 0


def test_bad_arguments_are_refused_before_a_daemon_starts() -> None:
    with pytest.raises(SystemExit, match="--rounds must be at least 2"):
        main(["transfer-cost", "--rounds", "1"])
    with pytest.raises(SystemExit, match="at least 1"):
        main(["transfer-cost", "--get-blocks", "0"])
    with pytest.raises(SystemExit, match="multiple of"):
        main(["transfer-cost", "--block-sizes", "100KiB"])
