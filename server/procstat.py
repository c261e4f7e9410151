"""The daemon process's health as Stats reports it: resident memory, open fds, loop lag.

RSS and open file descriptors are read from /proc/self (Linux) when Stats asks, so
they cost nothing between calls; where /proc is missing they read as 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvstore.server.loopwatch import LoopLag, LoopWatch

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True, slots=True)
class ProcessHealth:
    rss_bytes: int
    open_fds: int
    loop_lag: LoopLag


def read_process_health(loop_watch: LoopWatch | None) -> ProcessHealth:
    """Now: RSS, open fds, and the loop lag `loop_watch` saw (zero without one)."""
    lag = loop_watch.lag() if loop_watch is not None else LoopLag(0.0, 0.0)
    return ProcessHealth(rss_bytes=rss_bytes(), open_fds=open_fds(), loop_lag=lag)


def rss_bytes() -> int:
    """Resident set size of this process; 0 where /proc/self/statm cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            fields = statm.read().split()
        return int(fields[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def open_fds() -> int:
    """File descriptors this process has open; 0 where /proc/self/fd cannot be listed."""
    try:
        # Listing the directory opens one descriptor for itself, which it then lists.
        return max(0, len(os.listdir("/proc/self/fd")) - 1)
    except OSError:
        return 0
