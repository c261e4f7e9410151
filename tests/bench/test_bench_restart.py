"""`kvstore-bench restart` on a tiny dataset: it runs, its figures hang together, it cleans up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvstore.bench.cli import main as bench_main


@pytest.mark.slow  # two daemon starts
def test_restart_bench_on_a_tiny_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["restart", "--sizes", "1MiB", "--block-bytes", "32KiB", "--chain-blocks", "8"]
    assert bench_main([*args, "--workdir", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["num_files"] for row in rows] == [32]
    for row in rows:
        assert row["data_bytes"] == row["num_files"] * 32 * 1024
        assert row["file_bytes"] > row["data_bytes"]  # headers
        assert 0 < row["serving_s"] <= row["indexed_s"]
        assert min(row["empty_serving_s"], row["rebuild_s"], row["sequential_read_s"]) > 0
    assert list(tmp_path.iterdir()) == []  # the dataset is deleted
