"""Deterministic deaths at a chosen store into shared memory.

The state segment and the inflight record write shared memory only through
item and slice assignments on a few memoryviews.  :class:`Wired` wraps one
of them and counts every assignment with a :class:`Tripwire` shared by all
the wrapped views of a process: before store number ``at`` (0-based) the
process SIGKILLs itself, so the dead writer did every store before that
one and none after it, exactly what a SIGKILL between two instructions
leaves.  With ``torn`` the fatal store is first half done (the first half
of a slice's bytes), a death inside a multi-byte copy.  ``at=None`` kills
nothing and only counts (to learn how many steps an operation has).
"""

from __future__ import annotations

import os
import signal


class Tripwire:
    def __init__(self, at: int | None = None, torn: bool = False):
        self.at = at
        self.torn = torn
        self.count = 0

    def store(self, view, key, value) -> None:
        if self.count == self.at:
            if self.torn and isinstance(key, slice):
                data = bytes(value)
                half = len(data) // 2
                if half:
                    start = key.start or 0
                    view[start:start + half] = data[:half]
            os.kill(os.getpid(), signal.SIGKILL)
        self.count += 1
        view[key] = value


class Wired:
    """A memoryview whose stores go through a tripwire (reads go straight)."""

    def __init__(self, view, trip: Tripwire):
        self._view = view
        self._trip = trip

    def __getitem__(self, key):
        return self._view[key]

    def __setitem__(self, key, value) -> None:
        self._trip.store(self._view, key, value)

    def __len__(self) -> int:
        return len(self._view)


def wire_state(seg, trip: Tripwire) -> None:
    """Route a StateSegment's snapshot stores through ``trip``."""
    seg._mem = Wired(seg._mem, trip)


def wire_queue(q, trip: Tripwire) -> None:
    """Route an InflightQueue's stores through ``trip``."""
    q._b = Wired(q._b, trip)
    q._h = Wired(q._h, trip)
    q._q = Wired(q._q, trip)
