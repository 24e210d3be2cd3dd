"""Deterministic deaths at a chosen store into shared memory.

The inflight record writes shared memory only through item and slice
assignments on a few memoryviews (the state segment's stores, plain and
packed, are each one call into C; :func:`wire_state` asks them for the
first steps only).  :class:`Wired` wraps one
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
    """Route a StateSegment's snapshot stores through ``trip``, both kinds:
    ``store``/``store_answer`` (svs_state_store) and ``store_packed``
    (svs_state_store_packed).  Each is one call into C of
    ``ipc.state.STORE_STEPS`` stores, so the fatal one is reached by asking
    C for only the steps before it (and half of it, torn), then dying."""
    from ipc._slots_c import lib
    from ipc.state import STORE_STEPS

    real = seg._store_c

    def store(buf, cap, number, seq, value, status, payload, n, steps, torn):
        at = trip.at
        if at is not None and trip.count <= at < trip.count + steps:
            real(buf, cap, number, seq, value, status, payload, n, at - trip.count, 1 if trip.torn else 0)
            os.kill(os.getpid(), signal.SIGKILL)
        trip.count += steps
        return real(buf, cap, number, seq, value, status, payload, n, steps, torn)

    packed = lib.svs_state_store_packed_steps

    def store_packed(w, seq, value, payload, n):
        # Whether the call stores at all (not a payload equal to the last,
        # not a writer that must first learn its next number) is C's to
        # decide: a call cut short that stored nothing returns as it is.
        at = trip.at
        if at is not None and trip.count <= at < trip.count + STORE_STEPS:
            rc = packed(w, seq, value, payload, n, at - trip.count, 1 if trip.torn else 0)
            if rc == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return rc
        rc = packed(w, seq, value, payload, n, STORE_STEPS, 0)
        if rc == 1:
            trip.count += STORE_STEPS
        return rc

    seg._store_c = store
    seg._store_packed_c = store_packed


def wire_queue(q, trip: Tripwire) -> None:
    """Route an InflightQueue's stores through ``trip``."""
    q._b = Wired(q._b, trip)
    q._h = Wired(q._h, trip)
    q._q = Wired(q._q, trip)
