"""StepClock: a step's time on the CPU, and on CUDA from events read once the GPU is there."""

from __future__ import annotations

import time

import pytest
import torch

from kvstore.client._step_clock import StepClock


def test_a_cpu_step_is_timed_from_start_to_end_and_a_cancelled_one_not_at_all() -> None:
    clock = StepClock(torch.device("cpu"))
    clock.start(100)
    time.sleep(0.01)
    clock.end()
    clock.start(50)
    clock.cancel()
    clock.end()  # after a cancel: nothing to time
    [(num_tokens, seconds)] = clock.finished()
    assert num_tokens == 100
    assert seconds >= 0.01
    assert clock.finished() == []  # each step is handed out once


@pytest.mark.gpu
def test_a_cuda_step_is_timed_by_the_gpu_not_by_the_launches() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    clock = StepClock(torch.device("cuda"))
    matrix = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    clock.start(4096)
    host_started = time.perf_counter()
    for _ in range(20):
        matrix = matrix @ matrix / 64
    clock.end()
    launch_s = time.perf_counter() - host_started
    torch.cuda.synchronize()
    [(num_tokens, seconds)] = clock.finished()
    assert num_tokens == 4096
    # 20 matmuls of 4096^3 (2.7 TFLOP) keep a GPU busy for milliseconds; the host
    # only queued them, and returned long before: the clock times the GPU.
    assert seconds > 2 * launch_s
