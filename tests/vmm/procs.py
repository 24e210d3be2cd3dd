"""The VMM's (this test process's) child processes, as tests count them."""

from __future__ import annotations

import os
import pathlib


def children(spares: bool = False) -> set[int]:
    """Pids of this process's children (every thread's).  A device that is
    restarted on failure has a warm spare process beside it (``devserver
    --spare``, vmm.remote.restart); those are left out unless ``spares``."""
    out: set[int] = set()
    for task in pathlib.Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            out |= {int(p) for p in (task / "children").read_text().split()}
        except OSError:
            pass
    return out if spares else {pid for pid in out if not is_spare(pid)}


def is_spare(pid: int) -> bool:
    """A warm spare -- or a child between its fork and its exec (it still
    has this process's command line), which is what a spare being started
    in the background looks like for a moment."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open("/proc/self/cmdline", "rb") as f:
            mine = f.read()
    except OSError:
        return False
    return b"\0--spare\0" in cmdline or cmdline == mine
