"""Access sequence numbers: how the VMM completes every access exactly once
with respect to a device's state when the device process dies (issue 10 §2).

The scheme:

* The VMM numbers the accesses it forwards to a device: a 64-bit counter per
  device, starting at 1, kept by the VMM (never reset, also not by a
  restart), taken when the access is first sent.  The number travels with
  the request.  An access sent again to a new process keeps its number.
* The device serves accesses one at a time.  Before it answers one that
  changed the model, the runtime stores the snapshot with an
  :class:`~ipc.state.AccessRecord` (that number, the answer's value and
  status).  Hence at any moment every access whose effect is in the
  snapshot is either answered already or is the snapshot's record: no other
  access can be "in the snapshot but unanswered" (accesses on different
  slots are not served in number order, so only equality with the record
  means anything, never "less than").
* When the device dies, for each access the VMM had sent and not seen
  answered, :func:`decide` says what to do:

  - ``ANSWERED``: the answer reached the VMM (it is in the slot, with the
    request's slot sequence number) before the death; deliver it, never
    send the access again;
  - ``FROM_RECORD``: the latest valid snapshot's record is this access:
    its effect is in the snapshot the new process restores, so it is
    answered from the record and not run again;
  - ``RERUN``: anything else: the new process restores the latest valid
    snapshot, which was taken before this access, and the access is sent to
    it again (same number).  An access that changed nothing in the model
    may have been served without a store; running it again is harmless.

  A record whose number the VMM never issued, or whose status is not one an
  answer may carry, cannot come from an honest device: :class:`BadRecord`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable

from ipc.slots import STATUS_ERROR, STATUS_OK
from ipc.state import AccessRecord

__all__ = [
    "Outcome",
    "Pending",
    "Decision",
    "BadRecord",
    "decide",
    "plan",
]


class Outcome(enum.Enum):
    ANSWERED = "answered"
    FROM_RECORD = "from-record"
    RERUN = "rerun"


@dataclasses.dataclass(frozen=True)
class Pending:
    """An access the VMM sent to the dead process: its number, its size in
    bytes (a read's value is masked to it) and whether its answer came."""

    seq: int
    size: int = 8
    answered: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.seq, int) or not 1 <= self.seq < 1 << 64:
            raise ValueError(f"access sequence number must be in [1, 2**64), not {self.seq!r}")
        if self.size not in (1, 2, 4, 8):
            raise ValueError(f"access size must be 1, 2, 4 or 8, not {self.size!r}")


@dataclasses.dataclass(frozen=True)
class Decision:
    """What :func:`decide` says of one access a dead device left unanswered, and the answer for FROM_RECORD."""

    seq: int
    outcome: Outcome
    #: The answer, for FROM_RECORD (masked to the access size).
    value: int = 0
    status: int = 0


class BadRecord(ValueError):
    """The snapshot's access record is impossible: the device is faulty."""


def _check_record(record: AccessRecord | None, issued: int, statuses: Iterable[int]) -> None:
    if record is None:
        return
    if not 1 <= record.seq <= issued:
        raise BadRecord(f"snapshot records access {record.seq}, but only 1..{issued} were sent")
    if record.status not in statuses:
        raise BadRecord(f"snapshot records access {record.seq} with unknown status {record.status}")


def decide(access: Pending, record: AccessRecord | None, issued: int,
           statuses: Iterable[int] = (STATUS_OK, STATUS_ERROR)) -> Decision:
    """What to do with ``access`` after its device died.

    ``record``: the access record of the latest valid snapshot (None: no
    snapshot, or one that includes no access); ``issued``: the highest
    number the VMM has sent to this device; ``statuses``: the statuses an
    answer may carry (the slots' ``STATUS_OK``/``STATUS_ERROR``).
    """
    statuses = tuple(statuses)
    _check_record(record, issued, statuses)
    if access.seq > issued:
        raise ValueError(f"access {access.seq} was never sent (highest sent: {issued})")
    if access.answered:
        return Decision(access.seq, Outcome.ANSWERED)
    if record is not None and record.seq == access.seq:
        mask = (1 << (8 * access.size)) - 1
        return Decision(access.seq, Outcome.FROM_RECORD, record.value & mask, record.status)
    return Decision(access.seq, Outcome.RERUN)


def plan(pending: Iterable[Pending], record: AccessRecord | None, issued: int,
         statuses: Iterable[int] = (STATUS_OK, STATUS_ERROR)) -> list[Decision]:
    """:func:`decide` for every access the dead process held, in number
    order (the order the RERUN ones are best sent again in; any order is
    correct since none of them was answered).  Two accesses with the same
    number are a VMM bug: ValueError."""
    items = sorted(pending, key=lambda p: p.seq)
    for a, b in zip(items, items[1:], strict=False):
        if a.seq == b.seq:
            raise ValueError(f"access {a.seq} is pending twice")
    statuses = tuple(statuses)
    return [decide(p, record, issued, statuses) for p in items]
