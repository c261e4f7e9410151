"""What moving bytes costs: wall-clock GB/s, and CPU seconds per GB on each side.

On the 2-core reference machine the client and the server share the cores, so CPU per
GB, not the network, sets how fast a put or a get can go: `cores / (client + server
CPU per GB)` is its upper bound. CPU per GB is also what sizes a deployment: how many
server cores a given transfer rate needs.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

# Reads the server process's CPU seconds (user + system, all threads) over its own API.
ServerCpu = Callable[[], Awaitable[float]]


@dataclass(frozen=True, slots=True)
class CpuCost:
    """CPU seconds per GB moved, of each process, all its threads."""

    client_s_per_gb: float
    server_s_per_gb: float

    @property
    def total_s_per_gb(self) -> float:
        return self.client_s_per_gb + self.server_s_per_gb

    def bound_gbps(self, cores: int | None = None) -> float:
        """The most GB/s both processes could move on `cores` cores (default: those
        this process may run on) at this cost."""
        return (usable_cores() if cores is None else cores) / self.total_s_per_gb


def usable_cores() -> int:
    """The cores this process may run on (its affinity), not all the machine has."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class Phase:
    """One timed put or get."""

    gbps: float
    cpu: CpuCost


@dataclass(frozen=True, slots=True)
class Round:
    put: Phase
    get: Phase


async def timed_phase(
    nbytes: int, server_cpu: ServerCpu, work: Callable[[], Awaitable[object]]
) -> Phase:
    """Run `work`, which moves `nbytes`. The probes sit outside the timed span, and the
    server is read first and last, so the client's side of a probe is not counted."""
    server_before = await server_cpu()
    client_before = time.process_time()
    start = time.perf_counter()
    await work()
    elapsed = time.perf_counter() - start
    client_after = time.process_time()
    server_after = await server_cpu()
    gigabytes = nbytes / 1e9
    return Phase(
        gbps=gigabytes / elapsed,
        cpu=CpuCost(
            client_s_per_gb=(client_after - client_before) / gigabytes,
            server_s_per_gb=(server_after - server_before) / gigabytes,
        ),
    )


def median_cpu(phases: Sequence[Phase]) -> CpuCost:
    """Each side's median over `phases`."""
    return CpuCost(
        client_s_per_gb=statistics.median(phase.cpu.client_s_per_gb for phase in phases),
        server_s_per_gb=statistics.median(phase.cpu.server_s_per_gb for phase in phases),
    )
