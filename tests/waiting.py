"""Waiting in tests: poll a cheap, local condition until it holds or a
deadline passes.  The project's tests never synchronise with a bare sleep;
a sleep that is an observation window ("nothing may change in it") says
so where it stands."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(cond: Callable[[], T], timeout: float = 10.0, interval: float = 0.01) -> T:
    """``cond()``'s value as soon as it is truthy, else its (falsy) value at
    the deadline: for callers that decide what a timeout means."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_for(cond: Callable[[], T], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.01) -> T:
    """``cond()``'s value as soon as it is truthy; AssertionError naming
    ``what`` when the deadline passes first."""
    value = poll(cond, timeout, interval)
    if not value:
        raise AssertionError(f"timed out waiting for {what}")
    return value
