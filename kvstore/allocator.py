"""Keep glibc from returning megabyte buffers to the kernel after every message.

Every gRPC message of a megabyte or more is a fresh allocation. By default glibc serves
those with mmap and unmaps them on free, so each message costs a page fault per 4 KiB
page: on the 2-core reference machine that halved both our throughput and plain
grpcio's. Raising the mmap and trim thresholds keeps such buffers on the heap, where the
next message reuses them. The server applies this at start (config `tune_allocator`),
the client library when its first client is made (`ClientOptions.tune_allocator`), and
benchmarks to every process they measure, the plain-grpcio ceiling included.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger("kvstore")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD = 256 << 20
DEFAULT_TRIM_THRESHOLD = 1 << 30


def tune_allocator(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int = DEFAULT_TRIM_THRESHOLD
) -> bool:
    """Apply the thresholds through glibc's mallopt; False (and no change) off glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # glibc caps the mmap threshold at HEAP_MAX/2 (32 MiB on 64-bit) and rejects more.
    applied = bool(mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, 32 << 20)))
    applied = bool(mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1))) and applied
    logger.debug("allocator thresholds %s", "applied" if applied else "rejected")
    return applied


_tuned = False


def tune_allocator_once() -> None:
    """`tune_allocator()` with its defaults, at most once per process."""
    global _tuned
    if not _tuned:
        _tuned = True
        tune_allocator()
