"""bench/gpu_check.sh and kvstore.bench.hbm_get, on this machine: without CUDA they
say so and exit 2; the HBM-tier get itself runs here on the emulated (CPU) tier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvstore.bench.hbm_get import NO_CUDA_EXIT
from kvstore.bench.hbm_get import main as hbm_get_main

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")


@no_cuda
def test_gpu_check_without_cuda_says_so_and_runs_nothing() -> None:
    done = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == NO_CUDA_EXIT
    assert "gpu_check: no CUDA here" in done.stderr
    assert "sees no CUDA device" in done.stderr
    assert "Nothing was run" in done.stderr
    assert "[1/2]" not in done.stdout  # no test and no get was started


@no_cuda
def test_hbm_get_on_cuda_without_cuda_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert hbm_get_main(["--device", "cuda"]) == NO_CUDA_EXIT
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_hbm_get_on_the_emulated_tier_checks_the_bytes_and_prints_gbps(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The whole measurement on CPU: a daemon with an emulated HBM tier, blocks promoted
    into it (or the run fails), gets checked byte for byte."""
    assert hbm_get_main(["--device", "cpu", "--total", "8MiB", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "HBM-tier get into a cpu tensor" in out
    assert "GB/s" in out
