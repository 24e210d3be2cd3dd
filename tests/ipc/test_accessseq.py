"""The access sequence decision (ipc.accessseq): answered, from the record,
or run again, and impossible records refused."""

from __future__ import annotations

import itertools
import random

import pytest

from ipc.accessseq import BadRecord, Decision, Outcome, Pending, decide, plan
from ipc.slots import STATUS_ERROR, STATUS_OK
from ipc.state import AccessRecord


def test_answered_is_never_repeated():
    rec = AccessRecord(5, 0x1234, STATUS_OK)
    assert decide(Pending(5, answered=True), rec, issued=9) == Decision(5, Outcome.ANSWERED)
    assert decide(Pending(3, answered=True), None, issued=9).outcome is Outcome.ANSWERED


def test_in_the_record_is_answered_from_it():
    rec = AccessRecord(7, 0xAABBCCDD, STATUS_OK)
    assert decide(Pending(7, size=2), rec, issued=7) == Decision(7, Outcome.FROM_RECORD, 0xCCDD, 0)
    err = AccessRecord(7, 0, STATUS_ERROR)
    assert decide(Pending(7), err, issued=8) == Decision(7, Outcome.FROM_RECORD, 0, STATUS_ERROR)


def test_anything_else_runs_again():
    rec = AccessRecord(7, 1, STATUS_OK)
    # later and earlier numbers alike: slots are not served in number order
    assert decide(Pending(8), rec, issued=9).outcome is Outcome.RERUN
    assert decide(Pending(6), rec, issued=9).outcome is Outcome.RERUN
    assert decide(Pending(6), None, issued=9).outcome is Outcome.RERUN


@pytest.mark.parametrize("rec", [AccessRecord(10, 0, 0), AccessRecord(0, 0, 0), AccessRecord(3, 0, 2)])
def test_impossible_records(rec):
    with pytest.raises(BadRecord):
        decide(Pending(3), rec, issued=9)


def test_bad_pending():
    with pytest.raises(ValueError):
        Pending(0)
    with pytest.raises(ValueError):
        Pending(1, size=3)
    with pytest.raises(ValueError):
        decide(Pending(12), None, issued=9)
    with pytest.raises(ValueError):
        plan([Pending(4), Pending(4)], None, issued=9)


def test_plan_orders_by_number():
    rec = AccessRecord(6, 42, STATUS_OK)
    got = plan([Pending(9), Pending(6), Pending(4, answered=True), Pending(5)], rec, issued=9)
    assert [(d.seq, d.outcome) for d in got] == [
        (4, Outcome.ANSWERED), (5, Outcome.RERUN), (6, Outcome.FROM_RECORD), (9, Outcome.RERUN)]
    assert got[2].value == 42


class Model:
    """A device that serves accesses one at a time, stores before answering
    (only when its state changed), and can die between any two steps; the
    counter's final value tells whether every access took effect once."""

    def __init__(self):
        self.counter = 0
        self.snapshot = (0, None)         # (counter, AccessRecord | None)


def test_exactly_once_against_a_model():
    """Random orders of service and random deaths: with the decision
    applied, the counter equals the number of counting accesses and every
    answer is the one a single run would have given."""
    rng = random.Random(5)
    for _ in range(2000):
        dev = Model()
        issued = 0
        answers: dict[int, int] = {}
        expected = {}
        pending = {}
        seqs = itertools.count(1)
        for _round in range(rng.randint(1, 6)):
            # up to 3 vCPUs have an access outstanding; some count, some only read
            for _ in range(rng.randint(1, 3)):
                s = next(seqs)
                issued = s
                pending[s] = rng.random() < 0.7           # True: increments
            order = list(pending)
            rng.shuffle(order)
            death_at = rng.randrange(len(order) * 3 + 1)   # step at which the device dies
            step = 0
            state = dev.snapshot[0]
            answered: set[int] = set()
            for s in order:
                counts = pending[s]
                new = state + 1 if counts else state
                if step == death_at:
                    break
                step += 1
                if counts:                  # stored before it answers
                    dev.snapshot = (new, AccessRecord(s, new, STATUS_OK))
                state = new
                if step == death_at:
                    break
                step += 1
                answers[s] = new            # the answer reaches the VMM
                answered.add(s)
                if step == death_at:
                    break
                step += 1
            # the VMM's side after the death
            decisions = plan([Pending(s, answered=s in answered) for s in pending],
                             dev.snapshot[1], issued)
            state = dev.snapshot[0]         # the new process restores the snapshot
            for d in decisions:
                if d.outcome is Outcome.FROM_RECORD:
                    answers[d.seq] = d.value
                elif d.outcome is Outcome.RERUN:
                    counts = pending[d.seq]
                    state = state + 1 if counts else state
                    if counts:
                        dev.snapshot = (state, AccessRecord(d.seq, state, STATUS_OK))
                    answers[d.seq] = state
            for s, counts in pending.items():
                expected[s] = counts
            pending.clear()
        assert dev.snapshot[0] == sum(expected.values())
        assert set(answers) == set(expected)
        # each counting access got a distinct value: no double effect, none lost
        counting = sorted(answers[s] for s, c in expected.items() if c)
        assert counting == list(range(1, len(counting) + 1))
