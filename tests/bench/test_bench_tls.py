"""kvstore-bench tls: run tiny against two real daemons (plaintext and TLS)."""

from __future__ import annotations

import json

import pytest

from kvstore.bench.cli import main as bench_main

BLOCK_SIZES = [128 << 10, 256 << 10]


@pytest.mark.slow
def test_tls_command_reports_both_daemons_and_their_ratios(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["tls", "--blocks", "128KiB,256KiB", "--total", "1MiB", "--rounds", "1", "--json"]
    assert bench_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rounds"] == 1
    assert report["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert [row["block_bytes"] for row in report["rows"]] == BLOCK_SIZES
    for row in report["rows"]:
        assert row["round_bytes"] == 1 << 20
        for name in ("plain_put_gbps", "plain_get_gbps", "tls_put_gbps", "tls_get_gbps"):
            assert row[name] > 0
        # One round: each ratio is that round's TLS speed over its plaintext speed.
        assert row["put_ratio"] == pytest.approx(row["tls_put_gbps"] / row["plain_put_gbps"])
        assert row["get_ratio"] == pytest.approx(row["tls_get_gbps"] / row["plain_get_gbps"])
    ceiling = report["ceiling"]  # the ssl module alone, in the same run
    assert ceiling["round_bytes"] == 1 << 20
    for name in ("plain", "tls"):
        assert ceiling[f"{name}_gbps"] > 0
        assert ceiling[f"{name}_send_cpu_s_per_gb"] > 0
        assert ceiling[f"{name}_recv_cpu_s_per_gb"] > 0
    assert ceiling["ratio"] == pytest.approx(ceiling["tls_gbps"] / ceiling["plain_gbps"])


def test_tls_command_refuses_zero_rounds() -> None:
    with pytest.raises(SystemExit, match="--rounds"):
        bench_main(["tls", "--rounds", "0"])
