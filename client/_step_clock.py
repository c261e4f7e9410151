"""How long a vLLM step's forward pass took, for the connector's prefill-rate samples.

On the CPU the host runs the forward pass itself: the wall time from `start_load_kv` to
`wait_for_save` is the step. On CUDA the host only enqueues kernels and returns long
before the GPU is done, so that wall time measures launches, not compute: CUDA events
recorded on the current stream at both ends time it instead, and are read once the GPU
has passed the second one (at a later step, or when stats are asked for), never by
waiting for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# CUDA steps ended on the host whose events the GPU has not reached yet, at most.
_MAX_PENDING = 64


@dataclass
class _PendingStep:
    start: torch.cuda.Event
    end: torch.cuda.Event
    num_tokens: int


class StepClock:
    """Times steps on `device`; `finished()` yields (tokens, seconds) of timed steps."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._started_s: float | None = None
        self._start_event: torch.cuda.Event | None = None
        self._num_tokens = 0
        self._pending: list[_PendingStep] = []  # CUDA: ended on the host, maybe not the GPU
        self._done: list[tuple[int, float]] = []

    def start(self, num_tokens: int) -> None:
        self._num_tokens = num_tokens
        if self._cuda:
            self._start_event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            self._start_event.record()
        else:
            self._started_s = time.perf_counter()

    def cancel(self) -> None:
        """The step is not a sample (it waited on the network)."""
        self._started_s = None
        self._start_event = None

    def end(self) -> None:
        if self._cuda:
            if self._start_event is not None:
                end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                end.record()
                self._pending.append(_PendingStep(self._start_event, end, self._num_tokens))
                del self._pending[:-_MAX_PENDING]
            self._start_event = None
            return
        if self._started_s is not None:
            self._done.append((self._num_tokens, time.perf_counter() - self._started_s))
        self._started_s = None

    def finished(self) -> list[tuple[int, float]]:
        """The steps timed since the last call, as (tokens, seconds), oldest first."""
        while self._pending and self._pending[0].end.query():  # type: ignore[no-untyped-call]
            step = self._pending.pop(0)
            seconds = step.start.elapsed_time(step.end) / 1e3  # elapsed_time is in ms
            self._done.append((step.num_tokens, seconds))
        done, self._done = self._done, []
        return done
