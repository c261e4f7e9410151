"""This test process's live child processes, to check that a harness leaves none behind."""

from __future__ import annotations

import os
from pathlib import Path


def children_named(*needles: str) -> list[str]:
    """Command lines of this process's live (not zombie) children that contain a needle."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue  # exited while we looked
        state, parent_pid = fields[0], int(fields[1])
        if parent_pid == os.getpid() and state != "Z" and any(n in cmdline for n in needles):
            found.append(cmdline)
    return found
