"""Layer 4: descriptors, resource limits, dumpability.

Every descriptor not on the keep list is closed; ``RLIMIT_NOFILE`` and
``RLIMIT_CORE`` (0) are lowered, soft and hard; ``RLIMIT_AS`` and
``RLIMIT_FSIZE`` are left alone, since guest RAM and the memfds count
against them.  ``PR_SET_DUMPABLE`` 0: no core, and no ``/proc/<pid>``
access or ptrace by same-uid processes."""

from __future__ import annotations

import os
import resource

from devserver.sandbox import _sys

#: Descriptors a device may hold (kept ones, eventfds it is given later).
NOFILE = 256


def open_fds() -> list[int]:
    """The descriptors open now (needs /proc: call before the root goes)."""
    return sorted(int(n) for n in os.listdir("/proc/self/fd") if n.isdigit())


def mapping_fds() -> set[int]:
    """Descriptors the process's mappings hold (guest RAM, the registry,
    the slots: memfds and shared memory), which the objects that own them
    close themselves."""
    out = set()
    for fd in open_fds():
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("/memfd:", "/dev/shm/")):
            out.add(fd)
    return out


def apply(keep: set[int]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(soft if soft != resource.RLIM_INFINITY else 1 << 20, max(keep, default=0) + 1)
    start = 0
    for fd in sorted(keep):
        if fd > start:
            os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, top)
    limit = max(NOFILE, max(keep, default=0) + 1)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _sys.set_dumpable(False)
