"""`kvstore-bench disagg miss`: misses through the connector against recompute, per
variant (save mode, block view), the tiny model and a spawned daemon."""

from __future__ import annotations

import json

import pytest

from kvstore.bench.disagg.cli import main
from kvstore.bench.disagg.serving import model_config


def test_each_variant_reports_paired_ratios_and_saves_every_block(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["miss", "--model", "tiny", "--prompt-tokens", "64", "--repeats", "2"]
    assert main([*argv, "--threads", "1", "--device", "cpu", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [report["variant"] for report in reports] == [
        {"save_during_forward": True, "block_view": False, "save": True},
        {"save_during_forward": False, "block_view": False, "save": True},
        {"save_during_forward": False, "block_view": True, "save": True},
        {"save_during_forward": False, "block_view": True, "save": False},
    ]
    # A lookup told each miss, but where the block view did.
    assert [report["decisions"] for report in reports] == [
        {"miss": 2},
        {"miss": 2},
        {"miss, by the block view": 2},
        {"miss, by the block view": 2},
    ]
    blocks_per_prompt = 64 // model_config("tiny").page_tokens
    for report in reports:
        assert len(report["ratios"]) == 2
        assert all(ratio > 0 for ratio in report["ratios"])
        # and against the same engine without a store, round by round
        assert len(report["no_store_ratios"]) == 2
        assert all(ratio > 0 for ratio in report["no_store_ratios"])
        assert all(0 < match_ms < 1000 for match_ms in report["match_ms"])
        # Each miss was saved whole, whichever the mode (it was a miss, not a hit), but
        # where the request asked for no save.
        saved = 2 * blocks_per_prompt if report["variant"]["save"] else 0
        assert report["saved_blocks"] == saved


def test_no_pairs_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["miss", "--model", "tiny", "--prompt-tokens", "64", "--repeats", "0", "--json"]
    assert main(argv) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
