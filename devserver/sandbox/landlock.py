"""Layer 6: Landlock, where the kernel has it: a ruleset handling every
filesystem right of the kernel's ABI with no rule granting any (nothing
can be opened, created, removed, executed), TCP bind and connect on ABI
>= 4, abstract Unix sockets and signals scoped to the domain on ABI >= 6.
A Landlock domain covers the calling thread only (and threads it starts
later), so this runs before the first thread."""

from __future__ import annotations

from devserver.sandbox import _sys


def apply() -> int:
    """Enforce it; returns the ABI used.  OSError without Landlock."""
    abi = _sys.landlock_abi()
    _sys.landlock_deny_all(abi)
    return abi
