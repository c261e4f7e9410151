"""`kvstore-bench peers`: kvstore beside LMCache's lm server. LMCache is no dependency of
kvstore: the side-by-side run needs a Python that has it, named by the environment
variable KVSTORE_LMCACHE_PYTHON (e.g. a venv with `pip install lmcache`); without one only
the refusal is tested."""

from __future__ import annotations

import json
import os
import sys

import pytest

from kvstore.bench.cli import main

LMCACHE_PYTHON = os.environ.get("KVSTORE_LMCACHE_PYTHON")


def test_a_python_without_lmcache_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit, match=r"cannot import lmcache; give --lmcache-python"):
        main(["peers", "--lmcache-python", sys.executable, "--rounds", "1"])
    with pytest.raises(SystemExit, match="cannot run --lmcache-python"):
        main(["peers", "--lmcache-python", "/nonexistent/python3", "--rounds", "1"])
    with pytest.raises(SystemExit, match="--rounds must be at least 1"):
        main(["peers", "--lmcache-python", sys.executable, "--rounds", "0"])


@pytest.mark.slow
@pytest.mark.skipif(LMCACHE_PYTHON is None, reason="KVSTORE_LMCACHE_PYTHON names no Python")
def test_both_stores_move_every_byte_and_the_ratios_are_per_round(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert LMCACHE_PYTHON is not None
    argv = ["peers", "--lmcache-python", LMCACHE_PYTHON, "--block-sizes", "1MiB"]
    assert main([*argv, "--total", "32MiB", "--rounds", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lmcache"]
    [row] = report["rows"]
    assert row["block_bytes"] == 1 << 20
    for op in ("put", "get"):
        for column in (f"{op}_gbps", f"tcp_{op}_gbps", f"lmcache_{op}_gbps"):
            assert row[column] > 0
        assert row[f"{op}_ratio"] > 0
        assert row[f"lmcache_{op}_cpu"]["server_s_per_gb"] >= 0
