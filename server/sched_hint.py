"""A latency hint for the event loop's thread: a short scheduler slice.

On a machine whose cores are all busy (bulk clients on the same host, a busy node), the
loop's thread waits for a core when a request wakes it, and that wait, not the loop's
own work, is most of a lookup's tail (Stats' `loop_lag_max_runqueue_us` shows it).
Linux's EEVDF scheduler (6.12 and later) lets any thread ask for a shorter time slice
than the default: the kernel then gives it an earlier deadline, so a thread that wakes
with its fair share unspent runs before threads with the default slice, instead of
waiting out their slices. It gets no more CPU than before, only sooner. Asking for it
needs no privilege (the nice value stays as it is); the kernel clamps it to 0.1-100 ms.

Elsewhere (another OS, an older kernel, a seccomp filter) the request fails or is
ignored, and the daemon runs as before.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import struct

logger = logging.getLogger("kvstore.server")

# sched_setattr(2)'s number, by machine; elsewhere no hint is asked for.
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}
# struct sched_attr, its first version (56 bytes): size, policy, flags, nice, priority,
# runtime (the slice, for SCHED_OTHER), deadline, period, util_min, util_max.
_SCHED_ATTR = struct.Struct("=IIQiIQQQII")
_SCHED_OTHER = 0


def request_slice(slice_s: float) -> float | None:
    """Ask for a `slice_s` scheduler slice for the calling thread; the slice the kernel
    reports for it afterwards, or None where it does not report one, or refused."""
    number = _SCHED_SETATTR.get(platform.machine())
    if number is None or not hasattr(os, "sched_getscheduler"):
        return None
    if os.sched_getscheduler(0) != _SCHED_OTHER:
        return None  # a policy someone chose (batch, idle, real-time) is left alone
    thread = 0  # sched_setattr's own thread
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    slice_ns = int(slice_s * 1e9)
    attr = _SCHED_ATTR.pack(_SCHED_ATTR.size, _SCHED_OTHER, 0, nice, 0, slice_ns, 0, 0, 0, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, thread, attr, 0) != 0:
        logger.debug("sched_setattr refused a slice: errno %d", ctypes.get_errno())
        return None
    return thread_slice_s()


def thread_slice_s() -> float | None:
    """The calling thread's scheduler slice (/proc/thread-self/sched), or None where the
    kernel does not show one."""
    try:
        with open("/proc/thread-self/sched") as sched:
            for line in sched:
                if line.startswith("se.slice"):
                    return int(line.split(":")[1]) / 1e9
    except (OSError, ValueError):
        pass
    return None
