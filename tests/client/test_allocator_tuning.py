"""The client tunes glibc's allocator for megabyte messages, unless told not to.

Each case runs in a fresh interpreter: the setting is process-wide, and this test
process has already been tuned by the in-process servers of other tests.
"""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

# Makes a client, then holds a 30 MiB buffer and prints how many bytes glibc serves
# through mmap (mallinfo2's hblkhd) beyond what it did before. 30 MiB stays under the
# tuned threshold (32 MiB) and over any glibc raises by itself after imports free large
# buffers (it lifts the threshold to the largest mmapped block freed).
CHILD = """
import asyncio, ctypes, sys
from kvstore.client import ClientOptions, DType, KVClient, KVLayout, Namespace

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=16)

async def make_client():
    options = ClientOptions(tune_allocator=sys.argv[1] == "tune")
    # The channel connects lazily: nothing needs to listen on the port.
    KVClient("127.0.0.1:1", Namespace(tenant="t", model_fingerprint="m", layout=layout),
             options=options)

asyncio.run(make_client())
before = libc.mallinfo2().hblkhd
held = bytearray(30 << 20)
print(libc.mallinfo2().hblkhd - before)
"""


def _glibc_has_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    return name is not None and hasattr(ctypes.CDLL(name), "mallinfo2")


@pytest.mark.skipif(not _glibc_has_mallinfo2(), reason="needs glibc 2.33+ (mallinfo2)")
@pytest.mark.parametrize(("mode", "mmapped"), [("tune", False), ("leave", True)])
def test_a_client_keeps_megabyte_buffers_on_the_heap_unless_told_not_to(
    mode: str, mmapped: bool
) -> None:
    # glibc's MALLOC_* variables would set the thresholds before the client does.
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=60, env=env
    )
    assert child.returncode == 0, child.stderr
    mmapped_bytes = int(child.stdout.strip())
    assert (mmapped_bytes >= 30 << 20) is mmapped, mmapped_bytes
